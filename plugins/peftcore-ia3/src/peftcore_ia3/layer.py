"""(IA)^3 wrappers for Linear/Conv1D and Conv2d/Conv3d (PEFT's layout and maths).

Each adapter is one vector ``ia3_l[adapter]`` that multiplies either the layer's
output (shape out x 1) or, for feedforward modules, its input (shape 1 x in).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peftcore import AdapterLayer
from peftcore.layer import check_finite, linear_features

BASE_ADAPTER = "__base__"
# PEFT divides by (l + 1e-8) when unmerging. The epsilon alone puts the restored weight off
# by a relative 1e-8/|l|; that passes 1e-6 once |l| < 1e-2, where we warn (and where l == 0
# the weights were multiplied by 0 and cannot come back at all).
UNMERGE_EPS = 1e-8
INEXACT_BELOW = 1e-2


def _transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


class IA3Layer(AdapterLayer):
    """Per-adapter vectors and the bookkeeping shared by every (IA)^3 wrapper."""

    adapter_layer_names = ("ia3_l",)
    peft_type = "IA3"

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, is_feedforward: bool, module_name: str):
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.is_feedforward = is_feedforward
        self._module_name = module_name
        self.ia3_l = nn.ParameterDict({})

    def vector_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        wanted = config.is_feedforward(module_name or self._module_name)
        if not self.ia3_l:  # no adapter left to disagree with (all deleted)
            self.is_feedforward = wanted
        if wanted != self.is_feedforward:
            role = "input (feedforward)" if self.is_feedforward else "output"
            raise ValueError(
                f"{self._module_name}: adapter {adapter_name!r} would treat this layer as "
                f"{'feedforward' if wanted else 'non-feedforward'}, but existing adapters scale its {role}; "
                "one layer cannot mix both (check feedforward_modules)"
            )
        # drawn even when overwritten with ones, as PEFT does, so one seed leaves both libraries' RNG in step
        self.ia3_l[adapter_name] = nn.Parameter(torch.randn(self.vector_shape()))
        if config.init_ia3_weights:
            self.reset_ia3_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters or [adapter_name])

    def reset_ia3_parameters(self, adapter_name: str) -> None:
        if adapter_name in self.ia3_l:
            nn.init.constant_(self.ia3_l[adapter_name], 1.0)

    # -- merging ------------------------------------------------------------------

    def weight_scaling(self, vector: torch.Tensor) -> torch.Tensor:
        """``vector`` shaped to multiply the base weight."""
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        for name in self.adapters_to_merge(adapter_names):
            vector = self.ia3_l[name].data
            new_weight = base.weight.data * self.weight_scaling(vector)
            new_bias = None
            # scaling the input leaves the bias alone; scaling the output scales it too
            if not self.is_feedforward and getattr(base, "bias", None) is not None:
                new_bias = base.bias.data * vector.reshape(base.bias.shape)
            if safe_merge:
                check_finite(new_weight, name)
                if new_bias is not None:
                    check_finite(new_bias, name, "merged bias")
            base.weight.data = new_weight.to(base.weight.dtype)
            if new_bias is not None:
                base.bias.data = new_bias.to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Divide the merged vectors back out: exact only while no value is close to 0."""
        if not self.merged:
            warnings.warn("Already unmerged; nothing to do")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            vector = self.ia3_l[name].data
            self._warn_if_inexact(name, vector)
            base.weight.data = (base.weight.data / (self.weight_scaling(vector) + UNMERGE_EPS)).to(base.weight.dtype)
            if not self.is_feedforward and getattr(base, "bias", None) is not None:
                base.bias.data = (base.bias.data / (vector.reshape(base.bias.shape) + UNMERGE_EPS)).to(base.bias.dtype)

    def _warn_if_inexact(self, adapter_name: str, vector: torch.Tensor) -> None:
        small = vector.abs() < INEXACT_BELOW
        if not small.any():
            return
        zeros = int((vector == 0).sum())
        lost = f"; {zeros} are exactly 0, so those weights are lost (set to 0)" if zeros else ""
        warnings.warn(
            f"(IA)^3 unmerge of adapter {adapter_name!r} in {self._module_name or type(self.get_base_layer()).__name__}: "
            f"{int(small.sum())} of {vector.numel()} scaling values are below {INEXACT_BELOW:g} in magnitude "
            f"(smallest {vector.abs().min().item():.3g}); dividing by them does not restore the base weights "
            f"exactly{lost}. Reload the base model for exact weights.",
            stacklevel=3,
        )

    # -- running ------------------------------------------------------------------

    def combined_vector(self, names: list[str]) -> torch.Tensor | None:
        """Product of the active adapters' vectors (PEFT multiplies them), or None if none applies."""
        result = None
        for name in names:
            if name in self.ia3_l:
                result = self.ia3_l[name] if result is None else result * self.ia3_l[name]
        return result

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self.mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        vector = self.combined_vector(self.active_adapters)
        if vector is None:
            return self.base_layer(x, *args, **kwargs)
        return self.scaled_forward(x, self.broadcast(vector, x.dim()), *args, **kwargs)

    def broadcast(self, vector: torch.Tensor, ndim: int) -> torch.Tensor:
        """``vector`` (one adapter) shaped to multiply an activation of ``ndim`` dims."""
        raise NotImplementedError

    def scaled_forward(self, x: torch.Tensor, scaling: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """Each row scaled by its own adapter's vector, in one base-layer call."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} rows")
        known = [n for n in dict.fromkeys(adapter_names) if n != BASE_ADAPTER and n in self.ia3_l]
        if not known:
            return self.base_layer(x, *args, **kwargs)
        vectors = [torch.ones_like(self.ia3_l[known[0]])] + [self.ia3_l[n] for n in known]
        index = torch.tensor([known.index(n) + 1 if n in known else 0 for n in adapter_names], device=x.device)
        per_row = torch.stack([self.broadcast(v, x.dim()) for v in vectors])[index]  # (batch, 1, ..., features)
        return self.scaled_forward(x, per_row.squeeze(1), *args, **kwargs)


class Linear(IA3Layer):
    """(IA)^3 for ``nn.Linear`` and transformers' ``Conv1D`` (weights stored transposed)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        in_features, out_features = linear_features(base_layer, config, module_name)
        super().__init__(base_layer, in_features, out_features, config.is_feedforward(module_name), module_name)
        self.fan_in_fan_out = config.fan_in_fan_out
        self.is_target_conv_1d_layer = config.fan_in_fan_out
        self.update_layer(adapter_name, config, module_name)

    def vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def weight_scaling(self, vector: torch.Tensor) -> torch.Tensor:
        return _transpose(vector, self.fan_in_fan_out)

    def broadcast(self, vector: torch.Tensor, ndim: int) -> torch.Tensor:
        return vector.flatten().view(*([1] * (ndim - 1)), -1)

    def scaled_forward(self, x: torch.Tensor, scaling: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.is_feedforward:
            scaled = (x.to(scaling.dtype) * scaling).to(x.dtype)
            return self.base_layer(scaled, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scaling).to(result.dtype)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


class _ConvNd(IA3Layer):
    """(IA)^3 for ``nn.Conv2d``/``nn.Conv3d``: one value per channel, shaped (1, C, 1, ...)."""

    kernel_dim = 0

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        if base_layer.weight.dim() != self.kernel_dim:
            raise ValueError(f"{module_name}: {type(self).__name__} needs a {self.kernel_dim}-d kernel, got {base_layer.weight.dim()}-d")
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels, config.is_feedforward(module_name), module_name)
        self.fan_in_fan_out = False
        self.update_layer(adapter_name, config, module_name)

    def vector_shape(self) -> tuple[int, ...]:
        channels = self.in_features if self.is_feedforward else self.out_features
        return (1, channels) + (1,) * (self.kernel_dim - 2)

    def weight_scaling(self, vector: torch.Tensor) -> torch.Tensor:
        if not self.is_feedforward:
            return vector.transpose(0, 1)  # one factor per output channel
        base = self.get_base_layer()
        if base.groups == 1:
            return vector
        # grouped kernels hold in_channels/groups input channels per output channel
        in_per_group, out_per_group = base.in_channels // base.groups, base.out_channels // base.groups
        grouped = vector.reshape(base.groups, 1, in_per_group, *vector.shape[2:])
        grouped = grouped.expand(base.groups, out_per_group, in_per_group, *vector.shape[2:])
        return grouped.reshape(base.out_channels, in_per_group, *vector.shape[2:])

    def broadcast(self, vector: torch.Tensor, ndim: int) -> torch.Tensor:
        return vector.reshape(1, -1, *([1] * (ndim - 2)))

    def scaled_forward(self, x: torch.Tensor, scaling: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.is_feedforward:
            scaled = (x.to(scaling.dtype) * scaling).to(self.get_base_layer().weight.dtype)
            result = self.base_layer(scaled, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs).to(scaling.dtype) * scaling
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


class Conv2d(_ConvNd):
    kernel_dim = 4


class Conv3d(_ConvNd):
    kernel_dim = 5
