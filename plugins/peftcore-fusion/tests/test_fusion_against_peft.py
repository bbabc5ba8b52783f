"""add_weighted_adapter against peft itself, on the same adapters (PEFT's files), for every deterministic type."""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import DENSITY_TYPES, largest_relative_gap, outputs, paired_models

DETERMINISTIC = ("svd", "linear", "cat", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd")
WEIGHTS = [0.7, -0.4, 1.3]  # a negative weight: PEFT puts its sign on the A side only


@pytest.mark.parametrize("arch", ["llama", "gpt2", "convnet"])  # Linear; Conv1D (fan_in_fan_out); Embedding + Conv2d
@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_equal_ranks_match_peft(arch, combination_type, tmp_path):
    theirs, ours, inputs = paired_models(arch, tmp_path)
    options = {"density": 0.4} if combination_type in DENSITY_TYPES else {}
    adapters = ["default", "b", "c"]
    theirs.add_weighted_adapter(adapters, WEIGHTS, "mix", combination_type=combination_type, **options)
    ours.add_weighted_adapter(adapters, WEIGHTS, "mix", combination_type=combination_type, **options)
    # the svd types come out of different (but equally exact) SVD routes: the product agrees to fp32 precision;
    # everything else is the same arithmetic
    tolerance = 2e-5 if combination_type.endswith("svd") else 1e-6
    assert largest_relative_gap(theirs, ours, "mix") <= tolerance
    expected, got = outputs(theirs, inputs, "mix"), outputs(ours, inputs, "mix")
    torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize(("combination_type", "options"), [
    ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3}), ("magnitude_prune_svd", {"density": 0.5, "svd_rank": 5}),
    ("ties_svd", {"density": 0.3, "majority_sign_method": "frequency", "svd_full_matrices": False}),
])
def test_different_ranks_match_peft(combination_type, options, tmp_path):
    theirs, ours, inputs = paired_models("llama", tmp_path, ranks=(4, 2, 6))
    theirs.add_weighted_adapter(["default", "b", "c"], WEIGHTS, "mix", combination_type=combination_type, **options)
    ours.add_weighted_adapter(["default", "b", "c"], WEIGHTS, "mix", combination_type=combination_type, **options)
    assert largest_relative_gap(theirs, ours, "mix") <= 2e-5
    torch.testing.assert_close(outputs(ours, inputs, "mix"), outputs(theirs, inputs, "mix"), atol=1e-4, rtol=0)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r


def test_ties_with_frequency_sign_election_matches_peft(tmp_path):
    theirs, ours, _ = paired_models("llama", tmp_path)
    for model in (theirs, ours):
        model.add_weighted_adapter(["default", "b", "c"], WEIGHTS, "mix", combination_type="ties", density=0.5,
                                   majority_sign_method="frequency")
    assert largest_relative_gap(theirs, ours, "mix") <= 1e-6


def test_a_single_adapter_is_rescaled_as_in_peft(tmp_path):
    theirs, ours, _ = paired_models("llama", tmp_path)
    for model in (theirs, ours):  # PEFT turns every type into "linear" for one adapter, even svd with svd_rank
        model.add_weighted_adapter(["b"], [2.5], "mix", combination_type="svd", svd_rank=2)
    assert largest_relative_gap(theirs, ours, "mix") <= 1e-6
    assert ours.peft_config["mix"].r == 4


def test_the_combined_adapter_saves_as_peft_does(tmp_path):
    from safetensors.torch import load_file

    theirs, ours, _ = paired_models("llama", tmp_path / "src")
    for model in (theirs, ours):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="cat")
        model.save_pretrained(tmp_path / type(model).__module__.split(".")[0], selected_adapters=["mix"])
    peft_file, our_file = (load_file(tmp_path / lib / "mix/adapter_model.safetensors") for lib in ("peft", "peftcore"))
    assert set(peft_file) == set(our_file)
    for key, tensor in peft_file.items():
        torch.testing.assert_close(our_file[key], tensor, atol=1e-6, rtol=0)
