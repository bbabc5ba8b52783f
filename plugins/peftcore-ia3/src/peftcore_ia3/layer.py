"""(IA)^3 wrappers for Linear/Conv1D and Conv2d/Conv3d (PEFT's layout and maths).

Each adapter is one vector ``ia3_l[adapter]`` that multiplies either the layer's
output (shape out x 1) or, for feedforward modules, its input (shape 1 x in).
"""

from __future__ import annotations

import torch
from torch import nn

from peftcore.layer import BASE_ADAPTER, ScalingAdapterLayer, check_adapter_names_length, linear_features, transpose


class IA3Layer(ScalingAdapterLayer):
    """Per-adapter vectors and the bookkeeping shared by every (IA)^3 wrapper."""

    adapter_layer_names = ("ia3_l",)
    peft_type = "IA3"

    def __init__(
        self, base_layer: nn.Module, in_features: int, out_features: int, is_feedforward: bool, module_name: str
    ):
        super().__init__(base_layer, module_name)
        self.in_features, self.out_features = in_features, out_features
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict({})

    def vector_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        wanted = config.is_feedforward(module_name or self.module_name)
        if not self.ia3_l:  # no adapter left to disagree with (all deleted)
            self.is_feedforward = wanted
        if wanted != self.is_feedforward:
            role = "input (feedforward)" if self.is_feedforward else "output"
            raise ValueError(
                f"{self.location}: adapter {adapter_name!r} would treat this layer as "
                f"{'feedforward' if wanted else 'non-feedforward'}, but existing adapters scale its {role}; "
                "one layer cannot mix both (check feedforward_modules)"
            )
        # drawn even when overwritten with ones, as PEFT does, so one seed leaves both libraries' RNG in step
        self.ia3_l[adapter_name] = nn.Parameter(torch.randn(self.vector_shape()))
        if config.init_ia3_weights:
            self.reset_ia3_parameters(adapter_name)

    def reset_ia3_parameters(self, adapter_name: str) -> None:
        if adapter_name in self.ia3_l:
            nn.init.constant_(self.ia3_l[adapter_name], 1.0)

    # -- merging ------------------------------------------------------------------

    def scaling_vector(self, adapter_name: str) -> torch.Tensor:
        return self.ia3_l[adapter_name].data

    @torch.no_grad()
    def set_scaling_vector(self, adapter_name: str, vector: torch.Tensor) -> None:
        target = self.ia3_l[adapter_name]
        target.copy_(vector.reshape(target.shape).to(target.dtype))

    def bias_scaling(self, adapter_name: str) -> torch.Tensor | None:
        # scaling the input leaves the bias alone; scaling the output scales it too
        bias = getattr(self.get_base_layer(), "bias", None)
        if self.is_feedforward or bias is None:
            return None
        return self.ia3_l[adapter_name].data.reshape(bias.shape)

    # -- running ------------------------------------------------------------------

    def combined_vector(self, names: list[str]) -> torch.Tensor | None:
        """Product of the active adapters' vectors (PEFT multiplies them), or None if none applies."""
        result = None
        for name in names:
            if name in self.ia3_l:
                result = self.ia3_l[name] if result is None else result * self.ia3_l[name]
        return result

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
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
        check_adapter_names_length(adapter_names, x.shape[0])
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
        self.create_adapter(adapter_name, config)

    def vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def weight_scaling(self, adapter_name: str) -> torch.Tensor:
        return transpose(self.ia3_l[adapter_name].data, self.fan_in_fan_out)

    def broadcast(self, vector: torch.Tensor, ndim: int) -> torch.Tensor:
        return vector.flatten().view(*([1] * (ndim - 1)), -1)

    def scaled_forward(self, x: torch.Tensor, scaling: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.is_feedforward:
            scaled = (x.to(scaling.dtype) * scaling).to(x.dtype)
            return self.base_layer(scaled, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scaling).to(result.dtype)


class _ConvNd(IA3Layer):
    """(IA)^3 for ``nn.Conv2d``/``nn.Conv3d``: one value per channel, shaped (1, C, 1, ...)."""

    kernel_dim = 0

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        if base_layer.weight.dim() != self.kernel_dim:
            raise ValueError(
                f"{module_name}: {type(self).__name__} needs a {self.kernel_dim}-d kernel, got "
                f"{base_layer.weight.dim()}-d"
            )
        super().__init__(
            base_layer, base_layer.in_channels, base_layer.out_channels, config.is_feedforward(module_name), module_name
        )
        self.fan_in_fan_out = False
        self.create_adapter(adapter_name, config)

    def vector_shape(self) -> tuple[int, ...]:
        channels = self.in_features if self.is_feedforward else self.out_features
        return (1, channels) + (1,) * (self.kernel_dim - 2)

    def weight_scaling(self, adapter_name: str) -> torch.Tensor:
        vector = self.ia3_l[adapter_name].data
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


class Conv2d(_ConvNd):
    kernel_dim = 4


class Conv3d(_ConvNd):
    kernel_dim = 5
