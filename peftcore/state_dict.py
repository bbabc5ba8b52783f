"""PEFT's functions for an adapter's tensors under their file names.

``get_peft_model_state_dict`` gives what ``save_pretrained`` writes (keys without the
adapter name); ``set_peft_model_state_dict`` loads such a dict into an existing
adapter; ``load_peft_weights`` reads one from a folder or the Hub. The first two go
through the same hooks as saving and loading files, so a plugin's own naming rules
apply here too.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
from torch.nn.modules.module import _IncompatibleKeys

from peftcore import embedding_layers
from peftcore.config import PeftConfig
from peftcore.plugins import hooks
from peftcore.serialization import load_weights, tensors_from


def _adapter_config(model, adapter_name: str):
    from peftcore.peft_model import PeftModel

    configs = getattr(model, "peft_config", None)
    injected = isinstance(configs, dict) and all(isinstance(c, PeftConfig) for c in configs.values())
    if not isinstance(model, PeftModel) and not injected:  # peft's own models included: their layers are not ours
        raise TypeError(f"expected a peftcore PeftModel or a model given to inject_adapter_in_model, got "
                        f"{type(model).__module__}.{type(model).__name__}")
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
    return configs[adapter_name]


def _inside_engine_wrapper(model):
    """The peftcore PeftModel inside ``torch.distributed`` wrappers (FSDP1, DDP: ``.module``), else ``model``."""
    from peftcore.peft_model import PeftModel

    inner = model
    while not isinstance(inner, PeftModel) and isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    return inner if isinstance(inner, PeftModel) else model


def _without_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {}
    for key, tensor in state_dict.items():
        key = key.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        cleaned[key.removeprefix("module.")] = tensor
    return cleaned


def get_peft_model_state_dict(
    model,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors keyed as in ``adapter_model.safetensors``, whole.

    With ``state_dict`` (a whole ``model.state_dict()``, e.g. gathered by accelerate or
    DeepSpeed) the tensors are read from it and the live parameters are not touched, so
    this may run on the main process alone; without it, sharded parameters (FSDP2,
    ZeRO-3) are gathered, which every rank must join. ``unwrap_compiled`` unwraps a
    ``torch.compile`` wrapper; ``save_embedding_layers`` (True, False, "auto": when embeddings are targeted or
    the vocabulary was resized) adds the base model's embedding weights, as PEFT does.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    inner = _inside_engine_wrapper(model)
    if inner is not model:  # FSDP1 / DDP around the PeftModel: its own state_dict() gathers the shards
        if state_dict is None:
            state_dict = _without_wrapper_prefixes(model.state_dict())
        model = inner
    config = _adapter_config(model, adapter_name)
    with tensors_from(state_dict):
        tensors = hooks.adapter_state_dict(model=model, config=config, adapter_name=adapter_name)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if embedding_layers.should_save_embeddings(base, config, save_embedding_layers):
        tensors.update(embedding_layers.embedding_tensors(model, config, state_dict))
    return tensors


def set_peft_model_state_dict(
    model,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Copy file-named tensors into adapter ``adapter_name``; returns the missing and unexpected keys.

    A tensor whose shape differs from the adapter's raises ``AdapterFileError`` naming
    it, before any weight changes; with ``ignore_mismatched_sizes=True`` such tensors
    are skipped with a warning instead. Keys are file names (no adapter name), so
    unlike PEFT the missing keys list only this adapter's tensors, not the base model's.
    ``low_cpu_mem_usage`` is accepted for PEFT's signature: the adapter exists already,
    so there is nothing to allocate lazily.
    """
    model = _inside_engine_wrapper(model)
    config = _adapter_config(model, adapter_name)
    tensors = dict(peft_model_state_dict)
    if ignore_mismatched_sizes:
        own = hooks.adapter_state_dict(model=model, config=config, adapter_name=adapter_name)
        mismatched = [k for k, t in tensors.items() if k in own and tuple(own[k].shape) != tuple(t.shape)]
        for key in mismatched:
            warnings.warn(f"{key}: shape {tuple(tensors.pop(key).shape)} in the state dict, {tuple(own[key].shape)} in "
                          f"adapter {adapter_name!r}; skipped (ignore_mismatched_sizes=True)", stacklevel=2)
    missing, unexpected = hooks.load_adapter_state_dict(
        model=model, config=config, adapter_name=adapter_name, state_dict=tensors
    )
    return _IncompatibleKeys(list(missing), list(unexpected))


