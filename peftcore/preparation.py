"""Preparing a base model for adapter training, whatever the method: freezing, upcasting, input grads."""

from __future__ import annotations

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
