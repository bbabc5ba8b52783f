"""get_/set_peft_model_state_dict, load_peft_weights and get_peft_config against peft's own functions."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch

from peftcore import (
    AdapterFileError,
    LoraConfig,
    get_peft_config,
    get_peft_model,
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
)
from peftcore.testing import perturb, tiny_model

peft = pytest.importorskip("peft")

CONFIG = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


@pytest.fixture
def pair():
    base, inputs = tiny_model("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIG), adapter_name="other")
    ours = get_peft_model(base, LoraConfig(**CONFIG), adapter_name="other")
    return ours, theirs, inputs


def _fill_by_name(model) -> None:
    """Each adapter parameter gets values drawn from a seed made of its own name (both libraries name them alike)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(
                    torch.randn(param.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
                )


def test_get_gives_peft_keys_and_values(pair):
    ours, theirs, _ = pair
    _fill_by_name(ours)
    _fill_by_name(theirs)
    mine = get_peft_model_state_dict(ours, adapter_name="other")
    reference = peft.get_peft_model_state_dict(theirs, adapter_name="other")
    assert sorted(mine) == sorted(reference) and len(mine) == 2 * 7 * 2
    for key in reference:
        assert torch.equal(mine[key], reference[key]), key


def test_set_loads_peft_tensors_and_reports_keys(pair):
    ours, theirs, inputs = pair
    perturb(theirs, seed=1, scale=0.1)
    result = set_peft_model_state_dict(
        ours, peft.get_peft_model_state_dict(theirs, adapter_name="other"), adapter_name="other"
    )
    assert result.unexpected_keys == [] and result.missing_keys == []
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-6, rtol=0)

    partial = dict(list(peft.get_peft_model_state_dict(theirs, adapter_name="other").items())[:3])
    partial["base_model.model.nowhere.lora_A.weight"] = torch.zeros(1)
    result = set_peft_model_state_dict(ours, partial, adapter_name="other")
    assert result.unexpected_keys == ["base_model.model.nowhere.lora_A.weight"]
    assert len(result.missing_keys) == 2 * 7 * 2 - 3


def test_state_dict_argument_supplies_the_values(pair):
    ours, _, _ = pair
    perturb(ours, seed=2, scale=0.1)
    full = {k: v.clone() * 2 for k, v in ours.state_dict().items()}
    doubled = get_peft_model_state_dict(ours, state_dict=full, adapter_name="other")
    plain = get_peft_model_state_dict(ours, adapter_name="other")
    assert sorted(doubled) == sorted(plain)
    for key in plain:
        torch.testing.assert_close(doubled[key], plain[key] * 2)


def test_bad_input_is_named(pair):
    ours, _, _ = pair
    tensors = get_peft_model_state_dict(ours, adapter_name="other")
    key = next(k for k in tensors if "lora_A" in k)
    before = {k: v.clone() for k, v in tensors.items()}
    wrong = {**tensors, key: torch.zeros(3, 3)}
    with pytest.raises(AdapterFileError, match="lora_A"):
        set_peft_model_state_dict(ours, wrong, adapter_name="other")
    after = get_peft_model_state_dict(ours, adapter_name="other")
    assert all(torch.equal(after[k], before[k]) for k in before)  # nothing was half-loaded
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        result = set_peft_model_state_dict(ours, wrong, adapter_name="other", ignore_mismatched_sizes=True)
    assert result.missing_keys == [key]
    with pytest.raises(ValueError, match="'default'.*other"):
        get_peft_model_state_dict(ours)
    with pytest.raises(TypeError, match="PeftModel"):
        get_peft_model_state_dict(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="peft.*PeftModel"):
        set_peft_model_state_dict(pair[1], tensors, adapter_name="other")  # peft's model, not ours


def test_prompt_tuning_state_dict_matches_peft():
    from peftcore import PromptTuningConfig

    base, _ = tiny_model("llama")
    ours = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    theirs = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    peft.set_peft_model_state_dict(theirs, get_peft_model_state_dict(ours))
    mine, reference = get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(reference) == ["prompt_embeddings"]
    assert torch.equal(mine["prompt_embeddings"], reference["prompt_embeddings"])


def test_load_peft_weights_reads_what_peft_reads(pair, tmp_path):
    _, theirs, _ = pair
    perturb(theirs, seed=3, scale=0.1)
    theirs.save_pretrained(tmp_path, selected_adapters=["other"])
    folder = tmp_path / "other"
    mine, reference = load_peft_weights(str(folder)), peft.load_peft_weights(str(folder), device="cpu")
    assert sorted(mine) == sorted(reference) and len(mine) == 2 * 7 * 2
    assert all(torch.equal(mine[k], reference[k]) for k in reference)

    mapping = {r"^model\.layers": "model.blocks"}
    mine = load_peft_weights(str(folder), key_mapping=mapping)
    reference = peft.load_peft_weights(str(folder), device="cpu", key_mapping=mapping)
    assert sorted(mine) == sorted(reference) and any(".blocks." in k for k in mine)
    with pytest.raises(AdapterFileError, match="nowhere: no such adapter folder"):
        load_peft_weights(str(tmp_path / "nowhere"))


def test_get_peft_config_builds_peft_configs():
    data = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM").to_dict()
    config = get_peft_config(data)
    assert isinstance(config, LoraConfig) and config.r == 8 and config.lora_alpha == 16
    assert set(config.target_modules) == {"q_proj", "v_proj"} and str(config.task_type) == "CAUSAL_LM"
    with pytest.raises(AdapterFileError, match="peft_type"):
        get_peft_config({"r": 8})
