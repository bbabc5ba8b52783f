"""Adapters whose initialisation moved weight out of the base model (PiSSA, OLoRA), made portable.

PiSSA and OLoRA start from ``W = W_res + s·B₀A₀`` and train on ``W_res``: the trained adapter only
works on that residual base. Given the initial adapter (saved before training), the change to the
*original* base is ``ΔW = s·(BA − B₀A₀) = s·[B | −B₀][A ; A₀]``: a plain LoRA adapter of rank
``2r`` with the same scaling. ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``
writes that adapter (PEFT's behaviour and file layout).
"""

from __future__ import annotations

import copy
import warnings

import torch

from peftcore.files import AdapterFileError
from peftcore.serialization import load_weights

MOVES_BASE_WEIGHTS = {"pissa": "PiSSA", "olora": "OLoRA"}


def base_moving_init(config) -> str | None:
    """"PiSSA"/"OLoRA" when ``config``'s initialisation changes the base weights (``pissa_niter_16`` too)."""
    init = str(getattr(config, "init_lora_weights", "")).lower()
    return next((label for key, label in MOVES_BASE_WEIGHTS.items() if init.startswith(key)), None)


def warn_base_moved(moved: str) -> None:
    """PEFT's warning: other adapters on a base that PiSSA/OLoRA changed see the residual, not the original."""
    warnings.warn(f"{moved} changes the base weights of the model and should thus not be used with other "
                  f"adapters. Consider converting the {moved} adapter into a normal LoRA adapter (save it with "
                  "path_initial_model_for_weight_conversion=<its initial adapter>).", stacklevel=4)


def convert_for_original_base(config, tensors: dict[str, torch.Tensor], initial_path: str):
    """(tensors, config) of the rank-2r LoRA adapter equal to the trained one on the original base weights."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    if config.use_dora:
        raise ValueError("path_initial_model_for_weight_conversion: DoRA adapters cannot be converted (the "
                         "magnitude depends on the base weights the adapter was trained on)")
    if base_moving_init(config) is None and config.init_lora_weights is not True:
        warnings.warn("`path_initial_model_for_weight_conversion` only works for converting a PiSSA/OLoRA adapter to "
                      "a LoRA adapter", stacklevel=4)
    initial = load_weights(initial_path)
    converted = {}
    for key, tensor in tensors.items():
        if ".lora_A." not in f"{key}." and ".lora_B." not in f"{key}.":
            converted[key] = tensor
            continue
        if key not in initial:
            raise AdapterFileError(f"{initial_path}: the initial adapter has no {key!r}; is it the adapter this "
                                   "one was trained from (saved right after get_peft_model)?")
        start = initial[key].to(device=tensor.device, dtype=tensor.dtype)
        if start.shape != tensor.shape:
            raise AdapterFileError(f"{initial_path}: {key!r} has shape {tuple(start.shape)} there but "
                                   f"{tuple(tensor.shape)} in the trained adapter")
        if ".lora_A." in f"{key}.":
            converted[key] = torch.cat([tensor, start], dim=0)
        else:
            converted[key] = torch.cat([tensor, -start], dim=1)
    doubled = copy.deepcopy(config)
    doubled.init_lora_weights = True  # the result applies to the original base as it is
    doubled.r *= 2
    doubled.lora_alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)  # the same scaling
    doubled.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    doubled.alpha_pattern = {k: 2 * v for k, v in (config.alpha_pattern or {}).items()}
    return converted, doubled
