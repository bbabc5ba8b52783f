"""Where peftcore is exact and peft is not: factored SVD, task_arithmetic, and what PEFT's linear really computes.

Every expected value is computed independently in float64 from the adapters' factors.
"""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import float64_delta, our_layers, paired_models

from peftcore.layer import LowRankDelta

from peftcore_fusion.low_rank import factored_svd

WEIGHTS = [0.7, -0.4, 1.3]


def _random_deltas(out_features=37, fan_in=53, ranks=(3, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [LowRankDelta(up=torch.randn(out_features, r, generator=g), down=torch.randn(r, fan_in, generator=g),
                         scale=0.5 + i) for i, r in enumerate(ranks)]


def _dense64(deltas, weights):
    return sum(w * (d.up.double() @ d.down.double()) * d.scale for d, w in zip(deltas, weights))


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_factored_svd_equals_the_dense_float64_svd(rank):
    deltas = _random_deltas()
    dense = _dense64(deltas, WEIGHTS)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    up, down, singular = factored_svd(deltas, WEIGHTS, rank)
    assert up.dtype == down.dtype == torch.float32 and up.shape == (37, rank) and down.shape == (rank, 53)
    torch.testing.assert_close(singular.double(), s[:12], rtol=2e-6, atol=2e-6 * s[0].item())
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]  # Eckart-Young: the best rank-k approximation
    torch.testing.assert_close((up @ down).double(), best, rtol=0, atol=2e-6 * dense.abs().max().item())
    # the singular vectors are orthonormal, with S carried on the up side (PEFT's convention)
    torch.testing.assert_close(down @ down.T, torch.eye(rank), atol=1e-5, rtol=0)


def test_factored_svd_handles_linearly_dependent_adapters():
    """Two adapters sharing B (a rank-deficient stack): QR needs no inverse, so nothing blows up."""
    (one,) = _random_deltas(ranks=(4,))
    twin = LowRankDelta(up=one.up, down=torch.randn(4, 53, generator=torch.Generator().manual_seed(5)), scale=1.0)
    up, down, singular = factored_svd([one, twin], [1.0, 1.0], 8)
    dense = _dense64([one, twin], [1.0, 1.0])
    torch.testing.assert_close((up @ down).double(), dense, rtol=0, atol=2e-6 * dense.abs().max().item())
    assert singular[4:].abs().max() < 1e-5 * singular[0]  # rank 4, not 8


def test_svd_never_builds_the_dense_delta(tmp_path, monkeypatch):
    _, ours, _ = paired_models("llama", tmp_path, ranks=(4, 2, 6))

    def no_dense(self):
        raise AssertionError("the factored path formed a dense delta")

    monkeypatch.setattr(LowRankDelta, "matrix", no_dense)
    ours.add_weighted_adapter(["default", "b", "c"], WEIGHTS, "mix", combination_type="svd", svd_rank=5)
    for layer in our_layers(ours).values():
        expected = sum(w * float64_delta(layer, a) for a, w in zip(["default", "b", "c"], WEIGHTS))
        u, s, vh = torch.linalg.svd(expected)
        best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
        torch.testing.assert_close(float64_delta(layer, "mix"), best, rtol=0, atol=1e-5 * best.abs().max().item())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "convnet"])
def test_task_arithmetic_is_exactly_the_weighted_sum_at_rank_sum(arch, tmp_path):
    _, ours, inputs = paired_models(arch, tmp_path, ranks=(4, 2, 6))
    ours.add_weighted_adapter(["default", "b", "c"], WEIGHTS, "ta", combination_type="task_arithmetic")
    assert ours.peft_config["ta"].r == 12
    for key, layer in our_layers(ours).items():
        expected = sum(w * float64_delta(layer, a) for a, w in zip(["default", "b", "c"], WEIGHTS))
        torch.testing.assert_close(float64_delta(layer, "ta"), expected, rtol=0, atol=1e-6 * expected.abs().max())
        assert layer.low_rank_delta("ta").rank == 12, key


