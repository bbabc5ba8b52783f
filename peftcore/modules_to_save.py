"""Fully trained copies of selected modules (``modules_to_save``), one per adapter."""

from __future__ import annotations

import copy

from torch import nn

from peftcore.layer import rows_by_adapter
from peftcore.walking import set_submodule, walk_modules


class ModulesToSaveWrapper(nn.Module):
    """Keeps ``original_module`` frozen and trains a copy per adapter (PEFT's layout)."""

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: str | None = None
        self._disable_adapters = False
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        # attributes such as ``weight`` or ``out_features`` read through to the module in use (the active copy; the
        # original while adapters are disabled), as in PEFT
        modules = self.__dict__["_modules"]
        saved, active = modules.get("modules_to_save"), self.__dict__.get("_active_adapter")
        enabled = not self.__dict__.get("_disable_adapters", False)
        module = saved[active] if enabled and saved is not None and active in saved else modules["original_module"]
        return getattr(module, name)

    @property
    def active_adapter(self) -> str | None:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:  # PEFT's spelling, shared with the adapter layers
        return [] if self._active_adapter is None else [self._active_adapter]

    #: PEFT's name for the per-adapter holders (code that walks wrappers and layers alike reads it)
    adapter_layer_names = ("modules_to_save",)

    @property
    def active_module(self) -> nn.Module:
        if self._disable_adapters or self._active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        self.modules_to_save[adapter_name].requires_grad_(adapter_name == self._active_adapter)

    def adapter_to_activate(self, adapter_names: str | list[str] | None) -> str | None:
        """Which of ``adapter_names`` this wrapper runs: the one it holds a copy for (PEFT's rule: several active
        adapters may share a model, not a wrapper); None when it holds none of them."""
        if adapter_names is None or isinstance(adapter_names, str):
            return adapter_names
        held = [name for name in adapter_names if name in self.modules_to_save]
        if len(held) > 1:
            raise ValueError(f"Only one adapter can be set at a time for ModulesToSaveWrapper, got {len(held)}: "
                             f"{held} each have a copy of this module")
        return held[0] if held else None

    def set_adapter(self, adapter_name: str | list[str] | None) -> None:
        adapter_name = self.adapter_to_activate(adapter_name)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)
        self._active_adapter = adapter_name

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self.modules_to_save):
            self.modules_to_save[name].requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        if self._active_adapter in self.modules_to_save:
            self.modules_to_save[self._active_adapter].requires_grad_(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = next(iter(self.modules_to_save), None)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        # the arguments pass as they came: some parents call their modules with keywords only
        if adapter_names is None or self._disable_adapters:
            return self.active_module(*args, **kwargs)
        if not args:
            raise TypeError(f"mixed-adapter batches split the first positional argument by rows; "
                            f"{type(self.original_module).__name__} was called with keywords only ({sorted(kwargs)})")
        return self._mixed_batch_forward(*args, adapter_names=adapter_names, **kwargs)

    def _mixed_batch_forward(self, x, *args, adapter_names, **kwargs):
        outputs = []
        for name, rows in rows_by_adapter(adapter_names, x.shape[0]).items():
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            outputs.append((rows, module(x[rows], *args, **kwargs)))
        first = outputs[0][1]
        result = first.new_empty((x.shape[0],) + tuple(first.shape[1:]))
        for rows, out in outputs:
            result[rows] = out
        return result

    def unwrapped(self) -> nn.Module:
        """The module to put back when the adapter is unloaded: the active copy, or the original."""
        return self.active_module


def saved_module_wrappers(model: nn.Module) -> list[ModulesToSaveWrapper]:
    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def wrap_modules_to_save(model: nn.Module, names: list[str] | None, adapter_name: str, modules=None) -> None:
    """Give adapter ``adapter_name`` its own trainable copy of each module named in ``names``.

    PEFT's rule: the dotted path equals a name or ends with ``.name``. ``modules``
    ((key, module) pairs) replaces ``model.named_modules()`` where the caller has a
    cheaper walk; copies already made for other adapters are never wrapped again.
    """
    if not names:
        return
    for key, module in list(model.named_modules() if modules is None else modules):
        if not key or not any(key == n or key.endswith(f".{n}") for n in names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
            continue
        if ".modules_to_save." in key or key.endswith(".original_module") or ".original_module." in key:
            continue
        set_submodule(model, key, ModulesToSaveWrapper(module, adapter_name))


def check_modules_to_save(model: nn.Module, names: list[str] | None, ignore=()) -> None:
    """Each of ``names`` (but those in ``ignore``: a task's usual heads, which a model may lack) names a module."""
    asked = [n for n in names or () if n not in ignore]
    if not asked:
        return
    keys = [key for key, _ in walk_modules(model)]
    absent = [n for n in asked if not any(key == n or key.endswith(f".{n}") for key in keys)]
    if absent:
        raise ValueError(
            f"modules_to_save names {absent}, but {type(model).__name__} has no module of that name (a name matches "
            "a module's dotted path or its last parts, e.g. 'classifier' or 'pooler.dense')"
        )


def unwrap_modules_to_save(model: nn.Module) -> None:
    """Put back the original modules where no adapter copy is left."""
    for key, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper) and not module.modules_to_save:
            set_submodule(model, key, module.original_module)
