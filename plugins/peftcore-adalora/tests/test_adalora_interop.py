"""AdaLoRA adapters move between peft and peftcore unchanged, in both directions, before and after rank allocation."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from adalora_helpers import TASK_TYPES, logits, randomize_adapters, tiny_model, train_with_allocation
from safetensors.torch import load_file

import peftcore

ARCHS = ["bert", "gpt2", "llama", "t5"]
SCHEDULE = dict(target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10, lora_alpha=8)
# (arch, init_r, seed): seeds picked so that ranks end uneven; llama/4/3 prunes one module to rank 0
ALLOCATIONS = [("bert", 6, 3), ("gpt2", 6, 3), ("llama", 6, 3), ("llama", 4, 3)]


def _build(lib, arch, seed=1, **options):
    """A fresh AdaLoRA model from ``lib`` (peft or peftcore); one seed gives both libraries the same init."""
    base, inputs = tiny_model(arch)
    torch.manual_seed(seed)
    config = lib.AdaLoraConfig(task_type=TASK_TYPES[arch], **{"total_step": 10, **options})
    return lib.get_peft_model(base, config).eval(), inputs


def _load_quietly(arch, path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a missing or unexpected tensor would warn
        warnings.filterwarnings("ignore", message=".*Conv1D stores weights")
        return peftcore.PeftModel.from_pretrained(tiny_model(arch)[0], path)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_parameters_and_initial_values_as_peft(arch):
    theirs, _ = _build(peft, arch)
    ours, _ = _build(peftcore, arch)
    their_params, our_params = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert list(our_params) == list(their_params)
    for name, param in our_params.items():
        assert param.requires_grad == their_params[name].requires_grad, name
        assert torch.equal(param, their_params[name]), name
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_saved_adapter_loads_in_peftcore(arch, tmp_path):
    theirs, inputs = _build(peft, arch)
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ours = _load_quietly(arch, tmp_path)
    assert type(ours).__name__ == type(theirs).__name__
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(ours, inputs), logits(tiny_model(arch)[0], inputs), atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_peftcore_saved_adapter_loads_in_peft(arch, tmp_path):
    ours, inputs = _build(peftcore, arch)
    randomize_adapters(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch)[0], tmp_path)
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("arch", "init_r", "seed"), ALLOCATIONS)
def test_rank_allocation_matches_peft_step_for_step_and_files_cross_load(arch, init_r, seed, tmp_path):
    """Same seed, same data: peft and peftcore train, allocate and save identically; each loads the other's files."""
    theirs, inputs = _build(peft, arch, seed=seed, init_r=init_r, **SCHEDULE)
    ours, _ = _build(peftcore, arch, seed=seed, init_r=init_r, **SCHEDULE)
    their_losses = train_with_allocation(theirs, inputs, steps=SCHEDULE["total_step"] + 1)
    our_losses = train_with_allocation(ours, inputs, steps=SCHEDULE["total_step"] + 1)
    assert our_losses == pytest.approx(their_losses, abs=1e-5)  # includes the orthogonality term in both
    their_pattern = theirs.peft_config["default"].rank_pattern
    assert ours.peft_config["default"].rank_pattern == their_pattern
    kept = [sum(mask) for mask in their_pattern.values()]
    assert sum(kept) == SCHEDULE["target_r"] * len(kept) and len(set(kept)) > 1  # a non-trivial allocation

    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    their_files, our_files = (
        load_file(tmp_path / "peft" / "adapter_model.safetensors"),
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
    )
    assert {k: v.shape for k, v in our_files.items()} == {k: v.shape for k, v in their_files.items()}
    for key, tensor in our_files.items():
        torch.testing.assert_close(tensor, their_files[key], atol=1e-5, rtol=1e-4)
    their_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_config) == set(their_config)
    assert our_config["rank_pattern"] == their_config["rank_pattern"]

    loaded_ours = _load_quietly(arch, tmp_path / "peft")
    torch.testing.assert_close(logits(loaded_ours, inputs), logits(theirs, inputs), atol=1e-6, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # peft warns about its own rank_pattern keys on load
        loaded_theirs = peft.PeftModel.from_pretrained(tiny_model(arch)[0], tmp_path / "ours")
    torch.testing.assert_close(logits(loaded_theirs, inputs), logits(ours, inputs), atol=1e-6, rtol=0)
    our_shapes = {n: p.shape for n, p in loaded_ours.named_parameters()}
    assert our_shapes == {n: p.shape for n, p in loaded_theirs.named_parameters()}


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_biases_match_peft_and_cross_load(bias, tmp_path):
    theirs, inputs = _build(peft, "bert", bias=bias)
    ours, _ = _build(peftcore, "bert", bias=bias)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.named_parameters() if p.requires_grad
    ]
    with torch.no_grad():
        for model in (theirs, ours):
            randomize_adapters(model)
            for name, param in model.named_parameters():
                if name.endswith(".bias") and param.requires_grad:
                    param.add_(0.5)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    their_keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    # peft's bias="all" also writes the head copies' biases under internal names; they load back to nothing
    their_keys -= {
        "base_model.model.classifier.modules_to_save.bias",
        "base_model.model.classifier.original_module.bias",
    }
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == their_keys
    loaded_ours = _load_quietly("bert", tmp_path / "peft")
    torch.testing.assert_close(logits(loaded_ours, inputs), logits(theirs, inputs), atol=1e-6, rtol=0)
    loaded_theirs = peft.PeftModel.from_pretrained(tiny_model("bert")[0], tmp_path / "ours")
    torch.testing.assert_close(logits(loaded_theirs, inputs), logits(ours, inputs), atol=1e-6, rtol=0)
