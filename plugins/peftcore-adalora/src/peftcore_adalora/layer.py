"""AdaLoRA wrappers for Linear/Conv1D and Conv2d (PEFT's layout and maths).

Each adapter is an SVD-like triplet: ``lora_A`` (r x in, right singular vectors),
``lora_E`` (r x 1, singular values) and ``lora_B`` (out x r, left singular
vectors), with ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5). ``ranknum`` is the
rank the adapter was created with; it stays fixed when ranks are pruned, so
pruning changes ΔW only by the pruned triplets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftcore import AdapterLayer
from peftcore.layer import LowRankDelta, linear_features, padded_factors, transpose

RANKNUM_EPS = 1e-5


class AdaLoraLayer(AdapterLayer):
    """Per-adapter triplets and bookkeeping shared by every AdaLoRA wrapper."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    # ranknum is a frozen Parameter (PEFT's layout) that is never saved
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")
    peft_type = "ADALORA"

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, module_name: str):
        super().__init__(base_layer, module_name)
        self.in_features, self.out_features = in_features, out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        # registration order gives PEFT's parameter order: lora_A, lora_B, lora_E, ranknum
        self.lora_A = nn.ParameterDict({})
        self.lora_B = nn.ParameterDict({})
        self.lora_E = nn.ParameterDict({})
        self.ranknum = nn.ParameterDict({})

    def a_columns(self) -> int:
        """Width of ``lora_A``: the input features the adapter sees per output."""
        return self.in_features

    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        r, alpha = config.init_r, config.lora_alpha
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha if alpha > 0 else float(r)
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.a_columns()))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        # drawn (then overwritten) where PEFT draws it, so one seed gives PEFT's initial weights
        self.ranknum[adapter_name] = nn.Parameter(torch.randn(1).fill_(float(r)), requires_grad=False)
        if config.init_lora_weights:
            self.reset_lora_parameters(adapter_name)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str) -> None:
        """E = 0 makes a fresh adapter a no-op; A and B start near orthogonal-scale noise."""
        if adapter_name in self.lora_A:
            nn.init.zeros_(self.lora_E[adapter_name])
            nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)

    @torch.no_grad()
    def resize(self, adapter_name: str, kept: list[bool]) -> None:
        """Keep only the triplets marked in ``kept`` (PEFT's resize_modules_by_rank_pattern)."""
        mask = torch.tensor([bool(v) for v in kept], device=self.lora_E[adapter_name].device)
        rank, current = int(mask.sum()), self.lora_E[adapter_name].shape[0]
        if current == rank:
            return  # already at the allocated rank
        if current != len(kept):
            raise ValueError(
                f"{self.location}: rank_pattern has {len(kept)} entries for adapter {adapter_name!r}, "
                f"but the layer has rank {current} (expected init_r entries)"
            )
        for holder, rows in ((self.lora_A, mask), (self.lora_E, mask)):
            old = holder[adapter_name]
            holder[adapter_name] = nn.Parameter(old[rows].clone(), requires_grad=old.requires_grad)
        old_b = self.lora_B[adapter_name]
        self.lora_B[adapter_name] = nn.Parameter(old_b[:, mask].clone(), requires_grad=old_b.requires_grad)
        self.r[adapter_name] = rank
        if rank == 0:  # PEFT recreates the layer at rank 0, so its ranknum becomes 0
            self.ranknum[adapter_name].fill_(0.0)

    # -- maths ----------------------------------------------------------------------

    def factor(self, adapter_name: str) -> torch.Tensor:
        """scaling / (ranknum + eps), as a tensor so it follows device and dtype."""
        return self.scaling[adapter_name] / (self.ranknum[adapter_name] + RANKNUM_EPS)

    # -- combining (the low-rank contract of peftcore.layer) ------------------------

    def low_rank_delta(self, adapter_name: str) -> LowRankDelta:
        """ΔW = B (A ⊙ E) · scaling / ranknum: up = B, down = A ⊙ E (A spans the flattened kernel already)."""
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        return LowRankDelta(up=b, down=a * e, scale=float(self.factor(adapter_name)))

    @torch.no_grad()
    def set_low_rank_delta(self, adapter_name: str, up: torch.Tensor, down: torch.Tensor) -> None:
        """A = down, E = 1, B = up / factor: the triplets beyond the product's rank are zero."""
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        up, down = padded_factors(up, down, a.shape[0])
        a.copy_(down.to(a.dtype))
        e.fill_(1.0)
        b.copy_((up / self.factor(adapter_name)).to(b.dtype))

class SVDLinear(AdaLoraLayer):
    """AdaLoRA for ``nn.Linear`` and transformers' ``Conv1D`` (weights stored transposed)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        in_features, out_features = linear_features(base_layer, config, module_name)
        super().__init__(base_layer, in_features, out_features, module_name)
        self.fan_in_fan_out = config.fan_in_fan_out
        self.create_adapter(adapter_name, config)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        return transpose(b @ (a * e), self.fan_in_fan_out) * self.factor(adapter_name)

    def adapter_output(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        x = x.to(a.dtype)
        # PEFT's order of operations, so results agree to the last bit where possible
        return (self.lora_dropout[name](x) @ (a * e).T @ b.T) * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)


class SVDConv2d(AdaLoraLayer):
    """AdaLoRA for ``nn.Conv2d``: A spans (in_channels x kernel), ΔW is reshaped to the kernel."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, config, module_name: str = ""):
        if base_layer.groups != 1:
            raise ValueError(
                f"{module_name}: AdaLoRA for grouped convolutions (groups={base_layer.groups}) is not supported"
            )
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels, module_name)
        self.fan_in_fan_out = False
        self.create_adapter(adapter_name, config)

    def a_columns(self) -> int:
        kernel_h, kernel_w = self.get_base_layer().kernel_size
        return self.in_features * kernel_h * kernel_w

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        delta = b @ (a * e) * self.scaling[adapter_name] / (self.ranknum[adapter_name] + RANKNUM_EPS)
        return delta.reshape(self.get_base_layer().weight.shape)

    def adapter_output(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        x = x.to(self.lora_A[name].dtype)
        return F.conv2d(self.lora_dropout[name](x), self.delta_weight(name), stride=base.stride, padding=base.padding,
                        dilation=base.dilation, groups=base.groups)
