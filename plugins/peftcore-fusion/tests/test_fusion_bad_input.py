"""add_weighted_adapter refuses bad input clearly, before it changes anything."""

from __future__ import annotations

import pytest
import torch

from peftcore import IA3Config, LoraConfig, get_peft_model, register_plugin, unregister_plugin
from peftcore.plugins import get_plugin_manager
from peftcore.testing import perturb, tiny_model


@pytest.fixture
def lora():
    base, _ = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return model


def _unchanged(model, names=("default", "b")):
    assert set(model.peft_config) == set(names)
    assert not any(".mix" in key for key, _ in model.named_parameters())


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(combination_type="average"), ValueError, "Unknown combination_type 'average'; choose one of svd"),
    (dict(combination_type="ties"), ValueError, "'ties' needs density"),
    (dict(combination_type="ties", density=0), ValueError, r"density must be in \(0, 1\]"),
    (dict(combination_type="dare_linear", density=1.5), ValueError, r"density must be in \(0, 1\]"),
    (dict(combination_type="dare_ties", density=-0.1), ValueError, r"density must be in \(0, 1\]"),
    (dict(combination_type="ties", density=0.5, majority_sign_method="mean"), ValueError, "majority_sign_method"),
    (dict(combination_type="svd", svd_rank=0), ValueError, "svd_rank must be a positive integer"),
    (dict(combination_type="svd", svd_clamp=2), ValueError, "svd_clamp must be a quantile"),
    (dict(combination_type="svd", svd_rnak=2), TypeError, r"unexpected options \['svd_rnak'\]"),
])
def test_bad_arguments(lora, kwargs, error, message):
    with pytest.raises(error, match=message):
        lora.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", **kwargs)
    _unchanged(lora)


def test_weights_of_the_wrong_length_or_kind(lora):
    with pytest.raises(ValueError, match="2 adapters but 3 weights"):
        lora.add_weighted_adapter(["default", "b"], [0.5, 0.5, 1.0], "mix")
    with pytest.raises(ValueError, match=r"weights must be finite numbers, got \[nan\]"):
        lora.add_weighted_adapter(["default", "b"], [float("nan"), 0.5], "mix")
    with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['nope'\]"):
        lora.add_weighted_adapter(["default", "nope"], [0.5, 0.5], "mix")
    _unchanged(lora)


def test_unequal_ranks_for_a_factor_wise_type_name_the_adapters_and_the_fix(lora):
    lora.add_adapter("small", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"ranks must be equal.*\{'default': 4, 'small': 2\}.*use 'cat', 'svd'"):
        lora.add_weighted_adapter(["default", "small"], [0.5, 0.5], "mix", combination_type="ties", density=0.5)
    _unchanged(lora, ("default", "b", "small"))


def test_dora_and_lora_bias_adapters_are_refused_with_the_reason(lora):
    lora.add_adapter("dora", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    with pytest.raises(ValueError, match="'dora' .* uses DoRA: .* not a low-rank product"):
        lora.add_weighted_adapter(["default", "dora"], [0.5, 0.5], "mix", combination_type="cat")
    lora.add_adapter("biased", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_bias=True))
    with pytest.raises(ValueError, match="'biased' .* lora_bias=True"):
        lora.add_weighted_adapter(["default", "biased"], [0.5, 0.5], "mix")
    _unchanged(lora, ("default", "b", "dora", "biased"))


def test_adapters_each_with_their_own_head_copy_cannot_be_merged():
    base, _ = tiny_model("bert")
    model = get_peft_model(base, LoraConfig(r=4, task_type="SEQ_CLS"))
    model.add_adapter("b", LoraConfig(r=4, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"each trains its own copy of .*classifier.*modules_to_save"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")


def test_ia3_adapters_refuse_the_low_rank_types_and_say_which_they_take():
    base, _ = tiny_model("llama")
    model = get_peft_model(base, IA3Config(task_type="CAUSAL_LM"))
    model.add_adapter("b", IA3Config(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="combine as 'linear' .* or 'task_arithmetic'.*'ties' prunes"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="ties", density=0.5)
    _unchanged(model)


def test_learned_fusion_adapters_cannot_be_combined(lora):
    from peftcore import FusionConfig

    lora.add_adapter("fused", FusionConfig(adapters=["default", "b"]))
    with pytest.raises(ValueError, match=r"\['fused'\] are learned fusion adapters: .* no weight change"):
        lora.add_weighted_adapter(["default", "fused"], [0.5, 0.5], "mix")


def test_without_peftcore_fusion_the_error_names_the_package(lora):
    plugin = get_plugin_manager().get_plugin("fusion")
    unregister_plugin(plugin)
    try:
        with pytest.raises(ImportError, match="peftcore-fusion package: pip install peftcore-fusion"):
            lora.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="cat")
    finally:
        register_plugin(plugin, "fusion")
    _unchanged(lora)
    perturb(lora.base_model.model)
    lora.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="cat")  # back again
    assert torch.isfinite(dict(lora.named_parameters())[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.mix.weight"]).all()
