"""An adapter's weights file (safetensors first, pickle only on request) and PEFT's tensor names.

The names on disk are PEFT's: the core's default renames parameters with the
method's ``Method.disk_key``; plugins answer ``adapter_state_dict`` /
``load_adapter_state_dict`` first where their files do not mirror their parameters.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn

from peftcore import distributed, embedding_layers
from peftcore.adapter_folder import Writer, text_writer, write_files
from peftcore.config import PeftConfig, config_json
from peftcore.files import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    AdapterFileError,
    check_tensor_kind,
    resolve_file,
)
from peftcore.layer import AdapterLayer
from peftcore.modules_to_save import ModulesToSaveWrapper
from peftcore.plugins import method_for_config

# -- weights --------------------------------------------------------------------


def weights_writer(state_dict: dict[str, torch.Tensor], safe_serialization: bool = True) -> tuple[str, Writer]:
    """The weights file's name and a function writing ``state_dict`` to a given path in that format."""
    if safe_serialization:
        from safetensors.torch import save_file

        # safetensors refuses shared storage; contiguous copies cost little for adapters
        tensors = {
            k: v.detach().contiguous().clone() if _shares_storage(v, state_dict) else v.detach().contiguous()
            for k, v in state_dict.items()
        }
        return SAFETENSORS_WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"})
    tensors = {k: v.detach() for k, v in state_dict.items()}
    return PICKLE_WEIGHTS_NAME, lambda path: torch.save(tensors, path)


def _replaced_formats(weights_name: str) -> tuple[str, ...]:
    """A save in one format deletes the other's file, which loading would otherwise prefer or mix up."""
    return tuple(n for n in (SAFETENSORS_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME) if n != weights_name)


def save_weights(
    state_dict: dict[str, torch.Tensor], save_directory: str | os.PathLike, safe_serialization: bool = True
) -> str:
    """Replace the folder's weights file (its config stays as it is)."""
    name, write = weights_writer(state_dict, safe_serialization)
    write_files(save_directory, {name: write}, remove=_replaced_formats(name))
    return str(Path(save_directory) / name)


def save_adapter_files(
    save_directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: PeftConfig,
    safe_serialization: bool = True, extra_config: dict | None = None,
) -> None:
    """Write one adapter's config (plus ``extra_config`` fields) and weights into ``save_directory`` as a unit
    (see peftcore.adapter_folder)."""
    name, write = weights_writer(state_dict, safe_serialization)
    writers = {name: write, CONFIG_NAME: text_writer(config_json(config, extra=extra_config))}
    write_files(save_directory, writers, remove=_replaced_formats(name))


def _shares_storage(tensor: torch.Tensor, state_dict: dict[str, torch.Tensor]) -> bool:
    ptr = tensor.untyped_storage().data_ptr()
    return sum(1 for t in state_dict.values() if t.untyped_storage().data_ptr() == ptr) > 1


def find_weights(
    model_id: str | os.PathLike, subfolder: str | None = None, allow_pickle: bool = False, **hub_kwargs
) -> str:
    """The path of the adapter's weights file: ``adapter_model.safetensors``, or (only with
    ``allow_pickle=True``) ``adapter_model.bin``; an AdapterFileError names what is missing."""
    where = os.path.join(str(model_id), subfolder or "")
    path = resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder, **hub_kwargs)
    if path is not None:
        return path
    pickled = resolve_file(model_id, PICKLE_WEIGHTS_NAME, subfolder, **hub_kwargs)
    if pickled is None:
        raise AdapterFileError(
            f"{where}: has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME} (the weights are missing)"
        )
    if not allow_pickle:
        raise AdapterFileError(
            f"{pickled}: only a pickle file ({PICKLE_WEIGHTS_NAME}) is present; pickle can run arbitrary code, "
            "so it is loaded only with allow_pickle=True"
        )
    return pickled


