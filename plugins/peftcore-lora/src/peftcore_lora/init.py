"""Initialisations of the LoRA matrices (PEFT's defaults, PiSSA, OLoRA)."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def reset_lora_parameters(layer, adapter_name: str, init: bool | str) -> None:
    """A random, B zero, so a fresh adapter changes nothing (embeddings: A zero, B normal)."""
    if adapter_name in layer.lora_A:
        if init is True:
            nn.init.kaiming_uniform_(layer.lora_A[adapter_name].weight, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(layer.lora_A[adapter_name].weight, std=1 / layer.r[adapter_name])
        nn.init.zeros_(layer.lora_B[adapter_name].weight)
        if layer.lora_B[adapter_name].bias is not None:
            nn.init.zeros_(layer.lora_B[adapter_name].bias)
    if adapter_name in layer.lora_embedding_A:
        nn.init.zeros_(layer.lora_embedding_A[adapter_name])
        nn.init.normal_(layer.lora_embedding_B[adapter_name])


def _base_weight_fp32(layer) -> tuple[torch.Tensor, torch.dtype]:
    weight = layer.get_base_layer().weight
    if not weight.is_floating_point():
        raise ValueError(
            f"{type(layer).__name__}: PiSSA/OLoRA init needs floating-point base weights, got {weight.dtype}"
        )
    w = weight.data.to(torch.float32)
    return (w.T if getattr(layer, "fan_in_fan_out", False) else w), weight.dtype


def _require_linear(layer, name: str) -> None:
    if not hasattr(layer, "fan_in_fan_out"):
        raise ValueError(
            f"{name} initialisation is only available for Linear/Conv1D layers, not {type(layer).__name__}"
        )


def _write_back(layer, adapter_name: str, weight: torch.Tensor, dtype: torch.dtype) -> None:
    a = layer.lora_A[adapter_name].weight
    b = layer.lora_B[adapter_name].weight
    residual = weight - layer.scaling[adapter_name] * (b.float() @ a.float())
    if getattr(layer, "fan_in_fan_out", False):
        residual = residual.T
    layer.get_base_layer().weight.data = residual.to(dtype).contiguous()


@torch.no_grad()
def pissa_init(layer, adapter_name: str) -> None:
    """Principal singular components go into A and B; the base keeps the residual."""
    _require_linear(layer, "PiSSA")
    weight, dtype = _base_weight_fp32(layer)
    r = layer.r[adapter_name]
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    s_r = s[:r] / layer.scaling[adapter_name]
    layer.lora_A[adapter_name].weight.data = (torch.diag(torch.sqrt(s_r)) @ vh[:r]).to(
        layer.lora_A[adapter_name].weight.dtype
    )
    layer.lora_B[adapter_name].weight.data = (u[:, :r] @ torch.diag(torch.sqrt(s_r))).to(
        layer.lora_B[adapter_name].weight.dtype
    )
    _write_back(layer, adapter_name, weight, dtype)


@torch.no_grad()
def olora_init(layer, adapter_name: str) -> None:
    """A and B from the QR decomposition of the base weight; the base keeps the residual."""
    _require_linear(layer, "OLoRA")
    weight, dtype = _base_weight_fp32(layer)
    r = layer.r[adapter_name]
    q, rr = torch.linalg.qr(weight)
    layer.lora_A[adapter_name].weight.data = rr[:r].contiguous().to(layer.lora_A[adapter_name].weight.dtype)
    layer.lora_B[adapter_name].weight.data = q[:, :r].contiguous().to(layer.lora_B[adapter_name].weight.dtype)
    _write_back(layer, adapter_name, weight, dtype)
