"""PEFT's adapter folder as files: their names, atomic writes, and finding them locally or on the Hub."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


class AdapterFileError(ValueError):
    """An adapter folder or file that cannot be used, with the path and the reason."""


@contextmanager
def atomic_path(final_path: str | os.PathLike):
    """Yield a temporary path beside ``final_path``; rename over it only on success.

    An interrupted or failed save leaves whatever was at ``final_path`` untouched.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


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
        path = Path(model_id, subfolder or "", filename)
        return str(path) if path.is_file() else None
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
