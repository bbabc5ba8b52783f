"""(IA)^3 in peftcore: initialisation, shapes, counts, merging, mixed batches, configs, files."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from ia3_helpers import TASK_TYPES, logits, randomize_vectors, tiny_model
from torch import nn

import peftcore
from peftcore import IA3Config, get_peft_model

ARCHS = ["bert", "gpt2", "llama", "t5"]


def _ia3_model(arch, **options):
    base, inputs = tiny_model(arch)
    reference = logits(base, inputs)
    model = get_peft_model(base, IA3Config(task_type=TASK_TYPES[arch], **options)).eval()
    return model, inputs, reference


def _analytic_vector_count(arch, config) -> int:
    """Sum of the vector lengths PEFT's default targets imply, from the model's dimensions alone."""
    if (
        arch == "bert"
    ):  # key, value (out), attention.output.dense (ff: in = hidden), output.dense (ff: in = intermediate)
        return config.num_hidden_layers * (3 * config.hidden_size + config.intermediate_size)
    if arch == "gpt2":  # c_attn (out = 3 * hidden), mlp.c_proj (ff: in = 4 * hidden)
        return config.n_layer * (3 * config.n_embd + 4 * config.n_embd)
    if arch in ("llama", "mistral"):  # k_proj, v_proj (out = kv heads * head dim), down_proj (ff: in = intermediate)
        kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        return config.num_hidden_layers * (2 * kv + config.intermediate_size)
    if arch == "t5":  # k, v per attention block (out = heads * d_kv), wo (ff: in = d_ff) per layer
        inner = config.num_heads * config.d_kv
        return config.num_layers * (2 * inner + config.d_ff) + config.num_decoder_layers * (4 * inner + config.d_ff)
    raise ValueError(arch)


@pytest.mark.parametrize("arch", ARCHS + ["mistral"])
def test_fresh_adapter_is_a_noop(arch):
    model, inputs, reference = _ia3_model(arch)
    assert torch.equal(logits(model, inputs), reference)  # multiplying by exact ones changes no bit


@pytest.mark.parametrize("arch", ARCHS + ["mistral"])
def test_trainable_parameter_count_matches_analytic_count(arch):
    base, _ = tiny_model(arch)
    base_total = sum(p.numel() for p in base.parameters())
    vectors = _analytic_vector_count(arch, base.config)
    head = base.config.hidden_size * base.config.num_labels + base.config.num_labels if arch == "bert" else 0
    model = get_peft_model(base, IA3Config(task_type=TASK_TYPES[arch]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == vectors + head  # the classifier copy trains for SEQ_CLS
    assert total == base_total + vectors + head


def test_vector_shapes_and_names_follow_feedforward_role():
    model, _, _ = _ia3_model("bert")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if ".ia3_l." in n}
    prefix = "base_model.model.bert.encoder.layer.0."
    assert shapes[prefix + "attention.self.key.ia3_l.default"] == (16, 1)  # output scaling: out x 1
    assert shapes[prefix + "attention.output.dense.ia3_l.default"] == (1, 16)  # PEFT's suffix rule: also feedforward
    assert shapes[prefix + "output.dense.ia3_l.default"] == (1, 32)  # input scaling: 1 x in
    assert model.peft_config["default"].feedforward_modules == {"output.dense"}
    assert model.peft_config["default"].target_modules == {"key", "value", "output.dense"}


def test_forward_scales_output_or_input_as_documented():
    layer_in, layer_out = 5, 3
    model = nn.Sequential(nn.Linear(layer_in, layer_out), nn.ReLU(), nn.Linear(layer_out, 2))
    x = torch.randn(4, layer_in, dtype=torch.float64)
    model = model.double()
    peft_model = get_peft_model(copy.deepcopy(model), IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    with torch.no_grad():
        out_vec = torch.rand(layer_out, 1, dtype=torch.float64) + 0.5
        in_vec = torch.rand(1, layer_out, dtype=torch.float64) + 0.5
        peft_model.base_model.model[0].ia3_l["default"].copy_(out_vec)
        peft_model.base_model.model[2].ia3_l["default"].copy_(in_vec)
        expected = model[2](torch.relu(model[0](x) * out_vec.T) * in_vec)
        torch.testing.assert_close(peft_model(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_equals_unmerged_and_unmerge_restores(arch):
    model, inputs, reference = _ia3_model(arch)
    randomize_vectors(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = logits(model, inputs)
    assert not torch.allclose(unmerged, reference)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-6, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vectors in [0.5, 1.5]: the division is exact enough to stay quiet
        model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-6, rtol=0)


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs():
    model, inputs, _ = _ia3_model("gpt2")
    randomize_vectors(model)
    expected = logits(model, inputs)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, peftcore.AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-6, rtol=0)


def test_unmerge_warns_where_it_cannot_be_exact():
    model, _, _ = _ia3_model("bert")
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.key
    with torch.no_grad():
        layer.ia3_l["default"][3] = 1e-3
        layer.ia3_l["default"][5] = 0.0
    model.merge_adapter()
    with pytest.warns(UserWarning, match=r"attention\.self\.key.*2 of 16 scaling values.*1 are exactly 0"):
        model.unmerge_adapter()


def test_safe_merge_refuses_non_finite_weights_and_leaves_the_base_alone():
    model, _, _ = _ia3_model("bert")
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.value
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.ia3_l["default"][0] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_mixed_batch_rows_equal_single_adapter_runs(arch):
    model, inputs, reference = _ia3_model(arch)
    model.add_adapter("other", IA3Config(task_type=TASK_TYPES[arch]))
    randomize_vectors(model, seed=3)
    names = ["default", "__base__", "other"]
    mixed = model(**inputs, adapter_names=names).logits.detach()
    singles = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        singles[name] = logits(model, inputs)
    with model.disable_adapter():
        singles["__base__"] = logits(model, inputs)
    torch.testing.assert_close(singles["__base__"], reference, atol=1e-6, rtol=0)
    assert not torch.allclose(singles["default"], singles["other"])
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-6, rtol=0)


def test_several_active_adapters_multiply_their_vectors():
    model, inputs, _ = _ia3_model("gpt2")
    model.add_adapter("other", IA3Config(task_type="CAUSAL_LM"))
    randomize_vectors(model, seed=4)
    model.base_model.set_adapter(["default", "other"])
    both = logits(model, inputs)
    product = get_peft_model(tiny_model("gpt2")[0], IA3Config(task_type="CAUSAL_LM")).eval()
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in product.named_parameters():
            if ".ia3_l.default" in name:
                param.copy_(ours[name] * ours[name.replace(".default", ".other")])
    torch.testing.assert_close(both, logits(product, inputs), atol=1e-6, rtol=0)


def test_disable_adapter_gives_the_base_outputs():
    model, inputs, reference = _ia3_model("t5")
    randomize_vectors(model)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), reference, atol=0, rtol=0)
    assert not torch.allclose(logits(model, inputs), reference)


# -- configs ------------------------------------------------------------------------


def test_feedforward_modules_must_be_a_subset_of_target_modules():
    with pytest.raises(ValueError, match=r"should be a subset of `target_modules` \(IA3Config: \['fc2'\] are not in"):
        IA3Config(target_modules=["q", "v"], feedforward_modules=["q", "fc2"])


def test_a_model_without_defaults_needs_explicit_targets_and_feedforward_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="IA3Config.target_modules is None and no installed plugin has a default"):
        get_peft_model(copy.deepcopy(model), IA3Config())
    with pytest.raises(ValueError, match="feedforward_modules is None"):
        get_peft_model(copy.deepcopy(model), IA3Config(target_modules=["0"]))
    wrapped = get_peft_model(copy.deepcopy(model), IA3Config(target_modules=["0", "2"], feedforward_modules=[]))
    assert wrapped.base_model.model[2].ia3_l["default"].shape == (2, 1)


def test_unsupported_layer_type_is_named():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Target module 0 is a torch\.nn\.modules\.sparse\.Embedding"):
        get_peft_model(model, IA3Config(target_modules=["0"], feedforward_modules=[]))


def test_a_layer_cannot_be_feedforward_for_one_adapter_and_not_for_another():
    model, _, _ = _ia3_model("gpt2")
    with pytest.raises(ValueError, match=r"mlp\.c_proj.*existing adapters scale its input"):
        model.add_adapter(
            "other", IA3Config(task_type="CAUSAL_LM", target_modules=["mlp.c_proj"], feedforward_modules=[])
        )
    assert set(model.peft_config) == {"default"}  # the failed adapter left nothing behind


def test_config_json_has_exactly_peft_keys(tmp_path):
    import peft

    model, _, _ = _ia3_model("gpt2")
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written) == set(peft.IA3Config().to_dict())
    assert written["peft_type"] == "IA3" and written["fan_in_fan_out"] is True
    assert written["feedforward_modules"] == ["mlp.c_proj"]


# -- files --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_save_and_load_round_trip(arch, tmp_path):
    model, inputs, _ = _ia3_model(arch)
    model.add_adapter("second", IA3Config(task_type=TASK_TYPES[arch]))
    randomize_vectors(model, seed=7)
    expected = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        expected[name] = logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    loaded = peftcore.PeftModel.from_pretrained(tiny_model(arch)[0], tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    for name in ("default", "second"):
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded, inputs), expected[name], atol=0, rtol=0)


# -- convolutions -------------------------------------------------------------------


class _ConvNet(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=groups)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("groups", [1, 3])
def test_conv2d_vectors_merge_exactly(groups):
    torch.manual_seed(0)
    net, x = _ConvNet(groups).eval(), torch.randn(2, 4, 5, 5)
    reference = net(x).detach()
    model = get_peft_model(net, IA3Config(target_modules=["conv1", "conv2"], feedforward_modules=["conv2"])).eval()
    assert model.base_model.model.conv1.ia3_l["default"].shape == (1, 6, 1, 1)
    assert model.base_model.model.conv2.ia3_l["default"].shape == (1, 6, 1, 1)
    assert torch.equal(model(x), reference)
    randomize_vectors(model)
    unmerged = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)
    mixed = model(x, adapter_names=["__base__", "default"])
    torch.testing.assert_close(mixed[0], reference[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], unmerged[1], atol=1e-6, rtol=0)


def test_layers_to_transform_limits_the_targets_and_is_saved_only_when_set(tmp_path):
    model, _, _ = _ia3_model("bert", layers_to_transform=[1], layers_pattern="layer")
    wrapped = [n for n, m in model.named_modules() if isinstance(m, peftcore.AdapterLayer)]
    assert wrapped and all(".layer.1." in n for n in wrapped)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["layers_to_transform"] == [1] and written["layers_pattern"] == "layer"
