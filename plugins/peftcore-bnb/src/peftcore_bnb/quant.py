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
    place into a CPU kernel layout (``quant_state.packing_format_for_cpu``); dequantising
    that as if it were the standard layout gives wrong numbers, so undo the packing on a copy
    (bitsandbytes' inverse rewrites the state it is given, which would leave the layer's
    packed data described by an unpacked state).
    """
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(state))
    return weight.data, state


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
