"""LoRA behaviour, in the spirit of PEFT's own tests, checked against independent references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import peftcore
from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.testing import tiny_model


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _nonzero_b(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


@pytest.fixture
def llama():
    return tiny_model("llama")


def test_fresh_adapter_is_a_no_op(llama):
    base, inputs = llama
    expected = _out(base, inputs)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    torch.testing.assert_close(_out(model, inputs), expected, atol=0, rtol=0)


def test_forward_matches_float64_reference():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    wrapped = get_peft_model(nn.Sequential(copy.deepcopy(layer)), LoraConfig(r=2, lora_alpha=6, target_modules=["0"]))
    _nonzero_b(wrapped)
    a = wrapped.base_model.model[0].lora_A["default"].weight.double()
    b = wrapped.base_model.model[0].lora_B["default"].weight.double()
    expected = x.double() @ (layer.weight.double() + (6 / 2) * b @ a).T + layer.bias.double()
    torch.testing.assert_close(wrapped(x).double(), expected, atol=1e-6, rtol=0)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    model = get_peft_model(
        nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=9, lora_alpha=6, use_rslora=True, target_modules=["0"])
    )
    assert model.base_model.model[0].scaling["default"] == pytest.approx(6 / math.sqrt(9))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("options", [dict(), dict(use_dora=True), dict(lora_bias=True), dict(use_rslora=True)])
def test_merged_equals_unmerged_and_unmerge_restores(arch, options):
    if options.get("lora_bias") and arch == "llama":
        pytest.skip("llama's linear layers have no bias to merge lora_bias into (tested below)")
    base, inputs = tiny_model(arch)
    base_out = _out(base, inputs)
    base_weights = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", **options)).eval()
    _nonzero_b(model)
    if options.get("lora_bias"):
        for name, param in model.named_parameters():
            if name.endswith("lora_B.default.bias"):
                param.data.normal_(0, 0.2)
    unmerged = _out(model, inputs)
    assert not torch.allclose(unmerged, base_out, atol=1e-4)
    model.merge_adapter()
    torch.testing.assert_close(_out(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_out(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    restored = model.unload().state_dict()
    for key, value in base_weights.items():
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=0)


def test_lora_bias_merge_without_base_bias_is_refused(llama):
    base, _ = llama
    model = get_peft_model(base, LoraConfig(r=2, lora_bias=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"'default' into model\.layers\.0\.self_attn\.q_proj: it changes the bias, but "
        "the base layer has none",
    ):
        model.merge_adapter()
    assert not any(layer.merged for _, layer in model.base_model.adapter_layers())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_merge_and_unload_returns_plain_model_with_same_outputs(llama):
    base, inputs = llama
    model = get_peft_model(base, LoraConfig(r=4)).eval()
    _nonzero_b(model)
    expected = _out(model, inputs)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, peftcore.AdapterLayer) for m in plain.modules())
    assert type(plain).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_out(plain, inputs), expected, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_non_finite_weights(llama):
    base, _ = llama
    model = get_peft_model(base, LoraConfig(r=4))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(layer.base_layer.weight, before, atol=0, rtol=0)
    assert not layer.merged


def test_disabled_adapter_gives_base_outputs(llama):
    base, inputs = llama
    expected = _out(base, inputs)
    model = get_peft_model(base, LoraConfig(r=4)).eval()
    _nonzero_b(model)
    adapted = _out(model, inputs)
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, inputs), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(_out(model, inputs), adapted, atol=0, rtol=0)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, inputs), expected, atol=1e-5, rtol=0)


def test_save_load_reproduces_outputs(llama, tmp_path):
    base, inputs = llama
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, use_dora=True, target_modules="all-linear")).eval()
    _nonzero_b(model)
    expected = _out(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(_out(loaded, inputs), expected, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference: nothing trains"
    trainable = PeftModel.from_pretrained(copy.deepcopy(tiny_model("llama")[0]), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_mixed_batch_rows_equal_single_adapter_runs(llama):
    base, inputs = llama
    ids = torch.cat([inputs["input_ids"]] * 2)  # 4 rows
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, modules_to_save=["lm_head"])).eval()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"]))
    _nonzero_b(model)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["other"].weight.mul_(1.5)
    names = ["default", "other", "__base__", "other"]
    mixed = _out(model, {"input_ids": ids, "adapter_names": names})
    singles = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        singles[name] = _out(model, {"input_ids": ids})
    singles["__base__"] = _out(pristine, {"input_ids": ids})
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], singles[name][row], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("expand", [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)])
def test_mixed_batch_generate_with_beams_equals_each_adapter_alone(arch, expand):
    """generate repeats each row per beam / returned sequence: the names follow (the encoder sees them as given)."""
    torch.manual_seed(0)
    base, inputs = tiny_model(arch)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q", "v"] if arch == "t5" else None)).eval()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q", "v"] if arch == "t5" else None))
    _nonzero_b(model)
    ids = torch.cat([inputs["input_ids"][:1]] * 3)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, **expand)
    if arch == "t5":
        kwargs["decoder_start_token_id"] = 0
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        alone = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            alone[name] = model.generate(input_ids=ids, **kwargs)
        with model.disable_adapter():
            alone["__base__"] = model.generate(input_ids=ids, **kwargs)
    per_input = mixed.shape[0] // len(names)
    for row, name in enumerate(names):
        rows = slice(row * per_input, (row + 1) * per_input)
        torch.testing.assert_close(mixed[rows], alone[name][rows])


def test_mixed_batch_errors_are_clear(llama):
    base, inputs = llama
    model = get_peft_model(base, LoraConfig(r=4)).eval()
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): nope"):
        model(**inputs, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, "
                                         "but got 1 and 2"):
        model(**inputs, adapter_names=["default"])
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(**inputs, adapter_names=["default", "default"])


def test_delete_adapter_removes_its_parameters(llama):
    base, _ = llama
    model = get_peft_model(base, LoraConfig(r=4))
    model.add_adapter("other", LoraConfig(r=2))
    assert any(".other." in n for n, _ in model.named_parameters())
    model.delete_adapter("other")
    assert not any(".other." in n for n, _ in model.named_parameters())
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("other")


def test_trainable_parameter_counts_are_analytic(llama):
    base, _ = llama
    cfg = base.config
    model = get_peft_model(base, LoraConfig(r=4))  # q_proj, v_proj by default
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_out, v_out = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = 4 * (cfg.hidden_size + q_out) + 4 * (cfg.hidden_size + v_out)
    expected = per_layer * cfg.num_hidden_layers
    base_total = sum(p.numel() for p in tiny_model("llama")[0].parameters())
    assert model.get_nb_trainable_parameters() == (expected, base_total + expected)


def test_bias_modes_train_the_right_biases():
    base, _ = tiny_model("bert")
    lora_only = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, bias="lora_only", task_type="SEQ_CLS"))
    trained = {
        n for n, p in lora_only.named_parameters() if p.requires_grad and n.endswith("bias") and "lora_" not in n
    }
    assert trained and all(
        n.endswith(("query.base_layer.bias", "value.base_layer.bias")) or "classifier" in n for n in trained
    )
    everything = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, bias="all", task_type="SEQ_CLS"))
    n_bias = sum(1 for n, _ in base.named_parameters() if n.endswith(".bias"))
    trained_all = {
        n
        for n, p in everything.named_parameters()
        if p.requires_grad and n.endswith(".bias") and "modules_to_save" not in n
    }
    assert len(trained_all) == n_bias - 1  # every bias but the frozen original classifier's


def test_rank_and_alpha_patterns(llama):
    base, _ = llama
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    )
    layers = model.base_model.model.model.layers
    assert layers[1].self_attn.q_proj.r["default"] == 2 and layers[0].self_attn.q_proj.r["default"] == 4
    assert layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(3 / 4)
    assert layers[1].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_keep_the_initial_output(llama, init):
    base, inputs = llama
    expected = _out(base, inputs)
    model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=init))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum() > 0
    torch.testing.assert_close(_out(model, inputs), expected, atol=1e-4, rtol=1e-4)


def test_gaussian_init_has_std_one_over_r():
    model = get_peft_model(
        nn.Sequential(nn.Linear(4000, 8)), LoraConfig(r=8, init_lora_weights="gaussian", target_modules=["0"])
    )
    a = model.base_model.model[0].lora_A["default"].weight
    assert a.std().item() == pytest.approx(1 / 8, rel=0.05)


def test_embedding_and_conv2d_merge_exactly():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("emb", nn.Embedding(10, 6))
    net.add_module("conv", nn.Conv2d(2, 3, 3, padding=1))
    ids, images = torch.randint(0, 10, (2, 4)), torch.randn(2, 2, 5, 5)
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["emb", "conv"], use_dora=False))
    _nonzero_b(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_embedding_A" in name:
                param.normal_(0, 0.3)
    inner = model.base_model.model
    before = inner.emb(ids), inner.conv(images)
    model.merge_adapter()
    after = inner.emb(ids), inner.conv(images)
    for x, y in zip(before, after):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_config_errors_are_raised_early():
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="`loftq_config` must be specified when `init_lora_weights` is 'loftq'"):
        LoraConfig(init_lora_weights="loftq")  # accepted with a loftq_config (test_loftq_init.py)
    with pytest.raises(ValueError, match="task_type"):
        LoraConfig(task_type="CLASSIFY")


def test_unsupported_target_type_names_module_and_type():
    net = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"0 is a torch.nn.modules.normalization.LayerNorm.*Linear"):
        get_peft_model(net, LoraConfig(target_modules=["0"]))


def test_no_match_names_targets(llama):
    base, _ = llama
    with pytest.raises(ValueError, match=r"Target modules \{'query'\} not found in the base model.*"
                                         r"target modules \['query'\] matched no module"):
        get_peft_model(base, LoraConfig(target_modules=["query"]))


def test_adapter_name_clashing_with_module_attribute_is_refused(llama):
    base, _ = llama
    model = get_peft_model(base, LoraConfig(r=2))
    with pytest.raises(ValueError, match="clashes"):
        model.add_adapter("training", LoraConfig(r=2))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(r=2))


def test_failed_merge_leaves_no_layer_merged(llama):
    base, inputs = llama
    model = get_peft_model(base, LoraConfig(r=2)).eval()
    _nonzero_b(model)
    expected = _out(model, inputs)
    last = model.base_model.model.model.layers[-1].self_attn.v_proj
    with torch.no_grad():
        last.lora_B["default"].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert not any(layer.merged for _, layer in model.base_model.adapter_layers())
    with torch.no_grad():
        last.lora_B["default"].weight.zero_()
    model.merge_adapter()
    model.unmerge_adapter()
    assert torch.isfinite(_out(model, inputs)).all() and expected.shape == _out(model, inputs).shape


def test_pattern_keys_that_match_nothing_are_reported(llama):
    base, _ = llama
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys \['no_such_layer'\] matched no targeted module"):
        get_peft_model(base, LoraConfig(r=4, rank_pattern={"no_such_layer": 2, "q_proj": 2}))
