"""Walking a model's modules, and putting a module in another's place."""

from __future__ import annotations

from torch import nn

from peftcore.layer import AdapterLayer


def walk_modules(model: nn.Module, stop_at: tuple[type, ...] = ()):
    """``named_modules`` order, but never into an adapter layer's per-adapter holders.

    Each adapter adds sub-modules to every wrapped layer; skipping them keeps the
    cost of a walk independent of how many adapters the model holds. Modules of a
    type in ``stop_at`` are yielded but not entered (e.g. the wrappers: candidates
    for a new adapter never live inside one).
    """
    seen = set()
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if stop_at and isinstance(module, stop_at):
            continue
        if isinstance(module, AdapterLayer):
            skip = set(module.adapter_layer_names) | set(module.other_param_names)
        else:
            skip = ()
        children = [(child, sub) for child, sub in module._modules.items() if sub is not None and child not in skip]
        prefix = f"{name}." if name else ""
        stack.extend((prefix + child, sub) for child, sub in reversed(children))


def parent_and_name(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    """The module holding ``key`` (a dotted path inside ``model``) and the child's attribute name."""
    parent_name, _, child = key.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def set_submodule(model: nn.Module, key: str, module: nn.Module) -> None:
    parent, child = parent_and_name(model, key)
    setattr(parent, child, module)


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """``(parent, target, target_name)`` for the module at dotted path ``key`` (PEFT's ``_get_submodules``)."""
    parent, name = parent_and_name(model, key)
    return parent, model.get_submodule(key), name  # key "" is the model itself (its own parent, as in PEFT)
