"""Fast LoRA paths for ``Linear``/``Conv1D`` wrappers, exactly equivalent to the plain path.

Two things make the plain path (``base(x) + B(A(dropout(x))) * s`` per adapter) slow:
separate ``(N, out)`` temporaries for the LoRA product, its scaled copy and the sum,
and autograd saving a dropout copy of the input per adapter. Here one autograd
function computes the base layer and every active adapter with in-place GEMM
accumulation (``addmm_`` with ``alpha=s``), saves only the input (shared between
layers that read the same tensor), the tiny ``x @ A.T`` products and a 1-byte
dropout mask, and recomputes the rest in backward. Where the input is a product
whose factors autograd keeps anyway (the ``act(gate) * up`` feeding a SwiGLU
``down_proj``, an RMSNorm's ``weight * (h * rsqrt(var))`` feeding q/k/v), even the
input is not kept: backward multiplies the factors again, bit for bit
(:mod:`peftcore_lora.rebuild`).

Mixed-adapter batches use one gathered, batched computation (per-row A and B
stacked and ``bmm``) instead of a Python loop over the adapters.

Every entry point returns ``None`` when its preconditions do not hold; the caller
then runs the plain path, so unusual layers (DoRA, quantised or hooked base
layers, autocast, tensor subclasses, torch.compile) keep their exact behaviour.
On CUDA with Triton installed the same maths runs in the fused kernels of
:mod:`peftcore_lora.kernels`.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module_globals

from peftcore.layer import BASE_ADAPTER

from peftcore_lora import kernels, rebuild
from peftcore_lora.kernels import stack_padded

_ENV_DISABLE = "PEFTCORE_LORA_FAST"  # "0" switches every fast path off (for A/B comparisons)
_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def enabled() -> bool:
    return os.environ.get(_ENV_DISABLE, "1") != "0"


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


_BASE_TYPES: tuple[type, ...] | None = None


def _base_types() -> tuple[type, ...]:
    global _BASE_TYPES
    if _BASE_TYPES is None:
        _BASE_TYPES = (nn.Linear, _conv1d_type())
    return _BASE_TYPES


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class _Adapter:
    """One active adapter's tensors and constants, as the fused function needs them."""

    __slots__ = ("A", "B", "bias", "scaling", "p")

    def __init__(self, A, B, bias, scaling: float, p: float):
        self.A, self.B, self.bias, self.scaling, self.p = A, B, bias, scaling, p


def _matches(t, dtype, device) -> bool:
    """A plain tensor (or None) of the input's dtype and device: nothing for F.linear to cast."""
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and t.dtype == dtype and t.device == device)


# Runs for every adapted layer on every forward: submodules and parameters are read
# from ``_modules`` / ``_parameters`` directly, which skips nn.Module.__getattr__'s
# search (a third of this function's cost with a few adapters).