def test_task_arithmetic_compressed_is_the_best_low_rank_approximation(tmp_path):
    _, ours, _ = paired_models("llama", tmp_path, ranks=(4, 2, 6))
    ours.add_weighted_adapter(["default", "b", "c"], WEIGHTS, "ta", combination_type="task_arithmetic", svd_rank=3)
    for layer in our_layers(ours).values():
        exact = sum(w * float64_delta(layer, a) for a, w in zip(["default", "b", "c"], WEIGHTS))
        u, s, vh = torch.linalg.svd(exact)
        torch.testing.assert_close(float64_delta(layer, "ta"), u[:, :3] @ torch.diag(s[:3]) @ vh[:3], rtol=0,
                                   atol=1e-5 * exact.abs().max().item())


def test_linear_is_peft_definition_with_cross_terms_not_the_weighted_sum(tmp_path):
    """PEFT's linear: (Σ √|wᵢsᵢ| Bᵢ)(Σ sign(wᵢsᵢ)√|wᵢsᵢ| Aᵢ), which differs from Σ wᵢ ΔWᵢ by B_i A_j terms."""
    _, ours, _ = paired_models("llama", tmp_path)
    names = ["default", "b", "c"]
    ours.add_weighted_adapter(names, WEIGHTS, "lin", combination_type="linear")
    ours.add_weighted_adapter(names, WEIGHTS, "ta", combination_type="task_arithmetic")
    for layer in our_layers(ours).values():
        parts = [layer.low_rank_delta(n) for n in names]
        ws = [w * p.scale for p, w in zip(parts, WEIGHTS)]
        b = sum(abs(w) ** 0.5 * p.up.double() for p, w in zip(parts, ws))
        a = sum((1 if w >= 0 else -1) * abs(w) ** 0.5 * p.down.double() for p, w in zip(parts, ws))
        torch.testing.assert_close(float64_delta(layer, "lin"), b @ a, rtol=0, atol=1e-6 * (b @ a).abs().max().item())
        exact = float64_delta(layer, "ta")
        assert (float64_delta(layer, "lin") - exact).abs().max() > 0.1 * exact.abs().max()  # cross terms


def test_svd_clamp_clamps_both_factors_at_the_quantile(tmp_path):
    """The clamp, checked against a float64 SVD whose singular vectors are given the same signs as ours."""
    _, ours, _ = paired_models("llama", tmp_path)
    names = ["default", "b", "c"]
    ours.add_weighted_adapter(names, WEIGHTS, "free", combination_type="svd", svd_rank=4)
    ours.add_weighted_adapter(names, WEIGHTS, "clamped", combination_type="svd", svd_rank=4, svd_clamp=0.9)
    for layer in our_layers(ours).values():
        exact = sum(w * float64_delta(layer, a) for a, w in zip(names, WEIGHTS))
        u, s, vh = torch.linalg.svd(exact)
        ours_down = layer.low_rank_delta("free").down.double()
        signs = torch.sign((vh[:4] * ours_down).sum(1))  # the sign SVD leaves open, aligned with our factors
        up, down = u[:, :4] * s[:4] * signs, vh[:4] * signs[:, None]
        limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.9)
        expected = up.clamp(-limit, limit) @ down.clamp(-limit, limit)
        torch.testing.assert_close(float64_delta(layer, "clamped"), expected, rtol=0,
                                   atol=1e-5 * expected.abs().max().item())
        assert not torch.allclose(expected, up @ down, atol=1e-3)  # the clamp did bite


def test_rslora_adapters_combine_exactly_where_peft_is_off_by_the_root_of_the_rank(tmp_path):
    """PEFT writes the combined factors into an adapter whose rsLoRA scale is r/√r = √r, not 1; peftcore divides."""
    from fusion_helpers import peft_layers

    theirs, ours, _ = paired_models("llama", tmp_path, use_rslora=True)
    names = ["default", "b", "c"]
    for model in (theirs, ours):
        model.add_weighted_adapter(names, WEIGHTS, "cat", combination_type="cat")
    theirs_by_key = peft_layers(theirs)
    for key, layer in our_layers(ours).items():
        exact = sum(w * float64_delta(layer, a) for a, w in zip(names, WEIGHTS))
        torch.testing.assert_close(float64_delta(layer, "cat"), exact, rtol=0, atol=1e-6 * exact.abs().max().item())
        peft_delta = theirs_by_key[key].get_delta_weight("cat").double()
        torch.testing.assert_close(peft_delta, exact * 12 ** 0.5, rtol=0, atol=1e-5 * exact.abs().max().item())