def load_peft_weights(model_id: str | os.PathLike, device: str | None = None, key_mapping: dict[str, str] | None = None,
                      allow_pickle: bool = False, **hf_hub_download_kwargs) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` in a folder or Hub repo, keyed as in the file.

    ``key_mapping`` renames keys as PEFT does for transformers' renamed architectures:
    with the ``base_model.model.`` (or ``base_model.``) prefix set aside, the first
    pattern that matches (``re.sub``) wins. Keys without such a prefix are left alone.
    ``device`` defaults to the CPU; a pickle file is read only with ``allow_pickle=True``.
    """
    subfolder = hf_hub_download_kwargs.pop("subfolder", None)
    tensors = load_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle, device=device or "cpu",
                           **hf_hub_download_kwargs)
    if not key_mapping:
        return tensors
    remapped = {}
    for key, tensor in tensors.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), "")
        rest = key[len(prefix):]
        if prefix:
            for pattern, replacement in key_mapping.items():
                renamed, count = re.subn(pattern, replacement, rest)
                if count:
                    rest = renamed
                    break
        remapped[prefix + rest] = tensor
    return remapped


# -- the base model's own weights, under the names it had before any adapter ------------------


def _original_key(root, key: str) -> str | None:
    """``x.q.base_layer.weight`` -> ``x.q.weight``; None for a tensor of an adapter (anything beside ``base_layer``
    in an adapter layer, or a per-adapter copy in a ``modules_to_save`` wrapper). Decided by module type at each
    step, not by the words in the key: a base model may have a module named ``base_layer`` of its own."""
    from peftcore.layer import AdapterLayer
    from peftcore.modules_to_save import ModulesToSaveWrapper

    kept, current = [], root
    for part in key.split("."):
        if current is None:
            kept.append(part)
            continue
        if isinstance(current, AdapterLayer):
            if part != "base_layer":
                return None
            current = current.base_layer
            continue
        if isinstance(current, ModulesToSaveWrapper):
            if part != "original_module":
                return None
            current = current.original_module
            continue
        child = current._modules.get(part)
        kept.append(part)
        current = child
    return ".".join(kept)


def _base_and_keys(model) -> tuple[torch.nn.Module, dict[str, str]]:
    """The module holding the base weights and {original key: key in that module's state dict}."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    keys = {}
    for key in base.state_dict(keep_vars=True):
        original = _original_key(base, key)
        if original is not None:
            keys[original] = key
    return base, keys


def get_base_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict with the keys it had before the adapters came, without adapter tensors
    (PEFT's function of this name): what ``base_model.state_dict()`` gave before ``get_peft_model``."""
    base, keys = _base_and_keys(model)
    state = base.state_dict()
    return {original: state[key] for original, key in keys.items()}


def set_base_model_state_dict(model, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load base weights keyed as in the model before the adapters (:func:`get_base_model_state_dict`'s keys)
    into the adapted model; adapter tensors are untouched. ``strict``: missing or unknown keys raise a
    RuntimeError naming them (before anything is loaded). Returns ``missing_keys`` / ``unexpected_keys``."""
    base, keys = _base_and_keys(model)
    unexpected = [k for k in state_dict if k not in keys]
    missing = [k for k in keys if k not in state_dict]
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            problems.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError("Error(s) in loading state_dict for the base model:\n\t" + "\n\t".join(problems))
    base.load_state_dict({keys[k]: v for k, v in state_dict.items() if k in keys}, strict=False)
    return _IncompatibleKeys(missing, unexpected)
