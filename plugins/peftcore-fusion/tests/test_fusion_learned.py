"""Learned fusion (AdapterFusion over LoRA adapters): the maths, what trains, files, mixed batches, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from fusion_helpers import randomize_adapters
from safetensors.torch import load_file

from peftcore import AdaLoraConfig, FusionConfig, FusionLayer, LoraConfig, PeftModel, get_peft_model
from peftcore.files import AdapterFileError
from peftcore.testing import perturb, tiny_model

MEMBERS = ["a", "b", "c"]


def _members(arch="llama", ranks=(4, 2, 3), task_type=None):
    base, inputs = tiny_model(arch)
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["query", "value"]
    model = None
    for name, r in zip(MEMBERS, ranks):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task_type)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    randomize_adapters(model, seed=4, scale=0.3)
    return model.eval(), inputs


def _logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def _fusion_layers(model):
    return [(k, m) for k, m in model.base_model.adapter_layers() if isinstance(m, FusionLayer)]


def test_a_fresh_fusion_with_flat_attention_is_the_average_of_its_members():
    """Q = K = 0 gives uniform attention and V = I: exactly task arithmetic with weights 1/3 (a linear delta)."""
    model, inputs = _members()
    _flat_fusion_is_the_average(model, inputs, MEMBERS)
    for _, layer in _fusion_layers(model):
        torch.testing.assert_close(layer.fusion_value["fusion"].weight, torch.eye(layer.features), atol=0, rtol=0)


def test_the_fusion_layer_computes_adapterfusion_attention():
    """One layer against a float64 computation written from the paper: members' outputs from their factors."""
    model, _ = _members()
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS, temperature=0.7))
    model.set_adapter("fusion")
    perturb(model.base_model.model, seed=9, scale=0.2)  # only the fusion's projections train: they move
    key, layer = _fusion_layers(model)[0]
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = layer(x).double()
    base = layer.get_base_layer()
    h = x.double() @ base.weight.double().T
    deltas = torch.stack([x.double() @ layer.base_layer.lora_A[m].weight.double().T
                          @ layer.base_layer.lora_B[m].weight.double().T * layer.base_layer.scaling[m]
                          for m in MEMBERS], dim=-2)
    q, k, v = (layer.fusion_query["fusion"], layer.fusion_key["fusion"], layer.fusion_value["fusion"])
    query = h @ q.weight.double().T + q.bias.double()
    keys = deltas @ k.weight.double().T + k.bias.double()
    alpha = torch.softmax(torch.einsum("bsd,bsnd->bsn", query, keys) / 0.7, dim=-1)
    expected = h + torch.einsum("bsn,bsnd->bsd", alpha, deltas) @ v.weight.double().T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_only_the_fusion_trains_and_the_value_regulariser_enters_the_loss():
    model, inputs = _members()
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS, value_regularization=0.5))
    model.set_adapter("fusion")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusion_" in k and k.endswith((".fusion.weight", ".fusion.bias")) for k in trainable)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    model.train()
    labels = inputs["input_ids"]
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    assert changed == trainable
    # the term is 0.5 * sum ||I - V||^2 over the fused layers: with V moved away from I it must show
    with torch.no_grad():
        reg = 0.5 * sum(layer.value_regularizer("fusion") for _, layer in _fusion_layers(model))
        plain = model.base_model.model(**inputs, labels=labels).loss  # the wrapped model: no hooks
        total = model(**inputs, labels=labels).loss
    assert reg > 0
    torch.testing.assert_close(total, plain + reg)


def test_save_and_load_round_trip_names_the_members_and_keeps_their_files_as_they_were(tmp_path):
    model, inputs = _members()
    model.save_pretrained(tmp_path / "before")
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS))
    model.set_adapter("fusion")
    perturb(model.base_model.model, seed=2, scale=0.3)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved/fusion/adapter_config.json").read_text())
    assert config["peft_type"] == "FUSION" and config["adapters"] == MEMBERS
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    fusion_keys = set(load_file(tmp_path / "saved/fusion/adapter_model.safetensors"))
    assert fusion_keys == {f"base_model.model.model.layers.{i}.self_attn.{m}.fusion_{p}.{t}" for i in range(2)
                           for m in ("q_proj", "v_proj") for p, ts in (("query", "wb"), ("key", "wb"), ("value", "w"))
                           for t in (("weight", "bias") if ts == "wb" else ("weight",))}
    for member in MEMBERS:  # the fusion wrapper does not show in the members' tensor names
        folder = "" if member == "default" else member
        before = load_file(tmp_path / "before" / folder / "adapter_model.safetensors")
        after = load_file(tmp_path / "saved" / folder / "adapter_model.safetensors")
        assert set(before) == set(after)
        assert all(torch.equal(before[k], after[k]) for k in before)
    fresh, _ = tiny_model("llama")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "saved/fusion", adapter_name="fusion")
    assert loaded.active_adapter == "fusion" and set(loaded.peft_config) == {"fusion", *MEMBERS}
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(_logits(loaded, inputs), expected, atol=1e-6, rtol=0)


def test_loading_a_fusion_without_its_members_says_which_are_missing(tmp_path):
    model, _ = _members()
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS))
    model.save_pretrained(tmp_path, selected_adapters=["fusion"])
    fresh, _ = tiny_model("llama")
    with pytest.raises(AdapterFileError, match=r"builds on adapters \['a', 'b', 'c'\] that the model does not hold"):
        PeftModel.from_pretrained(fresh, tmp_path / "fusion")