def _adapter(layer, name: str, dtype, device) -> _Adapter | None:
    """Adapter ``name`` of ``layer`` as the fused maths needs it, or None if it needs the plain path."""
    if layer.use_dora.get(name):
        return None
    modules = layer._modules
    lora_A, lora_B = modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
    dropout = modules["lora_dropout"]._modules[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or _has_hooks(lora_A) or _has_hooks(lora_B):
        return None
    if type(dropout) is nn.Identity:
        p = 0.0
    elif type(dropout) is nn.Dropout and not dropout.inplace and not _has_hooks(dropout):
        p = dropout.p if dropout.training else 0.0
    else:
        return None
    A, B, bias = lora_A._parameters["weight"], lora_B._parameters["weight"], lora_B._parameters["bias"]
    if (
        A is None
        or B is None
        or not (_matches(A, dtype, device) and _matches(B, dtype, device) and _matches(bias, dtype, device))
    ):
        return None
    scaling = float(layer.scaling[name])
    if not math.isfinite(scaling):
        # BLAS may skip ``alpha`` when it is NaN (addmm_ then adds the product unscaled): the plain path's
        # elementwise ``* scaling`` gives the NaN/inf outputs PEFT gives
        return None
    return _Adapter(A, B, bias, scaling, float(p))


def _active_adapters(layer, dtype, device) -> list[_Adapter] | None:
    """The active, present adapters of ``layer`` if all of them can take the fused path."""
    adapters = []
    for name in layer.active_adapters:
        if name in layer.r:
            adapter = _adapter(layer, name, dtype, device)
            if adapter is None:
                return None
            adapters.append(adapter)
    return adapters


def _base_tensors(layer, dtype, device):
    """(weight, bias, fan_in_fan_out) of a plain Linear/Conv1D base layer, else None."""
    base = layer._modules["base_layer"]
    if type(base) not in _base_types() or _has_hooks(base):
        return None
    weight, bias = base._parameters.get("weight"), base._parameters.get("bias")
    if weight is None or not (_matches(weight, dtype, device) and _matches(bias, dtype, device)):
        return None
    return weight, bias, type(base) is not nn.Linear


def _input_ok(x) -> bool:
    return type(x) is torch.Tensor and x.dtype in _FLOAT_TYPES and x.dim() >= 1


def _fast_context_ok(device: torch.device) -> bool:
    if not enabled() or _global_hooks() or _compiling():
        return False
    # under autocast the plain path's F.linear casts; in-place accumulation would not
    return not torch.is_autocast_enabled(device.type)


# -- the fused base + LoRA linear --------------------------------------------------


def _base_mm(x2d, weight, bias, fan_in_fan_out: bool):
    w = weight if fan_in_fan_out else weight.t()
    return torch.mm(x2d, w) if bias is None else torch.addmm(bias, x2d, w)


def _dropout(x2d, p: float):
    """PEFT's ``nn.Dropout`` on the LoRA input, same RNG stream, with a 1-byte mask to save."""
    if p == 0.0:
        return x2d, None
    # F.dropout goes through native_dropout on accelerators and draws the same Bernoulli
    # mask on CPU, so a fixed seed gives the plain path's mask bit for bit.
    dropped, mask = torch.native_dropout(x2d, p, True)
    return dropped, mask


def _undropout(grad, mask, p: float):
    if mask is None:
        return grad
    return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))


def _lora_forward_into(y, x2d, adapters: list[_Adapter], keep: bool):
    """Add each adapter's ``s * B(A(dropout(x)))`` into ``y`` in place.

    Returns (x @ A.T products, dropout masks) when ``keep`` (for backward).
    """
    xas, masks = [], []
    for ad in adapters:
        xd, mask = _dropout(x2d, ad.p)
        xa = torch.mm(xd, ad.A.t())
        y.addmm_(xa, ad.B.t(), alpha=ad.scaling)
        if ad.bias is not None:
            y.add_(ad.bias, alpha=ad.scaling)
        if keep:
            xas.append(xa)
            masks.append(mask)
    return xas, masks


def _scaled_mm(a, b, scale: float):
    """``scale * (a @ b)`` for a small result (the scaling costs one pass over it)."""
    out = torch.mm(a, b)
    return out if scale == 1.0 else out.mul_(scale)


