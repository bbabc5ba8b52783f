"""An operation that fails part-way, or a ``disable_adapter()`` block that ends, leaves the model exactly as it was.

Each test compares, field by field, a record taken before and after: the adapters
(configs, module types), the active adapter (model and every layer), which
parameters train, train/eval modes, the merged state, every tensor bit for bit, and
the outputs. Models are tested plain, frozen (``inference_mode``) and merged.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import safetensors.torch
import torch
from torch import nn

from peftcore import AdapterFileError, AdapterLayer, LoraConfig, PeftModel, get_peft_model
from peftcore.testing import tiny_model

TARGETS = ["query", "value"]
STATES = ["plain", "frozen", "merged", "merged-frozen"]


def record(model: nn.Module, inputs: dict) -> dict:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)  # dropout in training mode draws the same masks each time
        outputs = model(**inputs).logits.clone()
    return {
        "adapters": sorted(model.peft_config) if isinstance(model, PeftModel) else [],
        "module types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "active adapters": list(model.active_adapters) if isinstance(model, PeftModel) else [],
        "active per layer": {n: layer.active_adapters for n, layer in layers.items()},
        "disabled per layer": {n: layer.disable_adapters for n, layer in layers.items()},
        "trainable": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "merged": {n: list(layer.merged_adapters) for n, layer in layers.items()},
        "tensors": {n: t.detach().clone() for n, t in model.state_dict().items()},
        "outputs": outputs,
    }


def assert_unchanged(before: dict, after: dict) -> None:
    for field in before:
        if field == "tensors":
            assert before[field].keys() == after[field].keys(), field
            for name, tensor in before[field].items():
                torch.testing.assert_close(after[field][name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)
        elif field == "outputs":
            torch.testing.assert_close(after[field], before[field], rtol=0, atol=0, equal_nan=True)
        else:
            assert after[field] == before[field], field


def _fill(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def build(state: str):
    """BERT for SEQ_CLS (so the classifier is a modules_to_save copy) with adapters "default" and "b"."""
    base, inputs = tiny_model("bert")
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=TARGETS))
    model.add_adapter("b", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=TARGETS))
    _fill(model, seed=1)
    model.train()
    if "frozen" in state:
        model.set_adapter("default", inference_mode=True)
        model.eval()
    if "merged" in state:
        model.merge_adapter()
    return model, inputs


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    """A saved adapter for the same BERT (r=2 on query/value), with its own non-zero weights."""
    base, _ = tiny_model("bert")
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=TARGETS))
    _fill(model, seed=2)
    folder = tmp_path_factory.mktemp("saved") / "adapter"
    model.save_pretrained(folder)
    return folder


def _copy_folder(folder, tmp_path, edit_config=None, edit_tensors=None):
    out = tmp_path / "edited"
    out.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    tensors = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    safetensors.torch.save_file(edit_tensors(tensors) if edit_tensors else tensors, out / "adapter_model.safetensors")
    return out


BAD_FOLDERS = {
    "shapes differ (r=4 in the config, r=2 in the file)": dict(edit_config=lambda c: {**c, "r": 4}),
    "integer tensors": dict(edit_tensors=lambda t: {k: (v * 100).to(torch.int32) for k, v in t.items()}),
    "boolean tensors": dict(edit_tensors=lambda t: {k: v > 0 for k, v in t.items()}),
    "no tensor fits": dict(edit_tensors=lambda t: {k.replace("base_model.model.", "model."): v for k, v in t.items()}),
    "a bad config value": dict(edit_config=lambda c: {**c, "lora_alpha": "16"}),
    "a target that cannot be wrapped, after others were": dict(
        edit_config=lambda c: {**c, "target_modules": ["query", "LayerNorm"]}),
}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("problem", list(BAD_FOLDERS))
def test_a_failed_load_adapter_changes_nothing(adapter_folder, tmp_path, state, problem):
    model, inputs = build(state)
    folder = _copy_folder(adapter_folder, tmp_path, **BAD_FOLDERS[problem])
    before = record(model, inputs)
    with pytest.raises((AdapterFileError, ValueError)):
        model.load_adapter(folder, adapter_name="new", is_trainable=True)
    assert_unchanged(before, record(model, inputs))
    model.load_adapter(adapter_folder, adapter_name="new")  # and the name is free for a good load


@pytest.mark.parametrize("state", STATES)
def test_a_failed_add_adapter_changes_nothing(state):
    model, inputs = build(state)
    before = record(model, inputs)
    # query layers get the adapter and pooler a trainable copy before the LayerNorm fails
    config = LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "LayerNorm"], modules_to_save=["pooler"])
    with pytest.raises(ValueError, match="LayerNorm.*cannot wrap"):
        model.add_adapter("new", config)
    assert_unchanged(before, record(model, inputs))


@pytest.mark.parametrize("state", ["plain", "frozen"])
def test_a_safe_merge_that_fails_in_the_last_layer_changes_nothing(state):
    model, inputs = build(state)
    last = [m for m in model.modules() if isinstance(m, AdapterLayer)][-1]
    with torch.no_grad():
        last.lora_B["default"].weight.fill_(3e38)  # overflows to inf when merged
    before = record(model, inputs)
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert_unchanged(before, record(model, inputs))


def test_a_merge_that_fails_for_want_of_a_bias_changes_nothing():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, bias=False))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "1"], lora_bias=True))
    _fill(model, seed=3)
    inputs = torch.randn(3, 4)

    def outputs():
        with torch.no_grad():
            return model(inputs).clone()

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = outputs()
    with pytest.raises(ValueError, match="into 1: it changes the bias, but the base layer has none"):
        model.merge_adapter()
    assert not any(m.merged for m in model.modules() if isinstance(m, AdapterLayer))
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name
    assert torch.equal(outputs(), expected)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("names", ["missing", ["default", "b"]], ids=["unknown", "two with modules_to_save"])
def test_a_failed_set_adapter_changes_nothing(state, names):
    model, inputs = build(state)
    before = record(model, inputs)
    with pytest.raises(ValueError):
        model.set_adapter(names)
    assert_unchanged(before, record(model, inputs))


@pytest.mark.parametrize("state", STATES)
def test_a_failed_delete_adapter_changes_nothing(state):
    model, inputs = build(state)
    before = record(model, inputs)
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("missing")
    if "merged" in state:
        with pytest.raises(ValueError, match="while they are merged"):
            model.delete_adapter("default")
    assert_unchanged(before, record(model, inputs))


def test_deleting_an_inactive_adapter_keeps_the_model_merged():
    model, inputs = build("merged-frozen")
    before = record(model, inputs)
    model.delete_adapter("b")
    after = record(model, inputs)
    assert after["merged"] == before["merged"] and after["trainable"] == {
        n: t for n, t in before["trainable"].items() if ".b." not in n and not n.endswith(".b")
    }
    torch.testing.assert_close(after["outputs"], before["outputs"], rtol=0, atol=0)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("raises", [False, True], ids=["block ends", "block raises"])
def test_disable_adapter_puts_everything_back(state, raises):
    model, inputs = build(state)
    base_only, _ = tiny_model("bert")  # the same seeded weights, without adapters
    base_only.train(model.training)
    before = record(model, inputs)
    with pytest.raises(RuntimeError) if raises else contextlib.nullcontext():
        with model.disable_adapter():
            inside = record(model, inputs)["outputs"]
            if raises:
                raise RuntimeError("inside the block")
    assert_unchanged(before, record(model, inputs))
    expected = record(base_only, inputs)["outputs"]
    # unmerging subtracts what merging added: equal up to float rounding when the model was merged
    tolerance = 1e-5 if "merged" in state else 0
    torch.testing.assert_close(inside, expected, rtol=0, atol=tolerance)


def test_a_failed_from_pretrained_gives_the_base_model_back(adapter_folder, tmp_path):
    base, inputs = tiny_model("bert")
    base.classifier.weight.requires_grad_(True)
    pristine = copy.deepcopy(base)
    folder = _copy_folder(adapter_folder, tmp_path, **BAD_FOLDERS["integer tensors"])
    before = record(base, inputs)
    with pytest.raises(AdapterFileError, match="is int32"):
        PeftModel.from_pretrained(base, folder)
    assert_unchanged(before, record(base, inputs))
    assert [type(m) for m in base.modules()] == [type(m) for m in pristine.modules()]


def test_a_prompt_learning_model_is_put_back_too(tmp_path):
    from peftcore import PromptTuningConfig

    base, inputs = tiny_model("bert")
    model = get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    model.save_pretrained(tmp_path / "saved")
    model.set_adapter("default", inference_mode=True)  # frozen: neither the prompt nor the classifier copy trains
    before = record(model, inputs)
    with model.disable_adapter():
        pass
    assert_unchanged(before, record(model, inputs))
    bad = _copy_folder(tmp_path / "saved", tmp_path, **BAD_FOLDERS["integer tensors"])
    with pytest.raises(AdapterFileError, match="is int32"):
        model.load_adapter(bad, adapter_name="other", is_trainable=True)
    assert_unchanged(before, record(model, inputs))
