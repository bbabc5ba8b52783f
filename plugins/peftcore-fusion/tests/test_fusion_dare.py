"""DARE: the fraction kept, the 1/density rescaling, and reproducibility under a seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftcore import LoraConfig, get_peft_model

from peftcore_fusion.task_maths import randomly_pruned

DENSITY = 0.3


def _model_with_one_live_adapter():
    """One 64x64 Linear, adapters "default" (random, r=16) and "zero" (all zeros): a merge shows default's mask."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 64)), LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
    model.add_adapter("zero", LoraConfig(r=16, lora_alpha=16, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_()
        layer.lora_B["default"].weight.normal_()
        layer.lora_A["zero"].weight.zero_()
        layer.lora_B["zero"].weight.zero_()
    return model, layer


def test_randomly_pruned_draws_exactly_as_peft_does():
    from peft.utils.merge_utils import random_pruning

    tensor = torch.randn(300, 200)
    torch.manual_seed(11)
    theirs = random_pruning(tensor, DENSITY, rescale=True)
    torch.manual_seed(11)
    torch.testing.assert_close(randomly_pruned(tensor, DENSITY, None), theirs, atol=0, rtol=0)


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties"])
def test_dare_keeps_a_density_fraction_and_rescales_by_its_inverse(combination_type):
    model, layer = _model_with_one_live_adapter()
    model.add_weighted_adapter(["default", "zero"], [0.5, 1.0], "mix", combination_type=combination_type,
                               density=DENSITY, seed=3)
    root = (0.5 * layer.scaling["default"]) ** 0.5  # PEFT's weight on each factor: sqrt(w * s)
    for holder in (layer.lora_A, layer.lora_B):
        merged, source = holder["mix"].weight.detach(), holder["default"].weight
        kept = merged != 0
        n = kept.numel()
        assert abs(kept.float().mean().item() - DENSITY) < 4 * (DENSITY * (1 - DENSITY) / n) ** 0.5  # 4 sigma
        # what is kept is the source entry times sqrt(w s) / density, exactly (the zero adapter adds nothing)
        torch.testing.assert_close(merged[kept], (source.detach() * root / DENSITY)[kept], rtol=1e-6, atol=0)


def test_dare_is_reproducible_under_a_seed_whatever_the_global_rng():
    model, layer = _model_with_one_live_adapter()
    for name, seed, global_seed in (("one", 3, 1), ("two", 3, 2), ("three", 4, 1)):
        torch.manual_seed(global_seed)
        model.add_weighted_adapter(["default", "zero"], [0.5, 1.0], name, combination_type="dare_linear_svd",
                                   density=DENSITY, seed=seed)
    torch.testing.assert_close(layer.delta_weight("one"), layer.delta_weight("two"), atol=0, rtol=0)
    assert not torch.allclose(layer.delta_weight("one"), layer.delta_weight("three"))


def test_without_a_seed_dare_draws_from_the_global_rng_as_peft_does():
    model, layer = _model_with_one_live_adapter()
    for name in ("one", "two"):
        torch.manual_seed(7)
        model.add_weighted_adapter(["default", "zero"], [0.5, 1.0], name, combination_type="dare_ties", density=0.5)
    torch.testing.assert_close(layer.delta_weight("one"), layer.delta_weight("two"), atol=0, rtol=0)
