"""Merging "task tensors" entry by entry: PEFT's definitions of pruning, TIES and DARE.

Written from the papers and PEFT's documented behaviour (``peft.utils.merge_utils``),
so that peftcore's results equal PEFT's: magnitude pruning keeps the
``int(density · n)`` largest entries by absolute value; DARE keeps each entry with
probability ``density`` and divides what it keeps by ``density`` (so the expectation
is unchanged); TIES elects, per entry, the sign of the sum (``"total"``) or of the
majority (``"frequency"``) of the pruned, unweighted tensors, and averages the
weighted entries that agree with it.
"""

from __future__ import annotations

import torch

SIGN_METHODS = ("total", "frequency")


def magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density · numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def randomly_pruned(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` and rescaled by ``1 / density``."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry, which of the stacked tensors agree with the elected sign (ties elect +)."""
    sign = stacked.sign()
    if method == "total":
        strength = stacked.sum(dim=0)
    elif method == "frequency":
        strength = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    elected = torch.where(strength >= 0, 1, -1).to(sign.dtype)
    return sign == elected


def merge_entries(
    kind: str, tensors: list[torch.Tensor], weights: list[float], density: float | None = None,
    majority_sign_method: str = "total", generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge same-shape ``tensors`` with ``weights`` as PEFT's ``kind`` does.

    ``kind``: "linear" (weighted sum), "magnitude_prune", "ties", "dare_linear" or "dare_ties".
    """
    if kind in ("magnitude_prune", "ties"):
        tensors = [magnitude_pruned(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [randomly_pruned(t, density, generator) for t in tensors]
    elif kind != "linear":
        raise ValueError(f"unknown entry-wise merge {kind!r}")
    stacked = torch.stack(tensors)
    scale = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * scale
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    agree = majority_sign_mask(stacked, majority_sign_method)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
