"""Which modules a config targets, with PEFT's rules.

These are the core's answers to the ``is_target_module`` and ``prepare_config``
hooks; plugins may answer first. Default targets per architecture belong to the
methods (``default_target_modules``): the core has no table of its own.
"""

from __future__ import annotations

import copy
import re
from typing import Callable

from torch import nn

from peftcore.layer import AdapterLayer
from peftcore.walking import walk_modules

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")

def linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _layer_index(key: str, layers_pattern) -> int | None:
    if not layers_pattern:
        found = re.match(r".*\.[^.]*\.(\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = None
        for pattern in patterns:
            found = re.match(rf".*\.{pattern}\.(\d+)\.", key)
            if found is not None:
                break
    return None if found is None else int(found.group(1))


def is_excluded(config, key: str) -> bool:
    exclude = getattr(config, "exclude_modules", None)
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, key) is not None
    return key in exclude or any(key.endswith(f".{name}") for name in exclude)


def _ends_with_any(key: str, names) -> bool:
    """``any(key.endswith("." + n) for n in names)``, by looking up each dotted suffix of ``key``.

    "all-linear" resolves to every linear layer's full name: scanning hundreds of names
    for each module made matching quadratic; a module path has only a few suffixes.
    """
    if not isinstance(names, (set, frozenset, dict)):
        names = set(names)
    rest = key
    while "." in rest:
        rest = rest.split(".", 1)[1]
        if rest in names:
            return True
    return False


def matches_target(config, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for one dotted module name."""
    if is_excluded(config, key):
        return False
    to_save = getattr(config, "modules_to_save", None) or ()
    if any(key == name or key.endswith(f".{name}") for name in to_save):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not _ends_with_any(key, targets):
        return False
    wanted = getattr(config, "layers_to_transform", None)
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    index = _layer_index(key, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def all_linear_names(model: nn.Module, task_type=None) -> set[str]:
    """Every Linear/Conv1D module's name except the output head, as PEFT expands "all-linear"."""
    from transformers import PreTrainedModel

    # nothing inside an adapter layer counts; not entering them keeps this flat in the number of adapters
    modules = list(walk_modules(model, stop_at=(AdapterLayer,)))
    names = set()
    for name, module in modules:
        if isinstance(module, linear_types()) or (
            isinstance(module, AdapterLayer) and "Linear" in type(module).__name__
        ):
            names.add(name)
    excluded = set()
    if isinstance(model, PreTrainedModel):
        head = model.get_output_embeddings()
        if head is None and str(task_type) == "SEQ_CLS":
            head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
        if head is not None:
            excluded.update(name for name, module in modules if module is head)
    return names - excluded


def resolve_targets(config, model: nn.Module, default_targets: Callable[[str | None], list[str] | str | None]) -> None:
    """Fill in ``target_modules`` when None (``default_targets(model_type)``) or "all-linear"."""
    if not hasattr(config, "target_modules"):
        return
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = default_targets(model_type)
        if targets is None:
            raise ValueError(
                f"Please specify `target_modules` in `peft_config`: {type(config).__name__}.target_modules is None "
                "and no installed plugin has a default for "
                f"model_type {model_type!r}; pass target_modules explicitly, e.g. ['q_proj', 'v_proj'] or 'all-linear'"
            )
        config.target_modules = targets if isinstance(targets, str) else set(targets)
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = all_linear_names(model, config.task_type)


def module_names_in_state_dict(state_dict: dict, tensor_prefixes: tuple[str, ...]) -> set[str]:
    """The modules an adapter state dict has tensors for: the part of each key before the method's first segment
    (``x.q.lora_A.weight`` -> ``x.q``), without PEFT's ``base_model.model.`` or torch.compile's ``_orig_mod.``."""
    names = set()
    for key in state_dict:
        parts = key.split(".")
        cut = next((i for i, part in enumerate(parts) if part.startswith(tensor_prefixes)), None)
        if cut is None:
            continue
        name = ".".join(parts[:cut]).removeprefix("base_model.model.").removeprefix("_orig_mod.")
        names.add(name)
    return names


def describe_no_match(config, model: nn.Module) -> str:
    names = [name for name, _ in model.named_modules() if name]
    leaves = [name for name, module in model.named_modules() if name and not list(module.children())]
    sample = ", ".join(leaves[:12]) + (" ..." if len(leaves) > 12 else "")
    targets = config.target_modules
    shown = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    extra = ""
    if getattr(config, "layers_to_transform", None) is not None:
        extra = f" with layers_to_transform={config.layers_to_transform!r}, layers_pattern={config.layers_pattern!r}"
    if getattr(config, "exclude_modules", None):
        extra += f" after exclude_modules={config.exclude_modules!r}"
    details = f"matched no module of {type(model).__name__} ({len(names)} modules). Some module names: {sample}"
    unfiltered = copy.copy(config)
    unfiltered.exclude_modules, unfiltered.modules_to_save = None, None
    held_back = [name for name in names if matches_target(unfiltered, name)]
    # PEFT's wording for each case first; "all excluded" in PEFT's sense: every module was targeted and excluded
    if held_back and len(held_back) == len(names) and all(is_excluded(config, name) for name in held_back):
        return ("All modules were excluded. This is likely unintended. Check your `target_modules`, "
                f"`exclude_modules` and `modules_to_save` configuration: target modules {shown!r}{extra} {details}")
    to_save = getattr(config, "modules_to_save", None) or ()
    set_aside = [name for name in names
                 if is_excluded(config, name) or any(name == m or name.endswith(f".{m}") for m in to_save)]
    if held_back or set_aside:  # PEFT counts modules_to_save and excluded modules alike
        why = (f"{held_back[:4]} match target_modules but are excluded or in modules_to_save" if held_back else
               f"target modules {shown!r}{extra} {details}; {set_aside[:4]} are excluded or in modules_to_save")
        return ("No modules were targeted for adaptation. This might be caused by a combination of mismatched target "
                "modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
                f"configuration. You may also have only targeted modules that are marked to be saved "
                f"(`modules_to_save`): {why}")
    return (f"Target modules {targets} not found in the base model. Please check the target modules and try again: "
            f"target modules {shown!r}{extra} {details}")
