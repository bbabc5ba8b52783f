"""``add_weighted_adapter`` for LoRA: "cat" (exact), "linear" and "svd", as PEFT defines them."""

from __future__ import annotations

import dataclasses
import math

import torch

COMBINATIONS = ("cat", "linear", "svd")


def combine(
    model, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str, options: dict
) -> bool:
    from peftcore_lora.layer import LoraLayer

    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type {combination_type!r} is not supported; choose one of {COMBINATIONS}")
    configs = [model.peft_config[a] for a in adapters]
    if any(c.use_dora for c in configs):
        raise ValueError("add_weighted_adapter does not support DoRA adapters")
    ranks = [c.r for c in configs]
    if combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(
                f"combination_type 'linear' needs adapters of equal rank, got {dict(zip(adapters, ranks))}; "
                "use 'cat' or 'svd'"
            )
        new_rank = ranks[0]
    else:
        new_rank = options.get("svd_rank") or max(ranks)
    targets = set()
    for config in configs:
        targets |= set(config.target_modules) if not isinstance(config.target_modules, str) else {config.target_modules}
    if any(isinstance(c.target_modules, str) for c in configs):
        if len({c.target_modules if isinstance(c.target_modules, str) else None for c in configs}) != 1:
            raise ValueError("Cannot combine adapters whose target_modules mix a regex string and a list")
        targets = configs[0].target_modules
    new_config = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=targets,
                                     rank_pattern={}, alpha_pattern={}, init_lora_weights=False)
    model.inject_adapter(new_config, adapter_name)
    model.set_adapter(model.active_adapter)

    for _, layer in model.adapter_layers():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
        with torch.no_grad():
            if combination_type == "svd":
                _svd_into(layer, adapter_name, present, new_rank, options)
            else:
                _factors_into(layer, adapter_name, present, combination_type)
    return True


def _factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def _factors_into(layer, adapter_name: str, present, combination_type: str) -> None:
    new_a, new_b = _factors(layer, adapter_name)
    if combination_type == "cat":
        new_a.data.copy_(torch.cat([_factors(layer, a)[0] * w * layer.scaling[a] for a, w in present], dim=0))
        new_b.data.copy_(torch.cat([_factors(layer, a)[1] for a, _ in present], dim=1))
        return
    new_a.data.zero_()
    new_b.data.zero_()
    for adapter, weight in present:
        a, b = _factors(layer, adapter)
        root = math.sqrt(abs(weight * layer.scaling[adapter]))
        sign = 1.0 if weight * layer.scaling[adapter] >= 0 else -1.0
        new_a.data += sign * root * a
        new_b.data += root * b


def _svd_into(layer, adapter_name: str, present, rank: int, options: dict) -> None:
    delta = sum(layer.delta_weight(a).float() * w for a, w in present)
    conv = delta.dim() == 4
    fan_in_fan_out = getattr(layer, "fan_in_fan_out", False) or adapter_name in layer.lora_embedding_A
    matrix = delta.flatten(start_dim=1) if conv else (delta.T if fan_in_fan_out else delta)
    u, s, vh = torch.linalg.svd(
        matrix, full_matrices=options.get("svd_full_matrices", True), driver=options.get("svd_driver")
    )
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    clamp = options.get("svd_clamp")
    if clamp is not None:
        limit = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-limit, limit), vh.clamp(-limit, limit)
    new_a, new_b = _factors(layer, adapter_name)
    if conv:
        vh = vh.reshape(new_a.shape)
        u = u.reshape(new_b.shape)
    new_a.data.copy_(vh.to(new_a.dtype))
    new_b.data.copy_(u.to(new_b.dtype))
