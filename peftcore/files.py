"""PEFT's adapter folder as files: their names, and finding them locally (after any interrupted save) or on the Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

from peftcore.errors import PeftError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
README_NAME = "README.md"  # the model card (peftcore.model_card)


class AdapterFileError(PeftError, ValueError):
    """An adapter folder or file that cannot be used, with the path and the reason."""


def check_tensor_kind(name: str, tensor, target, target_name: str) -> None:
    """Refuse file tensor ``name`` when its dtype cannot hold the values of ``target`` (the model's tensor).

    Copying integer or boolean values into float weights would silently cast them to garbage.
    """
    if target.is_floating_point() and not tensor.is_floating_point():
        dtype = str(tensor.dtype).replace("torch.", "")
        raise AdapterFileError(
            f"tensor {name!r} is {dtype}, but {target_name} in the model is "
            f"{str(target.dtype).replace('torch.', '')}: adapter weights are floating point, so the file is damaged "
            "or not an adapter"
        )


# An interrupted save_pretrained can leave a commit record beside the files (see peftcore.adapter_folder):
# once it exists, the folder *is* the new save, partly still under the staged names it lists.
COMMIT_RECORD_NAME = ".peftcore-commit.json"
STAGED_PREFIX = ".peftcore-staged-"
COMMIT_FORMAT = "peftcore-folder-commit/1"


def read_commit_record(folder: str | os.PathLike) -> dict | None:
    """The commit record of a save that was interrupted after its commit point, or None.

    ``{"format": ..., "files": {final name: staged name}, "remove": [final names]}``.
    """
    path = Path(folder) / COMMIT_RECORD_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path}: cannot read the record of an interrupted save ({exc})") from None
    try:
        record = json.loads(text)
        files, remove = record["files"], record["remove"]
        names_ok = all(
            isinstance(final, str) and isinstance(staged, str) and os.path.basename(final) == final
            and staged == f"{STAGED_PREFIX}{record['token']}-{final}" for final, staged in files.items()
        ) and all(isinstance(name, str) and os.path.basename(name) == name for name in remove)
        if record["format"] != COMMIT_FORMAT or not names_ok:
            raise ValueError("unexpected contents")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise AdapterFileError(
            f"{path}: damaged record of an interrupted save ({exc}); save the adapter again, or delete this file "
            "to read the folder as it is"
        ) from None
    return record


def committed_file(folder: str | os.PathLike, filename: str) -> str | None:
    """Where ``filename`` of the local adapter ``folder`` is, as its last committed save left it (None: absent)."""
    folder = Path(folder)
    record = read_commit_record(folder)
    if record is not None:
        if filename in record["remove"]:
            return None
        if filename in record["files"]:
            staged = folder / record["files"][filename]
            if staged.is_file():  # not yet renamed into place
                return str(staged)
    path = folder / filename
    return str(path) if path.is_file() else None


def _is_local(path: str | os.PathLike) -> bool:
    return os.path.isdir(path)


def resolve_file(
    model_id: str | os.PathLike, filename: str, subfolder: str | None = None, required: bool = False, **hub_kwargs
) -> str | None:
    """Path of ``filename`` in a local adapter folder or a Hub repo (through the local cache).

    Returns None when the file is absent, unless ``required``: then a repo that
    cannot be found is an error naming it. A local folder never falls through to
    the Hub: a missing file there is reported as missing, not as a bad repo id.
    """
    model_id = str(model_id)
    if _is_local(model_id):
        return committed_file(Path(model_id, subfolder or ""), filename)
    looks_like_path = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
    if looks_like_path:
        raise AdapterFileError(f"{model_id}: no such adapter folder")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    allowed = {"revision", "cache_dir", "token", "local_files_only", "force_download", "proxies"}
    kwargs = {k: v for k, v in hub_kwargs.items() if k in allowed and v is not None}
    try:
        return hf_hub_download(model_id, filename, subfolder=subfolder or None, **kwargs)
    except (RepositoryNotFoundError, LocalEntryNotFoundError, EntryNotFoundError) as exc:
        if not required and not isinstance(exc, RepositoryNotFoundError):
            return None
        raise AdapterFileError(
            f"{model_id}: not a local folder, and not found on the Hub or in the local Hub cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    except Exception as exc:
        if type(exc).__name__ in ("OfflineModeIsEnabled", "HFValidationError"):
            raise AdapterFileError(f"{model_id}: not a local folder and not usable as a Hub repo id ({exc})") from None
        raise
