"""Keeping fewer activations for backward, with the same gradients.

In a SwiGLU/GeGLU block, ``act(gate) * up`` makes autograd keep three tensors of the
intermediate size: ``gate`` (for the activation's own backward), ``act(gate)`` and ``up``
(for the multiplication's). The middle one is ``act`` of a tensor that is kept anyway,
so while a peftcore model runs forward with gradients, a saved-tensor hook stores such
outputs as "this activation of that kept input" and recomputes them in backward: one
elementwise op per block, the same kernel on the same input, so the same bits.
About 1/5 of a LLaMA block's saved activations without gradient checkpointing.

The hook only goes on when nobody else's saved-tensor hooks are in force (checkpointing,
``torch.autograd.graph.save_on_cpu``): those see every saved tensor as they expect.
``PEFTCORE_RECOMPUTE_ACTIVATIONS=0`` switches it off for the process.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

ENV_SWITCH = "PEFTCORE_RECOMPUTE_ACTIVATIONS"


class Recompute:
    """A saved activation output, kept as the activation's input and how to apply it again."""

    __slots__ = ("kind", "source", "approximate")

    def __init__(self, kind: str, source: torch.Tensor, approximate: str = "none"):
        self.kind, self.source, self.approximate = kind, source, approximate

    def value(self) -> torch.Tensor:
        if self.kind == "silu":
            return F.silu(self.source)
        return F.gelu(self.source, approximate=self.approximate)


def recompute_from_node(node) -> Recompute | None:
    """How to redo the output of autograd ``node`` from the input it keeps, or None.

    Only SiLU and GELU nodes that kept their input (``_saved_self``) qualify.
    """
    if node is None:
        return None
    name = node.name()
    if name not in ("SiluBackward0", "GeluBackward0"):
        return None
    try:
        source = node._saved_self
    except RuntimeError:  # the input was modified in place since: autograd will say so in backward
        return None
    if type(source) is not torch.Tensor:
        return None
    if name == "SiluBackward0":
        return Recompute("silu", source)
    return Recompute("gelu", source, node._saved_approximate)


def recompute_of(tensor: torch.Tensor) -> Recompute | None:
    """How to rebuild ``tensor``, the whole output of a SiLU/GELU, or None (views and the rest are kept)."""
    if tensor.grad_fn is None or tensor._is_view():
        return None
    recipe = recompute_from_node(tensor.grad_fn)
    if recipe is None or recipe.source.shape != tensor.shape or recipe.source.dtype != tensor.dtype:
        return None
    return recipe


def _pack(tensor: torch.Tensor):
    recipe = recompute_of(tensor)
    return tensor if recipe is None else recipe


def _unpack(packed):
    return packed.value() if isinstance(packed, Recompute) else packed


_UNKNOWN = object()  # torch internals this module does not know


def _hooks_in_force():
    """The (pack, unpack) pair of saved-tensor hooks now on top, None, or ``_UNKNOWN``."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return _UNKNOWN
    try:
        return top(False)
    except Exception:
        return _UNKNOWN


def active() -> bool:
    """Whether this module's hook is the saved-tensor hook in force right now."""
    hooks = _hooks_in_force()
    return hooks is not None and hooks is not _UNKNOWN and hooks[0] is _pack


def foreign_hooks_in_force() -> bool:
    """Whether someone else's saved-tensor hooks (checkpointing, offloading) are in force; unknown counts as yes."""
    hooks = _hooks_in_force()
    return hooks is _UNKNOWN or (hooks is not None and hooks[0] is not _pack)


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def recomputing_activations():
    """Context for a forward pass: the hook when gradients are on and nothing else hooks saving."""
    if (
        not enabled()
        or not torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or foreign_hooks_in_force()
    ):
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
