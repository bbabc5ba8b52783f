"""(IA)^3 adapters move between peft and peftcore unchanged, in both directions, with equal outputs."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from ia3_helpers import TASK_TYPES, logits, randomize_vectors, tiny_model
from safetensors import safe_open

import peftcore

ARCHS = ["bert", "gpt2", "llama", "t5"]
VARIANTS = {
    "defaults": dict(),
    "explicit": dict(
        target_modules=["k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        feedforward_modules=["up_proj", "down_proj"],
    ),
    "regex": dict(target_modules=r".*\.(k_proj|down_proj)", feedforward_modules=r".*\.down_proj"),
}


def _shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_saved_adapter_loads_in_peftcore(arch, tmp_path):
    theirs = peft.get_peft_model(tiny_model(arch)[0], peft.IA3Config(task_type=TASK_TYPES[arch])).eval()
    randomize_vectors(theirs)
    theirs.save_pretrained(tmp_path)
    base, inputs = tiny_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a missing or unexpected tensor would warn
        warnings.filterwarnings("ignore", message=".*Conv1D stores weights")
        ours = peftcore.PeftModel.from_pretrained(base, tmp_path)
    assert type(ours).__name__ == type(theirs).__name__
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(ours, inputs), logits(tiny_model(arch)[0], inputs))


@pytest.mark.parametrize("arch", ARCHS)
def test_peftcore_saved_adapter_loads_in_peft(arch, tmp_path):
    ours = peftcore.get_peft_model(tiny_model(arch)[0], peftcore.IA3Config(task_type=TASK_TYPES[arch])).eval()
    randomize_vectors(ours)
    ours.save_pretrained(tmp_path)
    base, inputs = tiny_model(arch)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_explicit_and_regex_targets_round_trip_through_peft(variant, tmp_path):
    options = VARIANTS[variant]
    ours = peftcore.get_peft_model(tiny_model("llama")[0], peftcore.IA3Config(task_type="CAUSAL_LM", **options)).eval()
    randomize_vectors(ours)
    ours.save_pretrained(tmp_path / "ours")
    base, inputs = tiny_model("llama")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), atol=1e-6, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    assert _shapes(tmp_path / "peft") == _shapes(tmp_path / "ours")


@pytest.mark.parametrize("arch", ARCHS)
def test_same_parameter_names_files_and_config_as_peft(arch, tmp_path):
    theirs = peft.get_peft_model(tiny_model(arch)[0], peft.IA3Config(task_type=TASK_TYPES[arch]))
    ours = peftcore.get_peft_model(tiny_model(arch)[0], peftcore.IA3Config(task_type=TASK_TYPES[arch]))
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.named_parameters() if p.requires_grad
    ]
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    assert _shapes(tmp_path / "ours") == _shapes(tmp_path / "peft")
    config_theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(config_ours) == set(config_theirs)
    for key in ("target_modules", "feedforward_modules", "modules_to_save"):  # peft lists sets unordered
        assert sorted(config_ours[key] or []) == sorted(config_theirs[key] or []), key
    for key in ("fan_in_fan_out", "init_ia3_weights", "task_type", "peft_type", "inference_mode"):
        assert config_ours[key] == config_theirs[key], key


@pytest.mark.parametrize("init", [True, False])
def test_one_seed_gives_peft_vectors_and_leaves_the_rng_in_step(init):
    results = []
    for lib in (peft, peftcore):
        base, _ = tiny_model("bert")
        torch.manual_seed(5)
        model = lib.get_peft_model(base, lib.IA3Config(task_type="SEQ_CLS", init_ia3_weights=init))
        results.append(({n: p.detach() for n, p in model.named_parameters() if ".ia3_l." in n}, torch.rand(3)))
    (theirs, their_next), (ours, our_next) = results
    assert list(ours) == list(theirs)
    for name, vector in ours.items():
        assert torch.equal(vector, theirs[name]), name
    assert torch.equal(our_next, their_next)
