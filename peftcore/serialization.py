"""Reading and writing PEFT's adapter files, atomically, safetensors first."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from peftcore.config import CONFIG_NAME, PeftConfig, json_ready
from peftcore.plugins import get_method, hooks, method_for_config, methods, no_methods_hint

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


class AdapterFileError(ValueError):
    """An adapter folder or file that cannot be used, with the path and the reason."""


# -- atomic writes --------------------------------------------------------------


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


# -- configs --------------------------------------------------------------------


def config_as_dict(config: PeftConfig) -> dict:
    data = hooks.config_to_dict(config=config)
    return json_ready(data)


def write_config(config: PeftConfig, save_directory: str | os.PathLike, inference_mode: bool = True) -> None:
    data = config_as_dict(config)
    data["inference_mode"] = inference_mode
    write_text_atomic(Path(save_directory) / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True))


def config_from_dict(data: dict) -> PeftConfig:
    if "peft_type" not in data:
        raise AdapterFileError(f"adapter config has no 'peft_type' (keys: {sorted(data)})")
    if not methods():
        raise AdapterFileError(f"adapter config has peft_type {data['peft_type']!r}. {no_methods_hint()}")
    try:
        get_method(data["peft_type"])
    except ValueError as exc:
        raise AdapterFileError(str(exc)) from None
    return hooks.config_from_dict(data=dict(data))


def get_peft_config(config_dict: dict) -> PeftConfig:
    """PEFT's name for building a config from a dict like ``adapter_config.json`` (validated)."""
    return config_from_dict(config_dict)


def _is_local(path: str | os.PathLike) -> bool:
    return os.path.isdir(path)


def resolve_file(model_id: str | os.PathLike, filename: str, subfolder: str | None = None, required: bool = False, **hub_kwargs) -> str | None:
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


