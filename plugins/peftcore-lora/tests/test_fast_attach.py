"""Attaching and adding adapters: flat cost in the number of adapters, same state as before.

Cost is counted in Python function calls (deterministic, unlike wall time on a shared
machine); the state is compared with what a full model-wide ``set_adapter`` gives.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from peftcore import LoraConfig, get_peft_model
from peftcore.layer_tuner import WRAPPERS
from peftcore.testing import tiny_model
from peftcore.walking import walk_modules


def _count_calls(fn) -> int:
    calls = 0

    def profiler(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def _config(**kwargs):
    return LoraConfig(r=2, target_modules="all-linear", **kwargs)


def test_adding_the_16th_adapter_costs_no_more_than_the_2nd():
    base, _ = tiny_model("llama")
    model = get_peft_model(base, _config())
    counts = {}
    for i in range(2, 17):
        config = _config()
        torch.manual_seed(i)  # same random draws per adapter
        counts[i] = _count_calls(lambda: model.add_adapter(f"a{i}", config))
    assert counts[16] <= counts[2] * 1.02, counts


def test_flags_and_active_state_after_adding_equal_a_full_set_adapter():
    base, inputs = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.add_adapter("c", LoraConfig(r=2, target_modules=["v_proj"], inference_mode=True))
    model.add_adapter("d", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    reference = copy.deepcopy(model)
    reference.base_model.set_adapter(reference.active_adapter)  # the old, model-wide way
    for name in ("c",):  # inference-mode adapters stay frozen in both
        reference.base_model._freeze_adapter(name)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    expected = {n: p.requires_grad for n, p in reference.named_parameters()}
    assert flags == expected
    layers = dict(model.base_model.adapter_layers())
    for key, layer in reference.base_model.adapter_layers():
        assert layers[key].active_adapters == layer.active_adapters, key
    trainable = sorted(n for n, on in flags.items() if on)
    assert trainable and all(".a." in n or "modules_to_save.a" in n for n in trainable), trainable
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=0, rtol=0)


def test_adding_to_a_merged_model_unmerges_first():
    base, inputs = tiny_model("llama")
    model = get_peft_model(base, _config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
        unmerged = model(**inputs).logits
        model.merge_adapter()
        with pytest.warns(UserWarning, match="unmerging"):
            model.add_adapter("second", _config())
        assert not any(layer.merged for _, layer in model.base_model.adapter_layers())
        torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_walk_modules_is_named_modules_without_adapter_holders(arch):
    base, _ = tiny_model(arch)
    model = get_peft_model(base, _config(task_type="SEQ_CLS" if arch == "bert" else None), adapter_name="a")
    model.add_adapter("b", _config())
    root = model.base_model.model
    holders = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout")
    expected = [n for n, _ in root.named_modules() if not any(f".{h}." in f".{n}." for h in holders)]
    assert [n for n, _ in walk_modules(root)] == expected
    inside_wrappers = [n for n, m in walk_modules(root, stop_at=WRAPPERS)]
    wrapper_names = [n for n, m in root.named_modules() if isinstance(m, WRAPPERS)]
    assert wrapper_names and all(w in inside_wrappers for w in wrapper_names)
    assert not any(n.startswith(f"{w}.") for w in wrapper_names for n in inside_wrappers)


def test_all_linear_on_a_model_with_adapters_still_names_the_same_modules():
    base, _ = tiny_model("llama")
    model = get_peft_model(base, _config(), adapter_name="a")
    first = set(model.peft_config["a"].target_modules)
    config = _config()
    model.add_adapter("b", config)
    assert set(config.target_modules) == first
    assert "lm_head" not in first and len(first) == 2 * 7


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_adapter_view_is_the_state_dict_without_other_adapters(arch):
    from peftcore.serialization import adapter_view_state_dict

    base, _ = tiny_model(arch)
    task = "SEQ_CLS" if arch == "bert" else None  # bert: also a modules_to_save copy per adapter
    model = get_peft_model(base, _config(task_type=task), adapter_name="a")
    model.add_adapter("b", _config(task_type=task))
    full = model.state_dict(keep_vars=True)
    view = adapter_view_state_dict(model, "a")
    assert set(view) == {k for k in full if ".b." not in k}
    assert all(view[k] is full[k] for k in view)

    model.get_base_model().register_state_dict_post_hook(lambda *args: None)  # hooks may rename keys:
    assert set(adapter_view_state_dict(model, "a")) == set(full)  # then state_dict() itself is used


def test_load_adapter_into_a_model_with_many_adapters_costs_the_same(tmp_path):
    base, inputs = tiny_model("llama")
    model = get_peft_model(base, _config())
    model.save_pretrained(tmp_path)
    counts = []
    for i in range(12):
        torch.manual_seed(0)
        # is_trainable=False ends in model.eval(), which visits every module of every adapter (as in PEFT)
        calls = _count_calls(lambda: model.load_adapter(tmp_path, adapter_name=f"x{i}", is_trainable=True))
        if i in (0, 11):
            counts.append(calls)
    assert counts[1] <= counts[0] * 1.02, counts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_weights_are_written_once_and_well_formed(arch):
    """Built on the meta device: every value must still come from an initialiser, never from empty memory."""
    base, _ = tiny_model(arch)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules="all-linear", lora_bias=True, fan_in_fan_out=arch == "gpt2")
    )
    for name, layer in model.base_model.adapter_layers():
        a = layer.lora_A["default"].weight
        b, b_bias = layer.lora_B["default"].weight, layer.lora_B["default"].bias
        bound = 1 / a.shape[1] ** 0.5  # kaiming_uniform_(a=sqrt(5)) on (r, in)
        assert torch.isfinite(a).all() and a.abs().max() <= bound and a.abs().max() > bound / 4, name
        assert torch.equal(b, torch.zeros_like(b)) and torch.equal(b_bias, torch.zeros_like(b_bias)), name


def test_init_false_still_matches_peft_seed_for_seed():
    """init_lora_weights=False keeps the modules' own init (random B), drawn in PEFT's order."""
    peft = pytest.importorskip("peft")
    base, _ = tiny_model("llama")
    other = copy.deepcopy(base)
    torch.manual_seed(3)
    ours = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(reference)
    for key in reference:
        assert torch.equal(mine[key], reference[key]), key
    assert any("lora_B" in k and mine[k].abs().sum() > 0 for k in mine)


def test_gaussian_init_draws_a_from_n_0_1_over_r():
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(400, 300)),
        LoraConfig(r=8, target_modules=["0"], init_lora_weights="gaussian"),
    )
    a = model.base_model.model[0].lora_A["default"].weight
    assert abs(a.std().item() - 1 / 8) < 0.01 and abs(a.mean().item()) < 0.01


@pytest.mark.parametrize("bias", [False, True])
def test_bare_linear_has_nn_linears_layout(bias):
    """Guards _bare_linear against torch adding state to nn.Linear.__init__."""
    from peftcore_lora.layer import _bare_linear

    bare, real = _bare_linear(7, 3, bias=bias), torch.nn.Linear(7, 3, bias=bias)
    assert type(bare) is torch.nn.Linear
    assert set(vars(bare)) == set(vars(real))
    assert {k: v is None for k, v in bare._parameters.items()} == {k: v is None for k, v in real._parameters.items()}
    assert bare.weight.shape == real.weight.shape and bare.weight.dtype == real.weight.dtype
    assert repr(bare) == repr(real)
