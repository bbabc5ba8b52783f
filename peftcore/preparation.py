"""Preparing a base model for adapter training, whatever the method: freezing, upcasting, input grads."""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """PEFT's recipe for training adapters on a quantised (or simply frozen) base model.

    Freezes every parameter, upcasts non-quantised fp16/bf16 parameters to fp32
    for stable training, and, with gradient checkpointing, makes the input
    embeddings require grad so checkpointed blocks on a frozen base still carry a
    gradient (the "element 0 of tensors does not require grad" error otherwise).
    """
    quantized = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ not in (
            "Params4bit",
            "Int8Params",
        ):
            param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing or quantized:
        enable_input_grads(model)
    if use_gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        kwargs = (
            {"use_reentrant": True} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def enable_input_grads(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))


def checkpointing_on(model: nn.Module) -> bool:
    on = getattr(model, "is_activation_checkpointing", None)  # transformers 5; the old name warns there
    return bool(on if on is not None else getattr(model, "is_gradient_checkpointing", False))


def require_input_grads(model: nn.Module) -> None:
    """Exactly one input-grad hook on ``model``'s embeddings (transformers may have added one already)."""
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    enable_input_grads(model)


# -- activation checkpointing: the layer inputs it keeps, off the accelerator --------------------------------


class HostOffload:
    """Saved-tensor hooks that keep saved tensors in (pinned) host memory until backward needs them.

    Around a checkpointed layer, the only tensors saved are what the checkpoint keeps
    to recompute the layer: its inputs (the hidden states, ``seq x hidden`` per layer).
    Host tensors stay where they are; ``moves`` (for tests) says which tensors move.
    """

    def __init__(self, pin_memory: bool = True, moves=None):
        self.pin_memory = pin_memory
        self.moves = moves if moves is not None else (lambda t: t.device.type != "cpu")
        self.packed = 0  # how many tensors went to the host (for tests and diagnostics)

    def pack(self, tensor: torch.Tensor):
        if not self.moves(tensor) or tensor.layout != torch.strided:
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=self.pin_memory)
        host.copy_(tensor, non_blocking=self.pin_memory)  # ordered on the stream before the block is reused
        self.packed += 1
        return tensor.device, host

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=self.pin_memory)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def offloaded_checkpoint(function, *args, offload: HostOffload, **checkpoint_kwargs):
    """``torch.utils.checkpoint.checkpoint`` with the layer inputs it keeps held by ``offload``."""
    from torch.utils.checkpoint import checkpoint

    with offload.hooks():
        return checkpoint(function, *args, **checkpoint_kwargs)


def offload_checkpointed_inputs(model: nn.Module, checkpoint_kwargs: dict, offload: HostOffload | None = None) -> int:
    """Make every checkpointed layer of ``model`` keep its inputs in host memory; returns how many layers.

    A no-op, with a warning saying so, for a model on the CPU (its inputs are in host
    memory already) unless ``offload`` says otherwise (tests).
    """
    if offload is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cpu":
            warnings.warn(
                "offload=True does nothing for a model on the CPU: the inputs kept by gradient checkpointing are "
                "in host memory already",
                stacklevel=3,
            )
            return 0
        offload = HostOffload(pin_memory=True)
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no checkpointed layers to offload; enable checkpointing first")
    for layer in layers:
        layer._gradient_checkpointing_func = partial(offloaded_checkpoint, offload=offload, **checkpoint_kwargs)
    return len(layers)


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to ``dtype`` (float16/bfloat16), trainable ones to float32, in place (PEFT's function):
    the memory of a half-precision base with full-precision adapter updates under autocast."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"cast_mixed_precision_params: dtype must be a floating torch.dtype, got {dtype!r}")
    for param in model.parameters():
        if param.is_floating_point():  # quantized storage (int8, packed 4-bit) keeps its dtype
            param.data = param.data.to(torch.float32 if param.requires_grad else dtype)
