"""Triton kernels for LoRA: a "shrink" (x @ A.T, per segment) and a fused "expand".

- ``shrink``: ``XA[m, :] = X[m, :] @ A_k`` for the adapter ``k`` of each segment of
  rows (one segment, one adapter, for the plain linear).
- ``expand``: ``OUT = RES + X @ W + bias + s_k * (XA @ B_k + lbias_k)``, any term
  optional. With ``W`` it is the base GEMM with the LoRA up-projection, its scaling
  and both biases folded into the epilogue, so the ``(N, out)`` LoRA product never
  exists in memory; without ``W`` it is the segmented up-projection of a mixed batch.

The LoRA backward reuses both: ``dY @ B`` is a shrink and ``dX = dY @ W + s (dY B) A``
an expand with the operands transposed through strides (no copies).

This module imports triton at the top; :mod:`peftcore_lora.kernels` imports it only
when triton is installed. Kernels are JIT-decorated lazily (``build``) so the
interpreter (``TRITON_INTERPRET=1``, which triton reads at decoration time) can be
switched on in tests after import. For the same reason the kernels call only
``tl`` builtins (``tl.full``, not ``tl.zeros``): triton's own jitted helpers are
decorated when triton is imported and fail under a later-enabled interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def _shrink_kernel(
    X, A, IDX, XA,
    T, K, R, T_BUCKET,
    s_xb, s_xt, s_xk,
    s_aa, s_ak, s_ar,
    s_ob, s_ot, s_or,
    SEGMENTED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    seg = tl.program_id(1)
    adapter = 0
    if SEGMENTED:
        adapter = tl.load(IDX + seg)
    rt = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    x_base = X + seg * s_xb
    a_base = A + adapter * s_aa
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(
            x_base + rt[:, None] * s_xt + kk[None, :] * s_xk, mask=(rt[:, None] < T) & (kk[None, :] < K), other=0.0
        )
        a = tl.load(
            a_base + kk[:, None] * s_ak + rr[None, :] * s_ar, mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0
        )
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    out = XA + seg * s_ob + rt[:, None] * s_ot + rr[None, :] * s_or
    tl.store(out, acc.to(XA.dtype.element_ty), mask=(rt[:, None] < T) & (rr[None, :] < R))


def _expand_kernel(
    X, W, BIAS, XA, B, LBIAS, SCALE, IDX, RES, OUT,
    T, N, K, R, T_BUCKET,
    s_xb, s_xt, s_xk,
    s_wk, s_wn,
    s_ab, s_at, s_ar,
    s_ba, s_br, s_bn,
    s_la, s_ln,
    s_rb, s_rt, s_rn,
    s_ob, s_ot, s_on,
    HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr, HAS_RES: tl.constexpr,
    SEGMENTED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0)
    seg = tl.program_id(1)
    pid_n = tl.program_id(2)
    adapter = 0
    if SEGMENTED:
        adapter = tl.load(IDX + seg)
    rt = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rt[:, None] < T
    col_ok = rn[None, :] < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if HAS_W:
        rk = tl.arange(0, BLOCK_K)
        x_base = X + seg * s_xb
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_base + rt[:, None] * s_xt + kk[None, :] * s_xk, mask=row_ok & (kk[None, :] < K), other=0.0)
            w = tl.load(W + kk[:, None] * s_wk + rn[None, :] * s_wn, mask=(kk[:, None] < K) & col_ok, other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(SCALE + adapter).to(tl.float32)
    xa = tl.load(XA + seg * s_ab + rt[:, None] * s_at + rr[None, :] * s_ar, mask=row_ok & (rr[None, :] < R), other=0.0)
    b = tl.load(
        B + adapter * s_ba + rr[:, None] * s_br + rn[None, :] * s_bn, mask=(rr[:, None] < R) & col_ok, other=0.0
    )
    lora = tl.dot(xa.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    if HAS_LBIAS:
        lora += tl.load(LBIAS + adapter * s_la + rn * s_ln, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    acc += scale * lora
    if HAS_RES:
        acc += tl.load(RES + seg * s_rb + rt[:, None] * s_rt + rn[None, :] * s_rn, mask=row_ok & col_ok, other=0.0).to(
            tl.float32
        )
    tl.store(
        OUT + seg * s_ob + rt[:, None] * s_ot + rn[None, :] * s_on, acc.to(OUT.dtype.element_ty), mask=row_ok & col_ok
    )


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


MAX_RANK = 128  # one BLOCK_R tile holds every rank; larger ranks take the PyTorch path

# (BLOCK_M, BLOCK_K, warps, stages) / (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the usual
# Hopper/Ampere GEMM tiles; the autotuner picks per (problem size, token bucket).
_SHRINK_CONFIGS = [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3)]
_EXPAND_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 3),
]
_INTERPRETER_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)  # its cost grows with the tile volume


@functools.cache
def build(interpret: bool):
    """The jitted kernels; cached per mode because triton picks the interpreter at decoration.

    Compiled kernels are autotuned (the expand kernel does the base GEMM, so its tiles
    matter); the kernels only write ``OUT``/``XA``, so the autotuner may rerun them.
    """
    shrink_k, expand_k = triton.jit(_shrink_kernel), triton.jit(_expand_kernel)
    if interpret:
        return shrink_k, expand_k
    shrink_configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=st) for m, k, w, st in _SHRINK_CONFIGS
    ]
    expand_configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for m, n, k, w, st in _EXPAND_CONFIGS
    ]
    return (
        triton.autotune(shrink_configs, key=["K", "R", "T_BUCKET"])(shrink_k),
        triton.autotune(expand_configs, key=["N", "K", "R", "T_BUCKET"])(expand_k),
    )


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _precision(dtype: torch.dtype) -> str:
    # fp32 callers expect fp32 results (torch keeps TF32 off by default); half inputs
    # use tensor cores with fp32 accumulation either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # the interpreter computes bf16 wrongly; fp32 accumulation after an upcast is exact enough
    return interpreting()


def _bucket(t: int) -> int:
    return triton.next_power_of_2(max(int(t), 1))


def shrink(x3: torch.Tensor, A: torch.Tensor, idx: torch.Tensor | None, transpose_a: bool) -> torch.Tensor:
    """``xa[b] = x3[b] @ A_k.T`` (``transpose_a``: A stored (K, R) instead of (R, K)).

    ``x3``: (segments, T, K); ``A``: (adapters, R, K) or (R, K); ``idx``: adapter per segment.
    Returns fp32 (segments, T, R).
    """
    shrink_k, _ = build(interpreting())
    segs, T, K = x3.shape
    A3 = A if A.dim() == 3 else A.unsqueeze(0)
    R = A3.shape[2] if transpose_a else A3.shape[1]
    s_ak, s_ar = (A3.stride(1), A3.stride(2)) if transpose_a else (A3.stride(2), A3.stride(1))
    out = torch.empty((segs, T, R), device=x3.device, dtype=torch.float32)
    block_r = _block(R, 16, MAX_RANK)
    tiles = {k: v for k, v in _INTERPRETER_TILES.items() if k != "BLOCK_N"} if interpreting() else {}
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), segs)  # noqa: E731
    shrink_k[grid](
        x3, A3, idx if idx is not None else out, out,
        T, K, R, _bucket(T),
        x3.stride(0), x3.stride(1), x3.stride(2),
        A3.stride(0), s_ak, s_ar,
        out.stride(0), out.stride(1), out.stride(2),
        SEGMENTED=idx is not None, UPCAST=_upcast(x3.dtype), PRECISION=_precision(x3.dtype),
        BLOCK_R=block_r, **tiles,
    )
    return out


def expand(
    xa: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, *, out_features: int, dtype: torch.dtype,
    x3: torch.Tensor | None = None, W: torch.Tensor | None = None, w_kn: tuple[int, int] | None = None,
    bias: torch.Tensor | None = None, lbias: torch.Tensor | None = None, res: torch.Tensor | None = None,
    idx: torch.Tensor | None = None, transpose_b: bool = False,
) -> torch.Tensor:
    """``out = res + x3 @ W + bias + scale_k * (xa @ B_k.T + lbias_k)``; see the module docstring.

    ``B``: (adapters, N, R) or (N, R) (``transpose_b``: stored (R, N)); ``W`` is read
    through ``w_kn`` = its (k, n) strides, so a transposed weight needs no copy.
    """
    _, expand_k = build(interpreting())
    segs, T, R = xa.shape
    N = out_features
    B3 = B if B.dim() == 3 else B.unsqueeze(0)
    s_br, s_bn = (B3.stride(1), B3.stride(2)) if transpose_b else (B3.stride(2), B3.stride(1))
    out = torch.empty((segs, T, N), device=xa.device, dtype=dtype)
    K = x3.shape[2] if x3 is not None else 0
    lb = None if lbias is None else (lbias if lbias.dim() == 2 else lbias.unsqueeze(0))
    block_r = _block(R, 16, MAX_RANK)
    tiles = dict(_INTERPRETER_TILES) if interpreting() else {}
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), segs, triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    dummy = out
    xs = x3.stride() if x3 is not None else (0, 0, 0)
    rs = res.stride() if res is not None else (0, 0, 0)
    expand_k[grid](
        x3 if x3 is not None else dummy, W if W is not None else dummy, bias if bias is not None else dummy,
        xa, B3, lb if lb is not None else dummy, scale, idx if idx is not None else scale,
        res if res is not None else dummy, out,
        T, N, K, R, _bucket(T),
        xs[0], xs[1], xs[2],
        *(w_kn if w_kn is not None else (0, 0)),
        xa.stride(0), xa.stride(1), xa.stride(2),
        B3.stride(0), s_br, s_bn,
        *((lb.stride(0), lb.stride(1)) if lb is not None else (0, 0)),
        rs[0], rs[1], rs[2],
        out.stride(0), out.stride(1), out.stride(2),
        HAS_W=W is not None, HAS_BIAS=bias is not None, HAS_LBIAS=lb is not None, HAS_RES=res is not None,
        SEGMENTED=idx is not None, UPCAST=_upcast(dtype), PRECISION=_precision(dtype),
        BLOCK_R=block_r, **tiles,
    )
    return out