def read_weights(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a weights file found by :func:`find_weights`; a damaged file is an AdapterFileError."""
    if not path.endswith(PICKLE_WEIGHTS_NAME):
        from safetensors.torch import load_file

        try:
            return load_file(path, device=device)
        except Exception as exc:
            raise AdapterFileError(f"{path}: cannot read safetensors file ({type(exc).__name__}: {exc})") from None
    try:
        tensors = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise AdapterFileError(f"{path}: cannot read pickle file ({type(exc).__name__}: {exc})") from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise AdapterFileError(f"{path}: holds a {type(tensors).__name__}, not a dict of named tensors")
    return tensors


def load_weights(
    model_id: str | os.PathLike,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    device: str = "cpu",
    **hub_kwargs,
) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (or, only with ``allow_pickle=True``, ``adapter_model.bin``)."""
    return read_weights(find_weights(model_id, subfolder, allow_pickle, **hub_kwargs), device=device)


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


# A whole model's state dict handed over by the training engine (accelerate's get_state_dict,
# DeepSpeed's consolidated weights): while set, adapters are saved from it, not from the live model.
_HANDED_OVER: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("peftcore_handed_over", default=None)


@contextmanager
def tensors_from(state_dict: dict[str, torch.Tensor] | None):
    """Inside the block, ``adapter_state_dict`` reads the model's tensors from ``state_dict``.

    For a state dict an engine gathered already (keys as in ``PeftModel.state_dict()``):
    the live parameters may be shards, and only the main process may be running.
    ``None`` leaves the live model as the source.
    """
    token = _HANDED_OVER.set(state_dict)
    try:
        yield
    finally:
        _HANDED_OVER.reset(token)


def handed_over_state_dict() -> dict[str, torch.Tensor] | None:
    """The state dict set by :func:`tensors_from`, if any (methods that compute their tensors read it)."""
    return _HANDED_OVER.get()


def default_adapter_state_dict(model, config: PeftConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names, whole: shards (FSDP2, ZeRO-3) are gathered here.

    Gathering is collective, so every rank calls this when the model is sharded.
    """
    method = method_for_config(config)
    source = handed_over_state_dict()
    if source is None:
        source = model.state_dict(keep_vars=True)  # ZeRO-3 keeps its partition info on the parameters
    out = {}
    for key, tensor in source.items():
        name = disk_key(key, adapter_name, config, method)
        if name is not None:
            out[name] = tensor
    return distributed.full_tensors(out)


def adapter_view_state_dict(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)`` without the other adapters' per-adapter entries.

    Adapter layers keep one entry per adapter in their holders (``lora_A[name]``...) and
    ``modules_to_save`` one copy per adapter; skipping the other adapters' entries keeps
    loading an adapter as fast with 16 adapters in the model as with one.
    """
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
    distributed.refuse_fsdp1_load(model)
    own = adapter_view_state_dict(model, adapter_name)
    by_disk_name = {}
    for key in own:
        name = disk_key(key, adapter_name, config, method)
        if name is not None:
            by_disk_name[name] = key
    # a base bias the file carries (saved with bias="all"/"lora_only") loads whatever this config's bias, as in PEFT;
    # a bias that comes with its module's weight is a modules_to_save copy, which this config did not ask for
    for name in state_dict:
        if (name not in by_disk_name and name.endswith(".bias") and name in own
                and f"{name[:-len('bias')]}weight" not in state_dict):
            by_disk_name[name] = name
    unexpected = [k for k in state_dict if k not in by_disk_name]
    base_embeddings = embedding_layers.embedding_tensor_names(model, unexpected)  # save_embedding_layers wrote them
    unexpected = [k for k in unexpected if k not in base_embeddings]
    missing = [k for k in by_disk_name if k not in state_dict]
    pairs = [(own[by_disk_name[name]], tensor, name) for name, tensor in state_dict.items() if name in by_disk_name]
    for target, tensor, name in pairs:  # check every dtype and shape before touching any weight
        check_tensor_kind(name, tensor, target, by_disk_name[name])
        if distributed.whole_shape(target) != tuple(tensor.shape):
            raise AdapterFileError(
                f"tensor {name!r} has shape {tuple(tensor.shape)} but {by_disk_name[name]} in the model has "
                f"{distributed.whole_shape(target)} (different r, base model or config?)"
            )
    embedding_layers.load_embedding_tensors(model, {k: state_dict[k] for k in base_embeddings})  # checks, then copies
    empty = [(by_disk_name[name], target, tensor) for target, tensor, name in pairs if target.is_meta]
    for key, target, tensor in empty:  # low_cpu_mem_usage left these on the meta device: take the loaded tensor
        owner, _, attr = key.rpartition(".")
        loaded = nn.Parameter(tensor.to(target.dtype), requires_grad=target.requires_grad)
        setattr(model.get_submodule(owner), attr, loaded)
    distributed.copy_into([(target, tensor) for target, tensor, _ in pairs if not target.is_meta])
    return missing, unexpected


def warn_load_report(missing: list[str], unexpected: list[str], where: str) -> None:
    if missing:
        warnings.warn(
            f"{where}: {len(missing)} adapter tensors missing from the file, left at their init: {missing[:5]}",
            stacklevel=3,
        )
    if unexpected:
        warnings.warn(
            f"{where}: {len(unexpected)} tensors in the file match nothing in the model and were ignored: "
            f"{unexpected[:5]}",
            stacklevel=3,
        )


LAYER_PREFIX = "base_model.model."  # every layer method's tensors on disk start with this


def tensors_by_module(
    tensors: dict[str, torch.Tensor], tensor_prefixes: tuple[str, ...]
) -> dict[str, dict[str, torch.Tensor]]:
    """A layer method's file tensors by adapted module: ``{"a.b": {"lora_A.weight": ..., ...}}``.

    The module path is the part before the first segment starting with one of
    ``tensor_prefixes`` (``base_model.model.`` removed); other tensors are left out.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parts = key[len(LAYER_PREFIX):].split(".") if key.startswith(LAYER_PREFIX) else key.split(".")
        for i, part in enumerate(parts):
            if tensor_prefixes and part.startswith(tensor_prefixes):
                out.setdefault(".".join(parts[:i]), {})[".".join(parts[i:])] = tensor
                break
    return out