def test_mixed_batches_route_rows_to_fusion_members_and_base():
    model, inputs = _members()
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS))
    model.set_adapter("fusion")
    perturb(model.base_model.model, seed=2, scale=0.3)
    model.eval()
    ids = torch.cat([inputs["input_ids"], inputs["input_ids"].flip(1)])  # 4 rows
    names = ["fusion", "a", "__base__", "c"]
    mixed = _logits(model, {"input_ids": ids}, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = _logits(model, {"input_ids": ids[row:row + 1]})
        else:
            model.set_adapter(name)
            expected = _logits(model, {"input_ids": ids[row:row + 1]})
        torch.testing.assert_close(mixed[row:row + 1], expected, atol=1e-5, rtol=0)


def test_disable_adapter_gives_the_base_outputs():
    model, inputs = _members()
    with model.disable_adapter():
        base = _logits(model, inputs)
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS))
    model.set_adapter("fusion")
    assert not torch.allclose(_logits(model, inputs), base)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, inputs), base, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:Already unmerged")
def test_merging_a_fusion_adapter_is_refused_and_changes_nothing():
    model, inputs = _members()
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS))
    model.set_adapter("fusion")
    expected = _logits(model, inputs)
    with pytest.raises(ValueError, match="cannot be merged: its output mixes its member adapters with attention"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    assert not any(layer.merged for _, layer in model.base_model.adapter_layers())
    torch.testing.assert_close(_logits(model, inputs), expected, atol=0, rtol=0)
    model.merge_adapter(["a"])  # a member still merges into the base weights ...
    with pytest.raises(ValueError, match=r"adapters \['a'\] are merged .* unmerge_adapter\(\) first"):
        _logits(model, inputs)  # ... but then the fusion cannot see the base output
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model, inputs), expected, atol=1e-6, rtol=0)


def test_unload_removes_fusion_and_members_and_new_lora_adapters_still_go_in():
    model, inputs = _members()
    with model.disable_adapter():
        base = _logits(model, inputs)
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS))
    model.add_adapter("late", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # inside the fusion wrappers
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusionLayer) and layer.base_layer.has_adapter("late")
    plain = model.unload()
    assert not any("lora" in type(m).__name__.lower() or isinstance(m, FusionLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, base, atol=0, rtol=0)


def test_deleting_a_member_is_reported_by_the_fusion_and_deleting_the_fusion_leaves_members_working():
    model, inputs = _members()
    model.set_adapter("b")
    expected_b = _logits(model, inputs)
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS))
    model.delete_adapter("fusion")
    model.set_adapter("b")
    torch.testing.assert_close(_logits(model, inputs), expected_b, atol=0, rtol=0)
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS))
    model.set_adapter("fusion")
    model.delete_adapter("c")
    model.set_adapter("fusion")
    with pytest.raises(ValueError, match=r"fuses \['c'\], which were deleted"):
        _logits(model, inputs)


def test_bad_fusion_configs_are_refused_clearly():
    with pytest.raises(ValueError, match="at least two different adapters"):
        FusionConfig(adapters=["a"])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        FusionConfig(adapters=["a", "b"], temperature=0)
    model, _ = _members()
    with pytest.raises(ValueError, match=r"holds no LORA or ADALORA adapter named \['zz'\]"):
        model.add_adapter("fusion", FusionConfig(adapters=["a", "zz"]))
    assert set(model.peft_config) == set(MEMBERS)


def test_classification_fusion_trains_its_own_head_and_reloads(tmp_path):
    model, inputs = _members("bert", task_type="SEQ_CLS")
    model.add_adapter("fusion", FusionConfig(adapters=MEMBERS, task_type="SEQ_CLS"))
    model.set_adapter("fusion")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    head = "base_model.model.classifier.modules_to_save.fusion"
    assert {k for k in trainable if ".fusion_" not in k} == {f"{head}.weight", f"{head}.bias"}
    perturb(model.base_model.model, seed=3, scale=0.3)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    fresh, _ = tiny_model("bert")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "fusion", adapter_name="fusion")
    torch.testing.assert_close(_logits(loaded, inputs), expected, atol=1e-6, rtol=0)


def _flat_fusion_is_the_average(model, inputs, names) -> None:
    """A fusion with Q = K = 0 (uniform attention) and V = I gives the members' mean (task arithmetic, 1/n)."""
    model.add_adapter("fusion", FusionConfig(adapters=names, init_std=0.0))
    model.add_weighted_adapter(names, [1 / len(names)] * len(names), "average", combination_type="task_arithmetic")
    model.set_adapter("average")
    expected = _logits(model, inputs)
    model.set_adapter("fusion")
    torch.testing.assert_close(_logits(model, inputs), expected, atol=1e-5, rtol=0)


def test_fusion_over_adalora_members_is_uniform_when_flat():
    base, inputs = tiny_model("bert")
    model = get_peft_model(base, AdaLoraConfig(init_r=4, target_r=4, total_step=10, inference_mode=True), "a")
    model.add_adapter("b", AdaLoraConfig(init_r=2, target_r=2, total_step=10, inference_mode=True))
    randomize_adapters(model, seed=6, scale=0.5, marker=".lora_")
    _flat_fusion_is_the_average(model, inputs, ["a", "b"])


def test_fusion_over_embedding_members_is_uniform_when_flat():
    base, inputs = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["embed_tokens"]), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["embed_tokens"]))
    randomize_adapters(model, seed=6, scale=0.5, marker=".lora_embedding_")  # A starts at zero for embeddings
    _flat_fusion_is_the_average(model, inputs, ["a", "b"])
