"""Triton kernels for LoRA on GPUs, used automatically for CUDA tensors when triton is installed.

Everything here is optional: without triton, on CPU tensors, with
``PEFTCORE_LORA_TRITON=0``, or after a kernel failed to compile once, :func:`usable`
is False and :mod:`peftcore_lora.fast` runs its PyTorch path (same maths). The
kernels themselves are in :mod:`peftcore_lora.kernels.triton_lora`; this module holds
the autograd function and the mixed-batch entry point built on them.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch.autograd.function import once_differentiable

_ENV = "PEFTCORE_LORA_TRITON"  # "0": never; "1": also for CPU tensors (only with TRITON_INTERPRET=1, for tests)
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_broken: str | None = None  # the first launch error; after it the PyTorch path is used


_installed: bool | None = None


def triton_installed() -> bool:
    global _installed
    if _installed is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _installed = False
        else:
            _installed = True
    return _installed


def usable(x: torch.Tensor) -> bool:
    """Whether the Triton path should run for tensors like ``x``."""
    mode = os.environ.get(_ENV, "auto")
    if mode == "0" or _broken is not None or x.dtype not in _SUPPORTED:
        return False
    if x.is_cuda:
        return triton_installed()
    return mode == "1" and triton_installed() and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _disable(exc: Exception) -> None:
    global _broken
    _broken = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"peftcore-lora: Triton LoRA kernels failed ({_broken}); using the PyTorch path from now on", stacklevel=3
    )


def _scale_tensor(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


class TritonLoraLinear(torch.autograd.Function):
    """One adapter: ``y = x W.T + b + s * (dropout(x) A.T B.T + lbias)`` with the Triton kernels.

    Saves ``x`` (when A needs a gradient), ``x A.T`` (fp32, (N, r)) and the 1-byte dropout mask.
    """

    @staticmethod
    def forward(ctx, x2d, weight, bias, A, B, lbias, fan_in_fan_out, scaling, p):
        from peftcore_lora.kernels import triton_lora as tk

        xd, mask = (x2d, None) if p == 0.0 else torch.native_dropout(x2d, p, True)
        xa = tk.shrink(xd.unsqueeze(0), A, None, transpose_a=False)
        # W read as (k=in, n=out): nn.Linear stores (out, in), Conv1D (in, out)
        w_kn = (weight.stride(0), weight.stride(1)) if fan_in_fan_out else (weight.stride(1), weight.stride(0))
        out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
        scale = _scale_tensor([scaling], x2d.device)
        y = tk.expand(xa, B, scale, out_features=out_features, dtype=x2d.dtype, x3=x2d.unsqueeze(0), W=weight,
                      w_kn=w_kn, bias=bias, lbias=lbias)
        needs = ctx.needs_input_grad
        ctx.fan_in_fan_out, ctx.scaling, ctx.p = fan_in_fan_out, scaling, p
        ctx.save_for_backward(x2d if (needs[3] or needs[1]) else None, weight, A, B, xa[0], mask)
        return y[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        from peftcore_lora.kernels import triton_lora as tk

        x2d, weight, A, B, xa, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        s, p = ctx.scaling, ctx.p
        dy = dy.contiguous()
        dx = dw = db = dA = dB = dlb = None
        g = None
        if needs[0] or needs[3]:
            g = tk.shrink(dy.unsqueeze(0), B, None, transpose_a=True)  # dY @ B, (1, N, r) fp32
        if needs[0]:
            # dX = dY W + s (dY B) A: W read as (k=out, n=in), A (r, in) is already (R, N)
            w_kn = (weight.stride(1), weight.stride(0)) if ctx.fan_in_fan_out else (weight.stride(0), weight.stride(1))
            in_features = weight.shape[0] if ctx.fan_in_fan_out else weight.shape[1]
            scale = _scale_tensor([s], dy.device)
            if mask is None:
                dx = tk.expand(g, A, scale, out_features=in_features, dtype=dy.dtype, x3=dy.unsqueeze(0), W=weight,
                               w_kn=w_kn, transpose_b=True)[0]
            else:
                dx = torch.mm(dy, weight.t() if ctx.fan_in_fan_out else weight)
                lora_dx = torch.mm(g[0].to(dy.dtype), A).mul_(s)
                dx.add_(torch.ops.aten.native_dropout_backward(lora_dx, mask, 1.0 / (1.0 - p)))
        if needs[1]:
            dw = torch.mm(x2d.t(), dy) if ctx.fan_in_fan_out else torch.mm(dy.t(), x2d)
        if needs[2]:
            db = dy.sum(0)
        if needs[3]:
            xd = x2d if mask is None else torch.ops.aten.native_dropout_backward(x2d, mask, 1.0 / (1.0 - p))
            dA = torch.mm(g[0].t().to(xd.dtype), xd).mul_(s)
        if needs[4]:
            dB = torch.mm(dy.t(), xa.to(dy.dtype)).mul_(s)
        if needs[5]:
            dlb = dy.sum(0).mul_(s)
        return dx, dw, db, dA, dB, dlb, None, None, None


def fused_lora_linear(x2d, weight, bias, fan_in_fan_out: bool, adapters):
    """The Triton path for one active adapter; None (use PyTorch) otherwise or on failure."""
    from peftcore_lora.kernels.triton_lora import MAX_RANK

    if len(adapters) != 1 or not x2d.is_contiguous() or adapters[0].A.shape[0] > MAX_RANK:
        return None
    ad = adapters[0]
    try:
        return TritonLoraLinear.apply(x2d, weight, bias, ad.A, ad.B, ad.bias, fan_in_fan_out, ad.scaling, ad.p)
    except Exception as exc:  # a compile/launch failure must not break training: fall back for good
        _disable(exc)
        return None


def stack_padded(tensors: list[torch.Tensor], dim: int, size: int) -> torch.Tensor:
    """Stack (r_i, ...) or (..., r_i) matrices, zero-padding the rank dim to ``size``."""
    if all(t.shape[dim] == size for t in tensors):
        return torch.stack(tensors)
    padded = []
    for t in tensors:
        pad = size - t.shape[dim]
        if pad:
            shape = list(t.shape)
            shape[dim] = pad
            t = torch.cat([t, t.new_zeros(shape)], dim=dim)
        padded.append(t)
    return torch.stack(padded)


def segmented_lora(x3, As, Bs, biases, scalings, picks):
    """Mixed batch: the LoRA delta of every row (x3: (rows, T, in)) with its own adapter, or None."""
    from peftcore_lora.kernels import triton_lora as tk

    r_max = max(A.shape[0] for A in As)
    if r_max > tk.MAX_RANK:
        return None
    try:
        A_st = stack_padded(As, 0, r_max)  # (K, r, in)
        B_st = stack_padded(Bs, 1, r_max)  # (K, out, r)
        idx = torch.tensor(picks, dtype=torch.int32, device=x3.device)
        lb = None
        if any(b is not None for b in biases):
            zero = torch.zeros(Bs[0].shape[0], dtype=x3.dtype, device=x3.device)
            lb = torch.stack([b if b is not None else zero for b in biases])
        xa = tk.shrink(x3, A_st, idx, transpose_a=False)
        return tk.expand(xa, B_st, _scale_tensor(scalings, x3.device), out_features=B_st.shape[1], dtype=x3.dtype,
                         lbias=lb, idx=idx)
    except Exception as exc:
        _disable(exc)
        return None
