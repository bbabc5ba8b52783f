"""Combining low-rank weight changes ``scale · up @ down`` (one layer at a time), returning new (up, down).

Three families, by what they operate on:

- on the factors (PEFT's ``cat``, ``linear``, ``ties``, ``dare_*``, ``magnitude_prune``):
  A's and B's are merged separately with weights ``±√|w·s|``, so every pair of
  adapters adds a cross term ``B_i A_j`` (PEFT's definition, kept for compatibility;
  ``cat`` is exact);
- on the product, factored (``svd``, ``task_arithmetic``): Σ wᵢ·ΔWᵢ is exactly
  ``[B₁ … Bₙ] · [w₁s₁A₁; …; wₙsₙAₙ]``; its truncated SVD comes from the QR factors of
  the two stacked matrices and the SVD of the small ``R₁ R₂ᵀ`` core, never from the
  dense ΔW;
- on the entries of each dense ΔWᵢ (``ties_svd``, ``dare_*_svd``,
  ``magnitude_prune_svd``): pruning is defined entry by entry, so these build every
  ΔWᵢ (one layer at a time) and take a full SVD of the merged matrix, as PEFT does.
"""

from __future__ import annotations

import math

import torch

from peftcore.layer import LowRankDelta

from peftcore_fusion.task_maths import merge_entries

ON_FACTORS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE_SVD = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32


def stacked_factors(deltas: list[LowRankDelta], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[up₁ … upₙ]`` and ``[w₁s₁·down₁; …]``: their product is exactly Σ wᵢ·ΔWᵢ (PEFT's ``cat``)."""
    ups = torch.cat([d.up for d in deltas], dim=1)
    downs = torch.cat([d.down * (w * d.scale) for d, w in zip(deltas, weights)], dim=0)
    return ups, downs


def on_factors(kind: str, deltas: list[LowRankDelta], weights: list[float], **entry_options):
    """PEFT's factor-wise merge: A's with weights sign·√|w·s|, B's with √|w·s| (the sign on one side only)."""
    roots = [math.sqrt(abs(w * d.scale)) for d, w in zip(deltas, weights)]
    signs = [1.0 if w * d.scale >= 0 else -1.0 for d, w in zip(deltas, weights)]
    down = merge_entries(kind, [d.down for d in deltas], [s * r for s, r in zip(signs, roots)], **entry_options)
    up = merge_entries(kind, [d.up for d in deltas], roots, **entry_options)
    return up.to(deltas[0].up.dtype), down.to(deltas[0].down.dtype)


def _householder(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR of ``columns`` (m, n): (reflectors, tau, R) with R (min(m, n), n); Q stays implicit."""
    reflectors, tau = torch.geqrf(columns)
    return reflectors, tau, reflectors[: min(columns.shape)].triu()


def _apply_q(reflectors: torch.Tensor, tau: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Q[:, :len(top)] @ top, through the reflectors (never forming Q)."""
    padded = top.new_zeros(reflectors.shape[0], top.shape[1])
    padded[: top.shape[0]] = top
    return torch.ormqr(reflectors, tau, padded)


def factored_svd(deltas: list[LowRankDelta], weights: list[float], rank: int, driver: str | None = None):
    """(up, down, singular values) of the best rank-``rank`` approximation of Σ wᵢ·ΔWᵢ, without forming ΔW.

    With ``U = [up₁ … upₙ] = Q₁R₁`` and ``Dᵀ = [w₁s₁down₁; …]ᵀ = Q₂R₂`` (Householder QR),
    ΔW = Q₁ (R₁R₂ᵀ) Q₂ᵀ; the SVD ``R₁R₂ᵀ = Uc·S·Vcᵀ`` of the (Σrᵢ)² core gives
    ΔW's singular values S and vectors Q₁Uc, Q₂Vc. Returns up = Q₁Uc[:, :k]·S[:k] and
    down = Vcᵀ[:k]·Q₂ᵀ (PEFT's convention: S on the up side). Q₁ and Q₂ are applied as
    reflectors and each stacked copy is dropped once factored, so the peak memory stays
    near the adapters' own (bench/fusion_svd.py measures it).
    """
    dtype = _compute_dtype(deltas[0].up)
    downs = torch.cat([d.down.to(dtype) * (w * d.scale) for d, w in zip(deltas, weights)], dim=0)
    down_reflectors, down_tau, r_down = _householder(downs.T)
    del downs
    ups = torch.cat([d.up.to(dtype) for d in deltas], dim=1)
    up_reflectors, up_tau, r_up = _householder(ups)
    del ups
    core_u, singular, core_vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False, driver=driver)
    k = min(rank, singular.numel())
    up = _apply_q(up_reflectors, up_tau, core_u[:, :k] * singular[:k])
    down = _apply_q(down_reflectors, down_tau, core_vh[:k].T).T
    return up, down, singular


def dense_svd(matrix: torch.Tensor, rank: int, full_matrices: bool = True, driver: str | None = None):
    """PEFT's truncated SVD of a dense (out, fan_in) matrix: (U·S, Vh), ``rank`` columns/rows."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=full_matrices, driver=driver)
    return u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]


def clamped(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``svd_clamp``: both factors clamped to ±(the ``quantile`` of all their entries)."""
    limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), quantile)
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def combine(kind: str, deltas: list[LowRankDelta], weights: list[float], rank: int, options: dict):
    """New (up, down) for ``kind`` over one layer's ``deltas``; ``options`` are add_weighted_adapter's."""
    entry_options = dict(density=options.get("density"), majority_sign_method=options.get("majority_sign_method",
                         "total"), generator=options.get("generator"))
    if kind == "cat" or (kind == "task_arithmetic" and not options.get("svd_rank")):
        return stacked_factors(deltas, weights)
    if kind in ON_FACTORS:
        return on_factors(kind, deltas, weights, **entry_options)
    if kind in ("svd", "task_arithmetic"):
        up, down, _ = factored_svd(deltas, weights, rank, driver=options.get("svd_driver"))
    elif kind in DENSE_SVD:
        dense = [d.matrix().to(_compute_dtype(d.up)) for d in deltas]
        merged = merge_entries(kind[: -len("_svd")], dense, weights, **entry_options)
        up, down = dense_svd(merged, rank, options.get("svd_full_matrices", True), options.get("svd_driver"))
    else:
        raise ValueError(f"unknown low-rank combination {kind!r}")
    if options.get("svd_clamp") is not None:
        up, down = clamped(up, down, options["svd_clamp"])
    return up, down