def read_config(model_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> PeftConfig:
    path = resolve_file(model_id, CONFIG_NAME, subfolder, required=True, **hub_kwargs)
    where = os.path.join(str(model_id), subfolder or "")
    if path is None:
        raise AdapterFileError(f"{where}: no {CONFIG_NAME} (is this a PEFT adapter folder?)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    data.pop("runtime_config", None)
    return config_from_dict(data)


# -- weights --------------------------------------------------------------------


def save_weights(state_dict: dict[str, torch.Tensor], save_directory: str | os.PathLike, safe_serialization: bool = True) -> str:
    if safe_serialization:
        from safetensors.torch import save_file

        # safetensors refuses shared storage; contiguous copies cost little for adapters
        tensors = {k: v.detach().contiguous().clone() if _shares_storage(v, state_dict) else v.detach().contiguous() for k, v in state_dict.items()}
        final = Path(save_directory) / SAFETENSORS_WEIGHTS_NAME
        with atomic_path(final) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
    else:
        final = Path(save_directory) / PICKLE_WEIGHTS_NAME
        with atomic_path(final) as tmp:
            torch.save({k: v.detach() for k, v in state_dict.items()}, tmp)
    return str(final)


def _shares_storage(tensor: torch.Tensor, state_dict: dict[str, torch.Tensor]) -> bool:
    ptr = tensor.untyped_storage().data_ptr()
    return sum(1 for t in state_dict.values() if t.untyped_storage().data_ptr() == ptr) > 1


def load_weights(model_id: str | os.PathLike, subfolder: str | None = None, allow_pickle: bool = False, device: str = "cpu", **hub_kwargs) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (or, only with ``allow_pickle=True``, ``adapter_model.bin``)."""
    where = os.path.join(str(model_id), subfolder or "")
    path = resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder, **hub_kwargs)
    if path is not None:
        from safetensors.torch import load_file

        try:
            return load_file(path, device=device)
        except Exception as exc:
            raise AdapterFileError(f"{path}: cannot read safetensors file ({type(exc).__name__}: {exc})") from None
    pickled = resolve_file(model_id, PICKLE_WEIGHTS_NAME, subfolder, **hub_kwargs)
    if pickled is None:
        raise AdapterFileError(f"{where}: has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME} (the weights are missing)")
    if not allow_pickle:
        raise AdapterFileError(
            f"{pickled}: only a pickle file ({PICKLE_WEIGHTS_NAME}) is present; pickle can run arbitrary code, "
            "so it is loaded only with allow_pickle=True"
        )
    try:
        return torch.load(pickled, map_location=device, weights_only=True)
    except Exception as exc:
        raise AdapterFileError(f"{pickled}: cannot read pickle file ({type(exc).__name__}: {exc})") from None


# -- the core's default tensor naming ---------------------------------------------

_SAVED_COPY = ".modules_to_save."


def modules_to_save_disk_key(key: str, adapter_name: str) -> str | None:
    """``x.classifier.modules_to_save.<adapter>.weight`` -> ``x.classifier.weight``."""
    marker = f"{_SAVED_COPY}{adapter_name}."
    if marker not in key:
        return None
    return key.replace(marker, ".")


def disk_key(key: str, adapter_name: str, config: PeftConfig, method=None) -> str | None:
    method = method or method_for_config(config)
    return method.to_disk_key(key, adapter_name, config) or modules_to_save_disk_key(key, adapter_name)


def default_adapter_state_dict(model, config: PeftConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    method = method_for_config(config)
    out = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        name = disk_key(key, adapter_name, config, method)
        if name is not None:
            out[name] = tensor
    return out


def adapter_view_state_dict(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)`` without the other adapters' per-adapter entries.

    Adapter layers keep one entry per adapter in their holders (``lora_A[name]``...) and
    ``modules_to_save`` one copy per adapter; skipping the other adapters' entries keeps
    loading an adapter as fast with 16 adapters in the model as with one.
    """
    from peftcore.layer import AdapterLayer
    from peftcore.modules_to_save import ModulesToSaveWrapper

    out: dict[str, torch.Tensor] = {}

    class Hooked(Exception):
        pass

    def visit(module, prefix: str, only: str | None) -> None:
        if module._state_dict_hooks or module._state_dict_pre_hooks:
            raise Hooked  # hooks may rename keys (FSDP does): only state_dict() itself is right then
        for name, param in module._parameters.items():
            if param is not None and (only is None or name == only):
                out[prefix + name] = param
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set and (only is None or name == only):
                out[prefix + name] = buf
        if isinstance(module, AdapterLayer):
            per_adapter = set(module.adapter_layer_names) | set(module.other_param_names)
        elif isinstance(module, ModulesToSaveWrapper):
            per_adapter = {"modules_to_save"}
        else:
            per_adapter = ()
        for name, child in module._modules.items():
            if child is None or (only is not None and name != only):
                continue
            visit(child, f"{prefix}{name}.", adapter_name if name in per_adapter else None)

    try:
        visit(model, "", None)
    except Hooked:
        return model.state_dict(keep_vars=True)
    return out


def default_load_adapter_state_dict(model, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]):
    method = method_for_config(config)
    own = adapter_view_state_dict(model, adapter_name)
    by_disk_name = {}
    for key in own:
        name = disk_key(key, adapter_name, config, method)
        if name is not None:
            by_disk_name[name] = key
    unexpected = [k for k in state_dict if k not in by_disk_name]
    missing = [k for k in by_disk_name if k not in state_dict]
    pairs = [(own[by_disk_name[name]], tensor, name) for name, tensor in state_dict.items() if name in by_disk_name]
    for target, tensor, name in pairs:  # check every shape before touching any weight
        if target.shape != tensor.shape:
            raise AdapterFileError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} but {by_disk_name[name]} in the model has "
                f"{tuple(target.shape)} (different r, base model or config?)"
            )
    with torch.no_grad():
        for target, tensor, _ in pairs:
            target.copy_(tensor)
    return missing, unexpected


def warn_load_report(missing: list[str], unexpected: list[str], where: str) -> None:
    if missing:
        warnings.warn(f"{where}: {len(missing)} adapter tensors missing from the file, left at their init: {missing[:5]}", stacklevel=3)
    if unexpected:
        warnings.warn(f"{where}: {len(unexpected)} tensors in the file match nothing in the model and were ignored: {unexpected[:5]}", stacklevel=3)
