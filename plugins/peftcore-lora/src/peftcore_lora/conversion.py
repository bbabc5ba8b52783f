"""``convert_to_lora`` / ``save_as_lora``: an adapter whose layers change the weight additively, as plain LoRA.

PEFT's functions of the same names: each supporting layer's weight change is factored by a truncated
SVD into ``B @ A`` (scaling 1: ``lora_alpha == r``), giving a LoRA adapter that any LoRA consumer
loads. Layers answer ``supports_lora_conversion(adapter_name)``; the change they contribute is
``delta_weight`` (PEFT's ``get_delta_weight``), except for DoRA, whose real change rescales
``W + sBA`` by the learned magnitude: peftcore converts that exactly (PEFT drops the magnitude).
"""

from __future__ import annotations

import os
import warnings

import torch

from peftcore.layer import AdapterLayer
from peftcore.modules_to_save import ModulesToSaveWrapper
from peftcore.serialization import save_adapter_files

from peftcore_lora.config import LoraConfig

__all__ = ["convert_to_lora", "save_as_lora"]


def _rank_for_energy(singular_values: torch.Tensor, threshold: float) -> int:
    """The smallest k whose top-k singular values hold ``threshold`` of the squared total."""
    energy = torch.cumsum(singular_values.double() ** 2, dim=0)
    return int(torch.searchsorted(energy, threshold * energy[-1]).item()) + 1


def _weight_change(layer: AdapterLayer, adapter_name: str) -> torch.Tensor:
    """What the adapter adds to the base weight, in (out, in) layout."""
    base = layer.get_base_layer().weight.detach()
    delta = layer.delta_weight(adapter_name)
    dora = getattr(layer, "lora_magnitude_vector", {})
    if adapter_name in dora:
        merged, _ = dora[adapter_name].merged_weight(base, delta)
        delta = merged - base
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


@torch.no_grad()
def _factor(layer: AdapterLayer, name: str, adapter_name: str, rank: int | float):
    delta = _weight_change(layer, adapter_name)
    dtype = delta.dtype
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # no SVD for half precision
    k = rank if isinstance(rank, int) else _rank_for_energy(s, rank)
    if k > u.shape[1]:
        raise ValueError(f"The chosen rank {k} is larger than the weight shape ({u.shape[1]}), please choose a lower "
                         f"rank. ({name}: weight change of shape {tuple(delta.shape)})")
    down, up = vh[:k].to(dtype).contiguous(), (u[:, :k] * s[:k]).to(dtype).contiguous()
    return down, up, k


def convert_to_lora(model, rank: int | float, adapter_name: str = "default", progressbar: bool = False,
                    compile_kwargs: dict | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and state dict (PEFT's file names) approximating adapter ``adapter_name`` of ``model``.

    ``rank``: an int for the same rank everywhere, or a float in (0, 1] for the smallest rank per layer whose
    singular values keep that share of the change's energy. ``progressbar`` and ``compile_kwargs`` are accepted
    for PEFT's signature (the SVDs run eagerly, without a bar).
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank must be an int or a float in (0, 1], got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got "
                         f"{rank}.")
    if rank == 0 or (isinstance(rank, int) and rank < 0):
        raise ValueError(f"Passing a rank of {rank} doesn't make sense, please pass a valid value.")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]
    unsupported = sorted({f"{type(m).__module__}.{type(m).__name__}" for _, m in layers
                          if not m.supports_lora_conversion(adapter_name)})
    if unsupported:
        raise TypeError(f"Some module types on this model do not support LoRA conversion: {', '.join(unsupported)}.")
    if not layers:
        raise TypeError("Could not detect any layer that supports LoRA conversion.")
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is not None and str(config.peft_type) == "LORA":
        warnings.warn("Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need "
                      "for that.", stacklevel=2)
    bias = getattr(config, "bias", "none")
    if bias != "none" or getattr(config, "lora_bias", False):
        raise ValueError(f"The adapter's config sets bias={bias if bias != 'none' else 'lora_bias'}, this is not "
                         "supported right now: a LoRA adapter carries no bias change")

    prefix = "base_model.model."
    state_dict: dict[str, torch.Tensor] = {}
    targets, ranks, excluded = set(), {}, set()
    for name, layer in layers:
        if adapter_name not in layer.adapter_names:
            continue
        down, up, k = _factor(layer, name, adapter_name, rank)
        short = name.removeprefix(prefix)
        if k == 0:
            excluded.add(short)
            continue
        targets.add(short)
        if k != rank:
            ranks[short] = k
        state_dict[f"{name}.lora_A.weight"], state_dict[f"{name}.lora_B.weight"] = down, up
    if not state_dict:
        raise ValueError(f"Did not convert a single layer: no adapter layer holds adapter {adapter_name!r}")
    r = rank if isinstance(rank, int) else 1  # a threshold gives every layer its own rank (rank_pattern)
    lora_config = LoraConfig(
        r=r, lora_alpha=r, target_modules=targets, exclude_modules=excluded or None, rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks), base_model_name_or_path=getattr(config, "base_model_name_or_path", None),
        modules_to_save=list(getattr(config, "modules_to_save", None) or []) or None,
    )
    for name, wrapper in model.named_modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                state_dict[f"{name}.{key}"] = tensor.detach()
    return lora_config, state_dict


def save_as_lora(path: str | os.PathLike, model, rank: int | float, adapter_name: str = "default",
                 progressbar: bool = False, compile_kwargs: dict | None = None) -> None:
    """``convert_to_lora``, then PEFT's files in ``path`` (written atomically, as every peftcore save)."""
    lora_config, state_dict = convert_to_lora(model, rank, adapter_name, progressbar, compile_kwargs)
    save_adapter_files(str(path), state_dict, lora_config)
