"""Loading several saved adapters into one model by their layers alone (``peftcore fuse``, ``apply fusion``).

Adapters trained for different tasks carry their own task heads (``modules_to_save``:
a 2-way and a 6-way classifier cannot share one model). Combining or fusing adapters
uses their adapted layers only, so each is loaded without its heads, named after its
folder, and must otherwise fit the base model exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

from peftcore.cli.errors import CliError, user_errors
from peftcore.config import read_config
from peftcore.peft_model import TASK_HEADS, PeftModel
from peftcore.plugins import hooks
from peftcore.serialization import load_weights


def names_for(folders: list[Path]) -> list[str]:
    """Adapter names from folder names: valid (no '.'), unique, never ``default`` (kept for the new adapter)."""
    names: list[str] = []
    for folder in folders:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(folder).resolve().name).strip("-") or "adapter"
        name, n = stem, 1
        while name in names or name == "default":
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def read_adapter(folder: Path):
    """(config, weights) of the adapter in ``folder``; a bad folder is a CliError naming it."""
    with user_errors(hint="check the folder with `peftcore info`"):
        return read_config(folder), load_weights(folder)


def _head_names(config) -> set[str]:
    names = set(getattr(config, "modules_to_save", None) or ())
    return names | set(TASK_HEADS.get(str(config.task_type) if config.task_type else None, ()))


def _is_head_tensor(key: str, heads: set[str]) -> bool:
    return any(re.search(rf"(^|\.){re.escape(head)}\.", key) for head in heads)


def load_bodies(base, folders: list[Path], names: list[str], model_cls=PeftModel):
    """A PeftModel on ``base`` holding each adapter (frozen) under its name, heads left out; returns (model, heads)."""
    model, dropped = None, set()
    for folder, name in zip(folders, names):
        config, weights = read_adapter(folder)
        heads = _head_names(config)
        config.inference_mode = True
        if hasattr(config, "modules_to_save"):
            config.modules_to_save = None
        config.task_type = None  # a task type would bring its head (modules_to_save) back
        with user_errors(hint=f"pass the base model {folder} was trained on ({config.base_model_name_or_path!r})"):
            if model is None:
                model = model_cls(base, config, name)
            else:
                model.add_adapter(name, config)
            missing, unexpected = hooks.load_adapter_state_dict(
                model=model, config=config, adapter_name=name, state_dict=weights
            )
        dropped |= {head for head in heads if any(_is_head_tensor(key, {head}) for key in unexpected)}
        unexpected = [key for key in unexpected if not _is_head_tensor(key, heads)]
        if missing or unexpected:
            detail = (f"{len(unexpected)} file tensors fit no module (e.g. {unexpected[:1]})" if unexpected
                      else f"{len(missing)} adapter tensors missing from the file (e.g. {missing[:1]})")
            raise CliError(f"the adapter in {folder} does not fit this base model: {detail}",
                           f"pass the model it was trained on (its config says {config.base_model_name_or_path!r})")
    return model.eval(), sorted(dropped)
