"""Rebuilding a LoRA layer's input in backward instead of keeping it.

A frozen base layer's backward needs only its weight, so the LoRA gradient of A is
what makes every adapted layer keep its input alive (~1/3 of a LLaMA block's saved
activations). When that input is ``a * b`` and autograd already keeps ``a`` and ``b``
for the multiplication's own backward (or they can be rebuilt the same way), keeping
references to them costs nothing and one multiplication in backward restores the
input exactly: IEEE multiplication is correctly rounded, so ``a * b`` is the same
bits every time. Used by :class:`peftcore_lora.fast.FusedLoraLinear`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from peftcore import activation_savings

_MAX_DEPTH = 3  # RMSNorm: weight * (hidden * rsqrt(variance)) is two levels


def _saved_hooks_active() -> bool:
    """Whether saved-tensor hooks (non-reentrant checkpointing, CPU offload) are in force.

    Reading a multiplication's saved factors would run their unpack hook in forward
    (a recomputation or a copy), so rebuilding is only done without them. peftcore's
    own activation recomputation does not count: its recomputed factors are read as
    recipes (see :func:`_factor`). Unknown torch internals count as active.
    """
    return activation_savings.foreign_hooks_in_force()


def _factor(node, attr: str, producer, depth: int):
    """One factor of the product at ``node``: a kept tensor, an activation to redo, or a nested product."""
    if activation_savings.active():
        # the multiplication keeps an activation output as a recipe; reading it would redo it now
        redo = activation_savings.recompute_from_node(producer)
        if redo is not None:
            return redo
    factor = getattr(node, attr)  # None where autograd did not need to keep it
    if factor is None:
        return _product_recipe(producer, depth + 1)
    if type(factor) not in (torch.Tensor, nn.Parameter):
        return None
    return factor


def _product_recipe(node, depth: int = 0):
    """``(a, b)`` with ``node``'s output equal to ``a * b``; a factor is a tensor or a recipe."""
    if node is None or depth > _MAX_DEPTH or node.name() != "MulBackward0":
        return None
    factors = []
    for attr, (producer, _) in zip(("_saved_self", "_saved_other"), node.next_functions):
        factor = _factor(node, attr, producer, depth)
        if factor is None:
            return None
        factors.append(factor)
    return tuple(factors)


def _recipe_meta(recipe):
    """(shape, dtype, device) of what ``recipe`` rebuilds, or None if its factors disagree."""
    if isinstance(recipe, torch.Tensor):
        return recipe.shape, recipe.dtype, recipe.device
    if isinstance(recipe, activation_savings.Recompute):
        return _recipe_meta(recipe.source)
    metas = [_recipe_meta(f) for f in recipe]
    if None in metas or metas[0][2] != metas[1][2]:
        return None
    shape = _broadcast(tuple(metas[0][0]), tuple(metas[1][0]))
    if shape is None:
        return None
    return torch.Size(shape), torch.promote_types(metas[0][1], metas[1][1]), metas[0][2]


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """Broadcast shape of ``a`` and ``b``, or None (``torch.broadcast_shapes`` costs ~40 us per call)."""
    a, b = (1,) * (len(b) - len(a)) + a, (1,) * (len(a) - len(b)) + b
    out = []
    for i, j in zip(a, b):
        if i != j and 1 not in (i, j):
            return None
        out.append(j if i == 1 else i)
    return tuple(out)


def input_recipe(x: torch.Tensor):
    """``(a, b)`` (nested) with ``x == a * b`` from tensors autograd keeps anyway, or None."""
    if x.grad_fn is None or x._is_view() or _saved_hooks_active():
        return None
    try:
        recipe = _product_recipe(x.grad_fn)
    except RuntimeError:  # a factor was modified in place since: unpacking it fails
        return None
    if recipe is None or _recipe_meta(recipe) != (x.shape, x.dtype, x.device):
        return None
    return recipe


def _flatten_recipe(recipe, tensors: list) -> object:
    """The recipe's structure with each tensor replaced by its index in ``tensors``."""
    if isinstance(recipe, torch.Tensor):
        tensors.append(recipe)
        return len(tensors) - 1
    if isinstance(recipe, activation_savings.Recompute):
        return activation_savings.Recompute(recipe.kind, _flatten_recipe(recipe.source, tensors), recipe.approximate)
    return tuple(_flatten_recipe(f, tensors) for f in recipe)


def _rebuild(structure, tensors):
    if isinstance(structure, int):
        return tensors[structure]
    if isinstance(structure, activation_savings.Recompute):
        return activation_savings.Recompute(structure.kind, tensors[structure.source], structure.approximate).value()
    return _rebuild(structure[0], tensors) * _rebuild(structure[1], tensors)


class InputRebuild:
    """Rebuilds one input in backward; layers reading the same input share it.

    q/k/v (and gate/up) read one tensor: the product is formed once in backward,
    held until the last of them ran, then dropped. ``factors`` is only for layers
    still to join in forward; each layer saves them itself (autograd's version checks).
    """

    __slots__ = ("structure", "factors", "shape", "pending", "value", "__weakref__")

    def __init__(self, structure, factors: list, shape):
        self.structure, self.factors, self.shape = structure, factors, shape
        self.pending, self.value = 0, None

    def join(self) -> list:
        self.pending += 1
        return self.factors

    def take(self, saved_factors) -> torch.Tensor:
        self.factors = None  # forward is over; the saved copies are what counts now
        value = self.value if self.value is not None else _rebuild(self.structure, saved_factors).reshape(self.shape)
        self.pending -= 1
        self.value = value if self.pending > 0 else None
        return value


_last_rebuild: tuple | None = None  # (weakref to the input, weakref to its InputRebuild)


def input_rebuild(x: torch.Tensor, in_features: int) -> InputRebuild | None:
    """The shared :class:`InputRebuild` for ``x``, or None when ``x`` must be kept."""
    global _last_rebuild
    if _last_rebuild is not None and _last_rebuild[0]() is x:
        shared = _last_rebuild[1]()
        if shared is not None and shared.factors is not None:
            return shared
    recipe = input_recipe(x)
    if recipe is None:
        return None
    factors: list = []
    shared = InputRebuild(_flatten_recipe(recipe, factors), factors, (-1, in_features))
    _last_rebuild = (weakref.ref(x), weakref.ref(shared))
    return shared