class FusedLoraLinear(torch.autograd.Function):
    """``y = x W.T + b + sum_i s_i * (dropout_i(x) A_i.T) B_i.T (+ s_i * bias_i)``.

    Inputs: ``x2d, weight, bias, fan_in_fan_out, scalings, ps, input_rebuild, *lora`` with
    ``lora`` = ``(A_1, B_1, bias_1, A_2, ...)`` and ``input_rebuild`` a
    :class:`peftcore_lora.rebuild.InputRebuild` or None. Saves ``x`` (only when a weight
    needs a gradient, and not at all when ``input_rebuild`` can form it again), the
    ``(N, r)`` products ``x A.T`` and 1-byte dropout masks.
    """

    LORA_AT = 7  # index of the first LoRA tensor among forward's inputs

    @staticmethod
    def forward(ctx, x2d, weight, bias, fan_in_fan_out, scalings, ps, input_rebuild, *lora):
        n = len(scalings)
        # ``weight`` may be a :class:`FormedWeight` (a frozen weight formed on demand): formed here and
        # again in backward, never saved, so the full-precision copy lives only while it is used
        source = weight if isinstance(weight, FormedWeight) else None
        if source is not None:
            weight = source()
        y = _base_mm(x2d, weight, bias, fan_in_fan_out)
        adapters = [_Adapter(lora[3 * i], lora[3 * i + 1], lora[3 * i + 2], scalings[i], ps[i]) for i in range(n)]
        xas, masks = _lora_forward_into(y, x2d, adapters, keep=True)
        needs = ctx.needs_input_grad
        keep_x = needs[1] or any(needs[FusedLoraLinear.LORA_AT + 3 * i] for i in range(n))
        ctx.rebuild = input_rebuild if keep_x else None
        factors = input_rebuild.join() if ctx.rebuild is not None else []
        ctx.fan_in_fan_out, ctx.scalings, ctx.ps, ctx.n_adapters = fan_in_fan_out, scalings, ps, n
        ctx.has_mask = [m is not None for m in masks]
        ctx.n_factors = len(factors)
        ctx.weight_source = source
        ctx.save_for_backward(x2d if keep_x and ctx.rebuild is None else None,
                              weight if source is None else None, *lora, *xas,
                              *[m for m in masks if m is not None], *factors)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        n = ctx.n_adapters
        x2d, weight = saved[0], saved[1]
        lora = saved[2 : 2 + 3 * n]
        xas = saved[2 + 3 * n : 2 + 4 * n]
        n_masks = sum(ctx.has_mask)
        mask_iter = iter(saved[2 + 4 * n : 2 + 4 * n + n_masks])
        masks = [next(mask_iter) if has else None for has in ctx.has_mask]
        if ctx.rebuild is not None:
            x2d = ctx.rebuild.take(saved[len(saved) - ctx.n_factors :])
        needs = ctx.needs_input_grad
        dy = dy.contiguous()

        dx = dw = db = None
        if needs[0]:
            if ctx.weight_source is not None:
                weight = ctx.weight_source()
            dx = torch.mm(dy, weight.t() if ctx.fan_in_fan_out else weight)
            weight = None  # a formed weight goes as soon as dx has it
        if needs[1]:
            dw = torch.mm(x2d.t(), dy) if ctx.fan_in_fan_out else torch.mm(dy.t(), x2d)
        if needs[2]:
            db = dy.sum(0)
        grads = []
        at = FusedLoraLinear.LORA_AT
        for i in range(n):
            A, bias = lora[3 * i], lora[3 * i + 2]
            s, p, mask = ctx.scalings[i], ctx.ps[i], masks[i]
            want_a, want_b, want_bias = needs[at + 3 * i], needs[at + 3 * i + 1], needs[at + 3 * i + 2]
            g = None
            if want_a or needs[0]:
                g = _scaled_mm(dy, lora[3 * i + 1], s)  # gradient w.r.t. dropout(x) A.T, (N, r)
            dA = dB = dbias = None
            if want_a:
                xd = x2d if mask is None else torch.ops.aten.native_dropout_backward(x2d, mask, 1.0 / (1.0 - p))
                dA = torch.mm(g.t(), xd)
            if want_b:
                dB = _scaled_mm(dy.t(), xas[i], s)
            if want_bias and bias is not None:
                dbias = dy.sum(0).mul_(s)
            if needs[0]:
                if mask is None:
                    dx.addmm_(g, A)
                else:
                    dx.add_(_undropout(torch.mm(g, A), mask, p))
            grads += [dA, dB, dbias]
        return (dx, dw, db, None, None, None, None, *grads)


