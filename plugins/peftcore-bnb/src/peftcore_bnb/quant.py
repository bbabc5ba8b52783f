"""Reading and writing the weights of bitsandbytes layers as full-precision tensors.

Everything that touches bitsandbytes' storage formats lives here, so the layer
classes only see float tensors. Every call into bitsandbytes is wrapped: a failure
there (an unsupported setting on this device) becomes a :class:`QuantizedLayerError`
naming the module and the setting, never a bare error from inside the library.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import bitsandbytes as bnb
import torch
from torch import nn

#: adapter dtypes whose sum with a dequantised weight bitsandbytes can quantise again
REPRESENTABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class QuantizedLayerError(RuntimeError):
    """bitsandbytes could not (de)quantise a layer's weights; the message names the module and why."""


def is_4bit(base: nn.Module) -> bool:
    return isinstance(base, bnb.nn.Linear4bit)


def is_8bit(base: nn.Module) -> bool:
    return isinstance(base, bnb.nn.Linear8bitLt)


def describe(base: nn.Module) -> str:
    """The quantisation of ``base`` in words ("4-bit nf4, double quant, blocksize 64")."""
    if is_4bit(base):
        w = base.weight
        double = ", double quant" if w.compress_statistics else ""
        return f"4-bit {w.quant_type}{double}, blocksize {w.blocksize}"
    return f"8-bit LLM.int8 (outlier threshold {base.state.threshold:g})"


@contextmanager
def bnb_errors(where: str, what: str):
    try:
        yield
    except QuantizedLayerError:
        raise
    except Exception as error:  # bitsandbytes raises RuntimeError, NotImplementedError, AssertionError...
        device = "CPU" if not torch.cuda.is_available() else "this device"
        raise QuantizedLayerError(
            f"{where}: bitsandbytes {bnb.__version__} could not {what} on {device} "
            f"({type(error).__name__}: {error})"
        ) from error


def dequantized_weight(base: nn.Module, where: str) -> torch.Tensor:
    """The layer's weight as a float32 (out, in) tensor."""
    weight = base.weight
    with bnb_errors(where, "dequantize the weight"):
        if is_4bit(base):
            return bnb.functional.dequantize_4bit(*unpacked_4bit(weight)).float()
        if weight.dtype != torch.int8:  # has_fp16_weights: stored in full precision already
            return weight.data.float()
        scb = getattr(weight, "SCB", None)
        scb = scb if scb is not None else base.state.SCB
        return weight.data.float() * scb.float().view(-1, 1) / 127.0


def unpacked_4bit(weight) -> tuple[torch.Tensor, object]:
    """(data, quant_state) in bitsandbytes' standard layout.

    In inference mode on CPUs with AVX512-BF16, ``Linear4bit.forward`` repacks its weight in
    place into a CPU kernel layout (``quant_state.packing_format_for_cpu``, absmax in bfloat16);
    dequantising that as if it were the standard layout gives wrong numbers. The standard
    layout kept by :func:`keep_trainable_layout` just before the repacking is returned when
    there is one (exact); otherwise bitsandbytes' inverse runs on a copy of the state (it
    rewrites the state it is given, and re-quantises the absmax, so it is close, not exact).
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    kept = getattr(weight, "_peftcore_standard_layout", None)
    if kept is not None and kept[0] is state:
        return kept[1], kept[2]
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(state))


def _will_repack(module: nn.Module, x) -> bool:
    """bitsandbytes' own condition (Linear4bit.forward) for repacking the weight on this call."""
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and not module.training and not x.requires_grad
            and getattr(module, "support_avx512bf16_for_cpu", False))


def keep_trainable_layout(module: nn.Module, args) -> None:
    """Forward pre-hook on every ``Linear4bit``: training always sees the standard 4-bit layout.

    bitsandbytes 0.50 on CPU repacks a 4-bit weight in place on the first inference-mode
    forward (eval, no grad) and keeps it; its matmul on the repacked layout does not
    back-propagate to the input, so after one evaluation every adapter below the last
    layer would silently stop learning (no gradient, loss unchanged). This keeps the
    standard layout (a reference, while repacked: one more 4-bit copy of the weight) just
    before bitsandbytes repacks, and puts it back, exactly, when training resumes.
    """
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None:
        return
    packed = getattr(state, "packing_format_for_cpu", False)
    if not packed and args and _will_repack(module, args[0]):
        # bitsandbytes reassigns the state's fields in place: a shallow copy keeps the standard ones
        weight._peftcore_standard_layout = (state, weight.data, copy.copy(state))
    elif packed and module.training:
        weight.data, weight.quant_state = unpacked_4bit(weight)
        weight._peftcore_standard_layout = None


