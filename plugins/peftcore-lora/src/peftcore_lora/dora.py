"""DoRA: a learned magnitude per output feature times the direction of W + sBA.

The norm in the forward pass is detached, as in the DoRA paper (section 4.3) and PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.layer import transpose


class DoraLinearLayer(nn.Module):
    """Holds the magnitude vector as ``weight`` (so it is saved as ``lora_magnitude_vector``)."""

    def __init__(self, fan_in_fan_out: bool):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out

    def lora_weight(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        return lora_B @ lora_A

    def get_weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
        weight = transpose(weight, self.fan_in_fan_out) + scaling * lora_weight
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)

    def update_layer(
        self, *, base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
    ) -> None:
        with torch.no_grad():
            weight = base_layer.weight.float()
            norm = self.get_weight_norm(weight, self.lora_weight(lora_A.float(), lora_B.float()), scaling)
        self.weight = nn.Parameter(norm.to(lora_A.dtype), requires_grad=True)

    def forward(
        self, x, *, lora_A: nn.Module, lora_B: nn.Module, scaling: float, base_layer: nn.Module, base_result=None
    ):
        weight = base_layer.weight.to(x.dtype)
        lora_weight = self.lora_weight(lora_A.weight, lora_B.weight)
        weight_norm = self.get_weight_norm(weight, lora_weight.detach(), scaling).detach()
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            if getattr(base_layer, "bias", None) is not None:
                base_result = base_result - base_layer.bias
        else:
            base_result = F.linear(x, transpose(weight, self.fan_in_fan_out))
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    def scale(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """magnitude / ||W + ΔW|| with the norm detached (``delta`` already scaled)."""
        norm = self.get_weight_norm(weight, transpose(delta, self.fan_in_fan_out).detach(), 1.0).detach()
        return self.weight / norm

    def merged_weight(self, weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.get_weight_norm(weight, transpose(delta, self.fan_in_fan_out), 1.0).detach()
        factor = transpose((self.weight / norm).view(-1, 1), self.fan_in_fan_out)
        return factor * (weight + delta), norm

    def unmerged_weight(self, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        factor = transpose((self.weight / norm).view(-1, 1), self.fan_in_fan_out)
        return weight / factor - delta


class DoraEmbeddingLayer(DoraLinearLayer):
    """Embedding weights are (num_embeddings, dim): the magnitude runs over ``dim``."""

    def lora_weight(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        # lora_embedding_A is (r, num_embeddings), lora_embedding_B is (dim, r)
        return lora_B @ lora_A


class DoraConv2dLayer(DoraLinearLayer):
    """One magnitude per output channel; norms over (in, kh, kw)."""

    def lora_weight(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        return (lora_B.flatten(start_dim=1) @ lora_A.flatten(start_dim=1)).reshape(lora_B.shape[0], *lora_A.shape[1:])

    def get_weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
        weight = weight + scaling * lora_weight
        return weight.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).transpose(1, 0)

    def forward(
        self, x, *, lora_A: nn.Module, lora_B: nn.Module, scaling: float, base_layer: nn.Module, base_result=None
    ):
        weight = base_layer.weight
        lora_weight = self.lora_weight(lora_A.weight, lora_B.weight)
        weight_norm = self.get_weight_norm(weight, lora_weight.detach(), scaling).detach()
        mag_norm_scale = self.weight / weight_norm
        if base_result is None:
            base_result = F.conv2d(
                x, weight, None, base_layer.stride, base_layer.padding, base_layer.dilation, base_layer.groups
            )
        elif base_layer.bias is not None:
            base_result = base_result - base_layer.bias.view(1, -1, 1, 1)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_B(lora_A(x)) * scaling

    def merged_weight(self, weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.get_weight_norm(weight, delta, 1.0).detach()
        factor = (self.weight / norm).transpose(0, 1)
        return factor * (weight + delta), norm

    def unmerged_weight(self, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        factor = (self.weight / norm).transpose(0, 1)
        return weight / factor - delta
