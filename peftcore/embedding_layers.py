"""The base model's embedding weights saved beside an adapter (PEFT's ``save_embedding_layers``).

Training with added tokens resizes the vocabulary, so the adapter alone no longer fits the
original base model: PEFT then stores the input and output embeddings' weights in
``adapter_model.safetensors`` under the model's own names (``base_model.model.<path>.weight``,
``.base_layer.weight`` where an adapter wraps the embedding), and loading puts them back. Only
modules that are the model's input or output embeddings are written or loaded, never a module
whose name merely starts the same way.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn

from peftcore import distributed
from peftcore.files import AdapterFileError

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _targets_embeddings(config) -> bool:
    targets = getattr(config, "target_modules", None)
    return bool(targets) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _base_vocab_size(model_id) -> int | None:
    """``vocab_size`` of the base model's own config.json, when it is on this machine (never the network)."""
    if not model_id:
        return None
    path = os.path.join(str(model_id), "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        cached = try_to_load_from_cache(str(model_id), "config.json")
        path = cached if isinstance(cached, str) else None
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None


def should_save_embeddings(base_model: nn.Module, config, setting: str | bool) -> bool:
    """PEFT's reading of ``save_embedding_layers``: True, False, or "auto" (embeddings targeted, or resized)."""
    if setting not in ("auto", True, False):
        raise ValueError(f"save_embedding_layers must be 'auto', True or False, got {setting!r}")
    if setting != "auto":
        return setting
    if _targets_embeddings(config):
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                      stacklevel=3)
        return True
    vocab_size = getattr(getattr(base_model, "config", None), "vocab_size", None)
    original = _base_vocab_size(getattr(config, "base_model_name_or_path", None))
    if vocab_size and original and vocab_size != original:
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      f"finetuning (vocab_size {original} -> {vocab_size}).", stacklevel=3)
        return True
    return False


def embedding_module_names(peft_model: nn.Module, only_wrapped: bool = False) -> list[str]:
    """Full names (in ``peft_model``) of the modules holding the base embedding weights: the input and output
    embeddings, or the base layer inside them where an adapter wraps one. ``only_wrapped`` (the config targets
    embeddings): just those an adapter wraps, as PEFT saves them."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model  # or injected
    if not hasattr(base, "get_input_embeddings"):
        return []
    layers = [base.get_input_embeddings(), base.get_output_embeddings()]
    wanted = {id(getattr(layer, "base_layer", layer)) for layer in layers
              if layer is not None and (hasattr(layer, "base_layer") or not only_wrapped)}
    return [name for name, module in peft_model.named_modules() if id(module) in wanted]


def _own_tensors(peft_model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": tensor for name in names
            for key, tensor in peft_model.get_submodule(name).state_dict(keep_vars=True).items()}


def embedding_tensors(peft_model: nn.Module, config, source: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """The embedding weights under PEFT's file names, from ``source`` (a whole state dict) or the live model;
    warns (as PEFT) when the model has no embedding accessors."""
    names = embedding_module_names(peft_model, only_wrapped=_targets_embeddings(config))
    if not names:
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                      stacklevel=3)
        return {}
    own = _own_tensors(peft_model, names)
    if source is None:  # sharded parameters (FSDP2, ZeRO-3) are gathered, like the adapter's
        return distributed.full_tensors({key: tensor.detach() for key, tensor in own.items()})
    return {key: source[key] for key in own if key in source}


def embedding_tensor_names(peft_model: nn.Module, keys) -> set[str]:
    """Those of ``keys`` that name the base model's embedding weights."""
    keys = set(keys)
    if not keys:
        return set()
    return {key for key in _own_tensors(peft_model, embedding_module_names(peft_model)) if key in keys}


def load_embedding_tensors(peft_model: nn.Module, state_dict: dict[str, torch.Tensor],
                           ignore_mismatched_sizes: bool = False) -> set[str]:
    """Copy the file's embedding weights into the base model; returns the keys it took."""
    own = _own_tensors(peft_model, embedding_module_names(peft_model)) if state_dict else {}
    taken = {key for key in state_dict if key in own}
    pairs = []
    for key in sorted(taken):
        tensor, target = state_dict[key], own[key]
        if tuple(tensor.shape) != tuple(target.shape):
            if ignore_mismatched_sizes:
                warnings.warn(f"{key}: shape {tuple(tensor.shape)} in the file, {tuple(target.shape)} in the model; "
                              "skipped (ignore_mismatched_sizes=True)", stacklevel=3)
                continue
            raise AdapterFileError(f"size mismatch for {key}: the file's embedding weight has shape "
                                   f"{tuple(tensor.shape)}, the model's {tuple(target.shape)} (resize the base "
                                   "model's token embeddings first, or pass ignore_mismatched_sizes=True)")
        pairs.append((target, tensor))
    with torch.no_grad():
        for target, tensor in pairs:
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
    return taken