class FormedWeight:
    """A frozen base weight that is formed when needed rather than stored in full precision.

    A plugin for a quantised base layer passes one to :func:`linear_forward` (``base=``): the
    fused function calls it for the forward GEMM and once more in backward for the input's
    gradient, and keeps no reference to the formed tensor in between (as a 4-bit layer's own
    autograd function dequantises in forward and again in backward). ``form()`` returns the
    ``(out, in)`` weight in the input's dtype, on its device; ``shape`` is that tensor's shape.
    """

    __slots__ = ("form", "shape")

    def __init__(self, form, shape: tuple[int, int]):
        self.form, self.shape = form, tuple(shape)

    def __call__(self) -> torch.Tensor:
        return self.form()


def linear_forward(layer, x: torch.Tensor, base=None):
    """Base + every active adapter of a LoRA ``Linear`` in one pass, or None (use the plain path).

    ``base``: ``(weight, bias)`` given by a plugin whose base layer is not a plain ``Linear`` (``weight``
    a :class:`FormedWeight`, ``(out, in)``; the plugin has checked the layer computes ``x W.T + b``);
    None reads them from the plain ``Linear``/``Conv1D`` base layer.
    """
    if not _input_ok(x):
        return None
    dtype, device = x.dtype, x.device
    if not _fast_context_ok(device):
        return None
    if base is None:
        base = _base_tensors(layer, dtype, device)
        if base is None:
            return None
    else:
        weight, bias = base
        if not _matches(bias, dtype, device):
            return None
        base = weight, bias, False
    weight, bias, fan_in_fan_out = base
    in_features = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    if x.shape[-1] != in_features:
        return None
    adapters = _active_adapters(layer, dtype, device)
    if adapters is None:
        return None
    out_shape = x.shape[:-1] + (weight.shape[1] if fan_in_fan_out else weight.shape[0],)
    x2d = x.reshape(-1, in_features)
    formed = isinstance(weight, FormedWeight)

    if not formed and kernels.usable(x2d):
        y = kernels.fused_lora_linear(x2d, weight, bias, fan_in_fan_out, adapters)
        if y is not None:
            return y.view(out_shape)

    lora = []
    for ad in adapters:
        lora += [ad.A, ad.B, ad.bias]
    tensors = (x, bias, *lora) if formed else (x, weight, bias, *lora)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        scalings = tuple(ad.scaling for ad in adapters)
        ps = tuple(ad.p for ad in adapters)
        y = FusedLoraLinear.apply(
            x2d, weight, bias, fan_in_fan_out, scalings, ps, rebuild.input_rebuild(x, in_features), *lora
        )
    else:
        y = _base_mm(x2d, weight() if formed else weight, bias, fan_in_fan_out)
        _lora_forward_into(y, x2d, adapters, keep=False)
    return y.view(out_shape)


# -- mixed-adapter batches -----------------------------------------------------------


