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
    theirs = _maybe_include_all_linear_layers(
        PeftLoraConfig(target_modules="all-linear", task_type=TASK_TYPES[arch]), model
    )
    assert all_linear_names(model, TASK_TYPES[arch]) == set(theirs.target_modules)
    if arch in ("llama", "gpt2", "opt"):
        assert "lm_head" not in all_linear_names(model)


def _no_defaults(model_type):
    return None


def test_a_config_no_plugin_has_defaults_for_fails_clearly():
    """The core has no default targets of its own: LoRA's table belongs to peftcore-lora."""
    model, _ = tiny_model("llama")
    config = LayerConfig()
    with pytest.raises(ValueError, match="LayerConfig.target_modules is None and no installed plugin has a default "
                                         "for model_type 'llama'"):
        resolve_targets(config, model, _no_defaults)
    assert config.target_modules is None


def test_default_targets_come_from_the_callback_and_regex_defaults_stay_strings():
    model, _ = tiny_model("llama")
    asked = []
    config = LayerConfig()
    resolve_targets(config, model, lambda model_type: asked.append(model_type) or ["q_proj"])
    assert asked == ["llama"] and config.target_modules == {"q_proj"}
    config = LayerConfig()
    resolve_targets(config, model, lambda model_type: r".*\.q_proj")
    assert config.target_modules == r".*\.q_proj"


def test_all_linear_string_is_expanded_case_insensitively():
    model, _ = tiny_model("llama")
    lower, upper = LayerConfig(target_modules=ALL_LINEAR), LayerConfig(target_modules="ALL-LINEAR")
    resolve_targets(lower, model, _no_defaults)
    resolve_targets(upper, model, _no_defaults)
    assert lower.target_modules == upper.target_modules == all_linear_names(model)
    assert "model.layers.0.mlp.down_proj" in upper.target_modules and "lm_head" not in upper.target_modules


def test_no_match_message_names_targets_and_shows_module_names():
    model, _ = tiny_model("llama")
    message = describe_no_match(LayerConfig(target_modules=["query"]), model)
    assert "['query']" in message and "model.embed_tokens" in message


@pytest.mark.parametrize("kwargs, peft_wording", [
    (dict(target_modules=["nowhere"]), r"Target modules \{'nowhere'\} not found in the base model"),
    (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "No modules were targeted for adaptation"),
    (dict(target_modules=".*", exclude_modules=".*"), "All modules were excluded"),
    (dict(target_modules=["q_proj"], modules_to_save=["q_proj"]), "No modules were targeted for adaptation"),
])
def test_no_match_messages_start_with_peft_s_wording_for_each_cause(kwargs, peft_wording):
    """Scripts match on PEFT's first sentence; peftcore's details (module names) follow it."""
    import peft

    import peftcore

    for lib in (peftcore, peft):
        model, _ = tiny_model("llama")
        with pytest.raises(ValueError, match=peft_wording) as caught:
            lib.get_peft_model(model, lib.LoraConfig(**kwargs))
        if lib is peftcore:
            assert "q_proj" in str(caught.value) or "embed_tokens" in str(caught.value)  # names modules


def test_an_adapter_that_only_matches_modules_to_save_is_refused_like_peft():
    import peft

    import peftcore

    for lib in (peftcore, peft):
        model = lib.get_peft_model(tiny_model("llama")[0], lib.LoraConfig(target_modules=["q_proj"]))
        with pytest.raises(ValueError, match="No modules were targeted for adaptation"):
            model.add_adapter("other", lib.LoraConfig(target_modules=["nowhere"], modules_to_save=["lm_head"]))
