"""Adapters that build on other adapters of the same model (learned fusion): naming and loading their members.

A config says which adapters it builds on with a field marked
``field(metadata={"member_adapters": True})`` (a list of adapter names). Loading such
an adapter needs its members in the model first: ``PeftModel.from_pretrained`` and
``load_adapter`` load the missing ones from the folders ``save_pretrained`` puts them
in (``<dir>/<member>``, beside a non-default adapter, or ``<dir>`` itself for a
member named ``default``), frozen.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from peftcore.files import CONFIG_NAME, AdapterFileError

MARK = "member_adapters"


def member_field(config_class: type) -> str | None:
    """The name of the config field listing the adapters an adapter builds on (None: it builds on none)."""
    if not dataclasses.is_dataclass(config_class):
        return None
    return next((f.name for f in dataclasses.fields(config_class) if f.metadata.get(MARK)), None)


def member_names(config) -> list[str]:
    field_name = member_field(type(config))
    return list(getattr(config, field_name) or ()) if field_name else []


def local_folder(model_id: str | os.PathLike, subfolder: str | None) -> str:
    return os.path.join(str(model_id), subfolder) if subfolder else str(model_id)


def member_folder(folder: str | os.PathLike, name: str) -> Path | None:
    """Where ``save_pretrained`` put adapter ``name`` relative to the adapter saved in ``folder`` (local folders)."""
    here = Path(folder)
    if not here.is_dir():
        return None
    candidates = [here / name, here.parent / name] + ([here.parent] if name == "default" else [])
    for candidate in candidates:
        if candidate.resolve() != here.resolve() and (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def _folder_of(folder, name: str, peft_type: str, missing: list[str]) -> Path:
    found = member_folder(folder, name)
    if found is None:
        raise AdapterFileError(
            f"{folder}: this {peft_type} adapter builds on adapters {missing} that the model does not hold, and "
            f"no folder {Path(folder) / name} (or beside it) has adapter {name!r}; load the members first with "
            "model.load_adapter(folder, name) under the names the adapter config lists"
        )
    return found


def load_missing_members(peft_model, folder, config, **load_kwargs) -> list[str]:
    """Load (frozen) every member adapter of ``config`` that ``peft_model`` lacks; returns the names loaded."""
    missing = [name for name in member_names(config) if name not in peft_model.peft_config]
    loaded: list[str] = []
    try:
        for name in missing:
            peft_model.load_adapter(_folder_of(folder, name, config.peft_type, missing), name, **load_kwargs)
            loaded.append(name)
    except Exception:
        for name in loaded:
            peft_model.delete_adapter(name)
        raise
    return loaded


def from_pretrained(model_cls, model, folder, adapter_name: str, config, is_trainable: bool, **load_kwargs):
    """``PeftModel.from_pretrained`` for an adapter with members: members first (frozen), then the adapter, active."""
    members = member_names(config)
    first = _folder_of(folder, members[0], config.peft_type, members)
    peft_model = model_cls.from_pretrained(model, first, adapter_name=members[0], **load_kwargs)
    peft_model.load_adapter(folder, adapter_name, is_trainable=is_trainable, **load_kwargs)
    peft_model.set_adapter(adapter_name, inference_mode=not is_trainable)
    return peft_model