def mixed_batch_delta(layer, x: torch.Tensor, adapter_names: list[str], result: torch.Tensor):
    """Add each row's adapter output to ``result`` with batched matmuls; None to fall back.

    Rows naming ``__base__`` (or an adapter this layer does not have) get nothing, as
    in the plain path. Ranks may differ: A and B are zero-padded to the largest rank,
    which adds exact zeros.
    """
    if not _input_ok(x) or not _fast_context_ok(x.device) or type(result) is not torch.Tensor or x.dim() < 2:
        return None
    if result.dtype != x.dtype or result.shape[0] != x.shape[0]:
        return None
    names = [n for n in dict.fromkeys(adapter_names) if n != BASE_ADAPTER and n in layer.r]
    if not names:
        return result
    As, Bs, biases, scalings = [], [], [], []
    for name in names:
        adapter = _adapter(layer, name, x.dtype, x.device)
        if adapter is None or adapter.p:
            return None  # a training-mode dropout draws random masks: the plain path keeps its RNG order
        As.append(adapter.A)
        Bs.append(adapter.B)
        biases.append(adapter.bias)
        scalings.append(adapter.scaling)
    in_features, out_features = As[0].shape[1], Bs[0].shape[0]
    if x.shape[-1] != in_features or result.shape[-1] != out_features:
        return None

    index = {name: i for i, name in enumerate(names)}
    row_adapter = [index.get(n, -1) for n in adapter_names]
    rows = [i for i, a in enumerate(row_adapter) if a >= 0]
    grad = torch.is_grad_enabled() and (
        x.requires_grad or result.requires_grad or any(t is not None and t.requires_grad for t in As + Bs + biases)
    )

    x3 = x.reshape(x.shape[0], -1, in_features)
    if len(rows) != len(row_adapter):
        rows_t = torch.tensor(rows, device=x.device)
        x3 = x3.index_select(0, rows_t)
    picks = [row_adapter[i] for i in rows]

    delta = kernels.segmented_lora(x3, As, Bs, biases, scalings, picks) if kernels.usable(x3) and not grad else None
    all_rows = len(rows) == len(row_adapter)
    if delta is None:
        if all_rows and not grad and result.is_contiguous():
            # accumulate straight into the base output: no (rows, T, out) temporary, no extra pass
            _grouped_delta(x3, As, Bs, biases, scalings, picks, out=result.view(x3.shape[0], x3.shape[1], -1))
            return result
        delta = _grouped_delta(x3, As, Bs, biases, scalings, picks)
    delta = delta.view(len(rows), *result.shape[1:])
    if all_rows:
        return result + delta if grad else result.add_(delta)
    return result.index_add(0, rows_t, delta) if grad else result.index_add_(0, rows_t, delta)


def _grouped_delta(x3, As, Bs, biases, scalings, picks: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """``s_k * (x_b A_k.T) B_k.T (+ s_k bias_k)`` for every row b with adapter k = picks[b].

    With ``out`` (no autograd) the products are added into it in place.
    """
    r_max = max(A.shape[0] for A in As)
    device = x3.device
    has_bias = any(b is not None for b in biases)
    if len(As) == 1:
        # one adapter: a single (rows*T, in) GEMM pair beats per-row bmm
        flat = x3.reshape(-1, x3.shape[-1])
        xa = torch.mm(flat, As[0].t())
        if out is not None:
            out2d = out.view(-1, out.shape[-1])
            out2d.addmm_(xa, Bs[0].t(), alpha=scalings[0])
            if has_bias:
                out2d.add_(biases[0], alpha=scalings[0])
            return out
        delta = torch.mm(xa, Bs[0].t()) * scalings[0]
        if has_bias:
            delta = delta + biases[0] * scalings[0]
        return delta.view(*x3.shape[:2], -1)
    # one gather per factor, straight into per-row stacks (no stack-then-index double copy)
    A_rows = stack_padded([As[k] for k in picks], 0, r_max)  # (rows, r, in)
    B_rows = stack_padded([Bs[k] for k in picks], 1, r_max)  # (rows, out, r)
    scale = torch.tensor([scalings[k] for k in picks], dtype=x3.dtype, device=device).view(-1, 1, 1)
    xa = (
        torch.bmm(x3, A_rows.transpose(1, 2)).mul_(scale)
        if out is not None
        else torch.bmm(x3, A_rows.transpose(1, 2)) * scale
    )
    if has_bias:
        zero = torch.zeros(Bs[0].shape[0], dtype=x3.dtype, device=device)
        bias_rows = (
            torch.stack([biases[k] if biases[k] is not None else zero for k in picks]) * scale.view(-1, 1)
        ).unsqueeze(1)
    if out is not None:
        out.baddbmm_(xa, B_rows.transpose(1, 2))
        if has_bias:
            out.add_(bias_rows)
        return out
    delta = torch.bmm(xa, B_rows.transpose(1, 2))
    if has_bias:
        delta = delta + bias_rows
    return delta
