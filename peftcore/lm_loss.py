"""A causal LM's loss from its final hidden states, chunk by chunk: never the full logits tensor.

The usual path computes ``logits = lm_head(hidden)`` for every position (batch x
tokens x vocabulary: 400 MB in fp32 for one 2,048-token sequence of a 49k
vocabulary), keeps them for backward, then as much again for the log-softmax
and for each gradient. Here the head's matmul, the log-softmax, the loss and
its gradient run on one chunk of tokens at a time; backward computes every
chunk's logits again instead of keeping them, so the largest temporary is one
chunk's logits.

The result is transformers' ``ForCausalLMLoss`` (labels shifted by one, padded
with ``ignore_index``, ``mean`` over the counted tokens or a sum divided by
``num_items_in_batch``), with the logits upcast to float32 before the
cross-entropy as there. Positions whose label is ignored are dropped before any
matmul: they add nothing to the loss or to any gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100  # transformers' label value for "no loss here"
CHUNK_ELEMENTS = 1 << 24  # logits per chunk when the caller does not choose: 64 MiB in float32

LogitTransform = Callable[[torch.Tensor], torch.Tensor]


def chunk_rows(vocab_size: int, chunk_tokens: int | None = None) -> int:
    """Tokens per chunk: ``chunk_tokens``, or as many as fit :data:`CHUNK_ELEMENTS` logits."""
    if chunk_tokens is not None:
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive integer or None, got {chunk_tokens!r}")
        return chunk_tokens
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _chunk_logits(hidden, weight, bias, transform: LogitTransform | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(head output, float32 logits) of one chunk, the same operations as ``lm_head`` + the model's transform."""
    raw = F.linear(hidden, weight, bias)
    logits = raw if transform is None else transform(raw)
    return raw, logits.float()


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    if not torch.is_autocast_enabled(device_type):
        return False, None
    return True, torch.get_autocast_dtype(device_type)


class _LinearCrossEntropySum(torch.autograd.Function):
    """``sum_i cross_entropy(transform(h_i W.T + b).float(), t_i)`` over rows ``h_i``, in chunks of rows.

    Saves ``hidden`` (which the head's own backward would keep too), never logits;
    backward recomputes each chunk's logits under the same autocast state as forward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, rows):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            _, logits = _chunk_logits(hidden[start : start + rows], weight, bias, transform)
            total += F.cross_entropy(logits, targets[start : start + rows], reduction="sum")
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.transform, ctx.rows = transform, rows
        ctx.autocast = _autocast_state(hidden.device.type)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # accumulated in float32 over the chunks, cast once at the end
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        enabled, dtype = ctx.autocast
        with torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            for start in range(0, hidden.shape[0], ctx.rows):
                h = hidden[start : start + ctx.rows]
                grad_raw = _chunk_grad(h, weight, bias, targets[start : start + ctx.rows], ctx.transform, grad_total)
                if want_hidden:
                    grad_hidden[start : start + ctx.rows] = torch.mm(grad_raw, weight.to(grad_raw.dtype))
                if want_weight:
                    grad_weight += torch.mm(grad_raw.t(), h.to(grad_raw.dtype)).float()
                if want_bias:
                    grad_bias += grad_raw.sum(0).float()
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


def _chunk_grad(h, weight, bias, targets, transform, grad_total) -> torch.Tensor:
    """Gradient of ``grad_total * sum cross_entropy`` with respect to the head output of one chunk."""
    with torch.no_grad():
        raw = F.linear(h, weight, bias)
    chained = transform is not None or raw.dtype != torch.float32
    if chained:  # the transform and the upcast: let autograd differentiate exactly what forward ran
        raw.requires_grad_(True)
        with torch.enable_grad():
            logits = (raw if transform is None else transform(raw)).float()
    else:
        logits = raw
    # d/dz sum_i CE(z_i, t_i) = softmax(z) - onehot(t)
    grad_logits = torch.softmax(logits.detach(), dim=-1)
    grad_logits[torch.arange(targets.shape[0], device=targets.device), targets] -= 1
    grad_logits.mul_(grad_total)
    if not chained:
        return grad_logits
    (grad_raw,) = torch.autograd.grad(logits, raw, grad_logits)
    return grad_raw


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    transform: LogitTransform | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``transform(hidden @ weight.T + bias)`` against ``targets`` (every row counted).

    ``hidden`` is ``(rows, in_features)``, ``targets`` ``(rows,)`` class indices.
    """
    rows = chunk_rows(weight.shape[0], chunk_tokens)
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, transform, rows)


def shifted_targets(
    labels: torch.Tensor | None, shift_labels: torch.Tensor | None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """transformers' targets: ``labels`` moved one left, padded with ``ignore_index`` (or ``shift_labels``)."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("the loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    transform: LogitTransform | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """``ForCausalLMLoss(transform(hidden @ weight.T + bias), labels)`` without the full logits tensor.

    ``hidden``: the final hidden states ``(batch, seq, in_features)``; ``labels`` or
    ``shift_labels`` ``(batch, seq)``. Same value and gradients as transformers'
    loss on the full logits, up to the order of floating-point summation.
    """
    targets = shifted_targets(labels, shift_labels, ignore_index)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels of shape {tuple(targets.shape)} do not match the hidden states {tuple(hidden.shape[:-1])} "
            "(batch, sequence): one label per position"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(hidden.device)
    counted = (flat_targets != ignore_index).nonzero().squeeze(1)
    counted_targets = flat_targets.index_select(0, counted)
    _check_targets(counted_targets, weight.shape[0], ignore_index)
    total = linear_cross_entropy_sum(
        flat_hidden.index_select(0, counted), weight, bias, counted_targets, transform, chunk_tokens
    )
    if num_items_in_batch is None:
        return total / counted.numel()  # "mean": no counted token gives nan, as cross_entropy does
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    if targets.numel() == 0:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"label {bad} is outside the vocabulary (0..{vocab_size - 1}) and is not ignore_index ({ignore_index})"
        )


@torch.no_grad()
def token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    transform: LogitTransform | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Per-position negative log-likelihood ``(batch, seq)`` of the shifted labels, 0 where ignored (no gradient)."""
    targets = shifted_targets(labels, None, ignore_index)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the hidden states {tuple(hidden.shape)}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(hidden.device)
    out = torch.zeros(flat_targets.shape, dtype=torch.float32, device=hidden.device)
    counted = (flat_targets != ignore_index).nonzero().squeeze(1)
    counted_targets = flat_targets.index_select(0, counted)
    _check_targets(counted_targets, weight.shape[0], ignore_index)
    rows = chunk_rows(weight.shape[0], chunk_tokens)
    for start in range(0, counted.numel(), rows):
        index = counted[start : start + rows]
        _, logits = _chunk_logits(flat_hidden.index_select(0, index), weight, bias, transform)
        out[index] = F.cross_entropy(logits, counted_targets[start : start + rows], reduction="none")
    return out.view(targets.shape)
