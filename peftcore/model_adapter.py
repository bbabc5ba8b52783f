"""The seam for methods that do not wrap layers (prompt tuning, prefix tuning, p-tuning).

Such a method answers ``create_model_adapter`` with a :class:`ModelAdapter`; the
:class:`~peftcore.peft_model.PeftModel` keeps it in ``prompt_encoder[adapter_name]``
(PEFT's attribute) and lets it rewrite the keyword arguments of every forward and
``generate`` call of the active adapter. Modules named in the config's
``modules_to_save`` (a classifier head) are trained as per-adapter copies, as with
layer methods. The prompt-learning building blocks live in :mod:`peftcore.prompt_learning`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftcore.modules_to_save import ModulesToSaveWrapper


class ModelAdapter(nn.Module):
    """Edits a model's inputs instead of its layers."""

    def prepare_forward(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Return the keyword arguments for ``model(**kwargs)`` with the adapter applied."""
        raise NotImplementedError

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Same for ``model.generate(**kwargs)``; defaults to :meth:`prepare_forward`."""
        return self.prepare_forward(model, kwargs)


def saved_module_wrappers(model: nn.Module) -> list[ModulesToSaveWrapper]:
    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def wrap_modules_to_save(model: nn.Module, names: list[str] | None, adapter_name: str) -> None:
    """Give adapter ``adapter_name`` its own trainable copy of each module named in ``names`` (PEFT's rule:
    the dotted path equals a name or ends with ``.name``)."""
    if not names:
        return
    for key, module in list(model.named_modules()):
        if not key or not any(key == n or key.endswith(f".{n}") for n in names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
            continue
        if ".modules_to_save." in key or ".original_module" in key:
            continue
        parent_name, _, child = key.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))


def unwrap_modules_to_save(model: nn.Module) -> None:
    """Put back the original modules where no adapter copy is left."""
    for key, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper) and not module.modules_to_save:
            parent_name, _, child = key.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.original_module)
