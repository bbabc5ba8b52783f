"""Target matching against PEFT's own implementation of the same rules."""

from __future__ import annotations

import copy

import pytest
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

from peftcore import LayerConfig
from peftcore.matching import ALL_LINEAR, all_linear_names, describe_no_match, matches_target, resolve_targets
from peftcore.testing import TASK_TYPES, tiny_model

MODULE_NAMES = [
    "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
    "model.layers.12.mlp.up_proj", "model.layers.3.self_attn.q_proj", "encoder.block.2.layer.0.SelfAttention.q",
    "transformer.h.1.attn.c_attn", "lm_head", "q_proj", "my_q_proj", "model.decoder.layers.2.fc1",
]

CASES = [
    dict(target_modules=["q_proj"]),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.1.self_attn.q_proj"]),
    dict(target_modules=["q_proj", "up_proj"], exclude_modules="model\\.layers\\.(0|12)\\..*"),
    dict(target_modules=".*layers\\.\\d+\\.self_attn\\.(q|v)_proj"),
    dict(target_modules=["q_proj"], layers_to_transform=[0, 3]),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=12, layers_pattern="layers"),
    dict(target_modules=["q", "c_attn", "fc1"], layers_to_transform=[1, 2], layers_pattern=["block", "h", "layers"]),
    dict(target_modules=["q_proj", "v_proj"], modules_to_save=["v_proj"]),
    dict(target_modules=["lm_head", "q_proj"], exclude_modules=["lm_head"]),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_name_rules_agree_with_peft(case):
    ours = LayerConfig(**copy.deepcopy(case))
    theirs = PeftLoraConfig(**copy.deepcopy(case))
    for key in MODULE_NAMES:
        assert matches_target(ours, key) == bool(check_target_module_exists(theirs, key)), key


def test_regex_is_a_full_match():
    config = LayerConfig(target_modules="q_proj")
    assert matches_target(config, "q_proj")
    assert not matches_target(config, "model.layers.0.self_attn.q_proj")


def test_list_matches_exact_name_or_dotted_suffix_only():
    config = LayerConfig(target_modules=["q_proj"])
    assert matches_target(config, "a.b.q_proj")
    assert not matches_target(config, "a.b.my_q_proj")


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ValueError, match="layers_to_transform"):
        LayerConfig(target_modules=["q"], layers_pattern="layers")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5", "opt"])
def test_all_linear_agrees_with_peft(arch):
    model, _ = tiny_model(arch)
    theirs = _maybe_include_all_linear_layers(PeftLoraConfig(target_modules="all-linear", task_type=TASK_TYPES[arch]), model)
    assert all_linear_names(model, TASK_TYPES[arch]) == set(theirs.target_modules)
    if arch in ("llama", "gpt2", "opt"):
        assert "lm_head" not in all_linear_names(model)


EXPECTED_DEFAULTS = {  # PEFT's table (distilbert: q_lin/v_lin, as PEFT's docs give for DistilBERT)
    "bert": {"query", "value"}, "roberta": {"query", "value"}, "distilbert": {"q_lin", "v_lin"}, "gpt2": {"c_attn"},
    "llama": {"q_proj", "v_proj"}, "mistral": {"q_proj", "v_proj"}, "qwen2": {"q_proj", "v_proj"},
    "gemma": {"q_proj", "v_proj"}, "gemma3": {"q_proj", "v_proj"}, "t5": {"q", "v"}, "bart": {"q_proj", "v_proj"},
    "opt": {"q_proj", "v_proj"},
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_DEFAULTS))
def test_default_targets_per_architecture(arch):
    model, _ = tiny_model(arch)
    config = LayerConfig()
    resolve_targets(config, model)
    assert config.target_modules == EXPECTED_DEFAULTS[arch]
    matched = [name for name, _ in model.named_modules() if matches_target(config, name)]
    assert matched, f"the default targets of {arch} match nothing"


def test_default_targets_unknown_architecture_is_a_clear_error():
    import torch

    config = LayerConfig()
    with pytest.raises(ValueError, match="no default for model_type None"):
        resolve_targets(config, torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_all_linear_string_is_expanded_case_insensitively():
    model, _ = tiny_model("llama")
    config = LayerConfig(target_modules="ALL-LINEAR")
    resolve_targets(config, model)
    assert "model.layers.0.mlp.down_proj" in config.target_modules
    assert ALL_LINEAR == "all-linear"


def test_no_match_message_names_targets_and_shows_module_names():
    model, _ = tiny_model("llama")
    message = describe_no_match(LayerConfig(target_modules=["query"]), model)
    assert "['query']" in message and "model.embed_tokens" in message