def fused_4bit_operands(module: nn.Module, x: torch.Tensor):
    """``(form, shape, bias)`` for computing a ``Linear4bit``'s training forward outside it, or None.

    ``form()`` dequantises the weight into the input's dtype exactly as bitsandbytes' ``MatMul4Bit``
    does in its forward and again in its backward (the same ``dequantize_4bit`` op, nested absmax
    included). None, so that the layer runs itself, unless this call is one bitsandbytes would
    compute as ``x W.T + b`` with that weight: standard layout (no CPU repacking), input already in
    the compute dtype (no cast), weight quantised from that dtype, bias (if any) in it too, and no
    forward hooks on the layer but peftcore-bnb's own layout hook (which is run here first).
    """
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    if module._forward_hooks or any(h is not keep_trainable_layout for h in module._forward_pre_hooks.values()):
        return None
    if getattr(module, "_peftcore_bnb_layout_hook", False):
        keep_trainable_layout(module, (x,))
    if _will_repack(module, x):
        return None
    fix_4bit_weight_quant_state_from_module(module)
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    compute = module.compute_dtype if getattr(module, "compute_type_is_set", False) else None  # else set on first call
    if state is None or getattr(state, "packing_format_for_cpu", False) or compute != x.dtype or state.dtype != x.dtype:
        return None
    if state.nested and state.state2.blocksize != 256:
        return None  # bitsandbytes' matmul refuses it: let it say so
    bias = module.bias
    if bias is not None and bias.dtype != x.dtype:
        return None
    data = weight.data

    def form() -> torch.Tensor:
        return bnb.functional.dequantize_4bit(data, state)

    return form, tuple(state.shape), bias


def standard_layout_for_saving(module: nn.Module, prefix: str = "", keep_vars: bool = False) -> None:
    """State-dict pre-hook on every ``Linear4bit``: put the kept standard layout back before bitsandbytes saves.

    Otherwise ``Linear4bit._save_to_state_dict`` undoes its CPU repacking itself, in place and
    re-quantising the absmax: merely calling ``state_dict()`` (``save_pretrained`` does) would
    change the model's outputs (by up to 2 logits on SmolLM2).
    """
    weight = getattr(module, "weight", None)
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        kept = getattr(weight, "_peftcore_standard_layout", None)
        if kept is not None and kept[0] is weight.quant_state:
            weight.data, weight.quant_state = kept[1], kept[2]
            weight._peftcore_standard_layout = None


def snapshot(base: nn.Module) -> tuple:
    """References that put the layer's quantised storage back exactly (see :func:`restore`).

    The weight's ``data`` and ``quant_state`` are recorded too: bitsandbytes swaps them on the
    same parameter object (the CPU repacking above), so the object alone does not pin them.
    """
    weight = base.weight
    state = getattr(base, "state", None)
    extra = (state.CB, state.SCB) if state is not None else ()
    return weight, weight.data, getattr(weight, "quant_state", None), extra


def restore(base: nn.Module, saved: tuple) -> None:
    weight, data, quant_state, extra = saved
    weight.data = data
    if quant_state is not None:
        weight.quant_state = quant_state
    base.weight = weight
    if extra:
        base.state.CB, base.state.SCB = extra


def store_weight(base: nn.Module, weight: torch.Tensor, where: str) -> torch.Tensor:
    """Quantise ``weight`` (float, (out, in)) into ``base``; return what the layer now holds, dequantised."""
    old = base.weight
    device = old.device
    with bnb_errors(where, "quantize the merged weight"):
        if is_4bit(base):
            skip = ("data", "quant_state")
            kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k not in skip}
            kwargs.update(requires_grad=False, bnb_quantized=False)
            dtype = unpacked_4bit(old)[1].dtype  # the layer's own dtype, not the CPU kernel's bfloat16
            new = bnb.nn.Params4bit(weight.to("cpu", dtype), **kwargs).to(device)
        else:
            new = bnb.nn.Int8Params(weight.to("cpu", torch.float16), requires_grad=False,
                                    has_fp16_weights=base.state.has_fp16_weights)
            new = new.to(device) if base.state.has_fp16_weights else new._quantize(device)
    base.weight = new
    if is_8bit(base):  # the next forward reads the new CB/SCB from the weight again
        base.state.CB, base.state.SCB = None, None
    return dequantized_weight(base, where)


def dequantized_linear(base: nn.Module, dtype: torch.dtype | None, where: str) -> nn.Linear:
    """A plain ``nn.Linear`` with ``base``'s dequantised weight and bias (in ``dtype``, or the compute dtype)."""
    if dtype is None:
        dtype = base.weight.quant_state.dtype if is_4bit(base) else torch.float32
    weight = dequantized_weight(base, where)
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.data.to(dtype), requires_grad=False)
    return linear.to(base.bias.device if base.bias is not None else weight.device)
