"""LoRA wrappers for Linear/Conv1D, Embedding and Conv2d (PEFT's layout and maths)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftcore import AdapterLayer
from peftcore.layer import LowRankDelta, linear_features, padded_factors, rows_by_adapter, transpose

from peftcore_lora import fast
from peftcore_lora import init as lora_init
from peftcore_lora import loftq as lora_loftq
from peftcore_lora.dora import DoraConv2dLayer, DoraEmbeddingLayer, DoraLinearLayer


def _uninitialised(module_class, *args, **kwargs) -> nn.Module:
    """The module with allocated but unwritten weights; ``LoraLayer.initialize`` writes each value once.

    This skips the constructor's random init, which the LoRA init would overwrite (two
    of the three random draws PEFT makes per adapter; most of the time of attaching).
    Seeded runs therefore draw a different A than peft does, from the same distribution.
    """
    if module_class is nn.Linear:
        return _bare_linear(*args, **kwargs)
    return module_class(*args, device="meta", **kwargs).to_empty(device=torch.get_default_device())


def _bare_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """``nn.Linear(in_features, out_features, bias)`` minus ``reset_parameters`` (4x faster than meta + to_empty)."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = nn.Parameter(torch.empty((out_features, in_features)))
    if bias:
        linear.bias = nn.Parameter(torch.empty(out_features))
    else:
        linear.register_parameter("bias", None)
    return linear


class LoraLayer(AdapterLayer):
    """Per-adapter state shared by every LoRA wrapper."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")
    peft_type = "LORA"

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, module_name: str = ""):
        super().__init__(base_layer, module_name)
        self.in_features, self.out_features = in_features, out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.lora_magnitude_vector = nn.ModuleDict({})
        self._weight_norm_cache: dict[str, torch.Tensor] = {}

    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        r, alpha = config.rank_and_alpha(module_name or self.module_name)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.use_dora[adapter_name] = config.use_dora
        self.lora_bias[adapter_name] = config.lora_bias
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.create_adapter_weights(adapter_name, r, config.lora_bias)
        self.initialize(adapter_name, config.init_lora_weights, config)
        if config.use_dora:
            self.place_adapter(adapter_name)  # the magnitude is computed from A, B and the base weight together
            self.lora_magnitude_vector[adapter_name] = self.make_dora_layer(config.fan_in_fan_out)
            lora_A, lora_B = self.lora_weights(adapter_name)
            self.lora_magnitude_vector[adapter_name].update_layer(
                base_layer=self.get_base_layer(), lora_A=lora_A, lora_B=lora_B, scaling=self.scaling[adapter_name]
            )

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Multiply the adapter's scaling (PEFT's ``set_scale``: alpha/r times ``scale``)."""
        self.scaling[adapter_name] = scale * self.lora_alpha[adapter_name] / self.r[adapter_name]

    # -- subclasses --------------------------------------------------------------

    def create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        raise NotImplementedError

    def make_dora_layer(self, fan_in_fan_out: bool) -> nn.Module:
        raise NotImplementedError(f"DoRA is not available for {type(self).__name__}")

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) weight tensors of an adapter."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def initialize(self, adapter_name: str, init: bool | str, config=None) -> None:
        if init == "loftq":  # writes A, B and the base weight (PEFT: no default init first)
            lora_loftq.loftq_layer_init(self, adapter_name, config.loftq_config)
            return
        if init is True or init == "gaussian":
            lora_init.reset_lora_parameters(self, adapter_name, init)  # writes every value of A, B and B's bias
            return
        # the other inits start from the modules' default initialisation, as PEFT's do
        for holder in (self.lora_A, self.lora_B):
            if adapter_name in holder:
                holder[adapter_name].reset_parameters()
        if init == "pissa":
            lora_init.pissa_init(self, adapter_name)
        elif init == "olora":
            lora_init.olora_init(self, adapter_name)

    # -- merging --------------------------------------------------------------------

    def delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        if not self.lora_bias.get(adapter_name):
            return None
        return self.lora_B[adapter_name].bias * self.scaling[adapter_name]

    # -- combining (the low-rank contract of peftcore.layer) ------------------------

    def low_rank_delta(self, adapter_name: str) -> LowRankDelta:
        """``scaling · B @ A``, with convolution kernels flattened; DoRA and ``lora_bias`` adapters are refused."""
        if self.use_dora.get(adapter_name):
            raise ValueError(
                f"LoRA adapter {adapter_name!r} in {self.location} uses DoRA: its weight change rescales W + sBA by a "
                "learned magnitude, which is not a low-rank product, so it cannot be combined with other adapters"
            )
        if self.lora_bias.get(adapter_name):
            raise ValueError(
                f"LoRA adapter {adapter_name!r} in {self.location} has lora_bias=True: it changes the bias as well, "
                "which a combined low-rank adapter cannot carry; combine adapters trained without lora_bias"
            )
        a, b = self.lora_weights(adapter_name)
        return LowRankDelta(up=b.flatten(1), down=a.flatten(1), scale=self.scaling[adapter_name])

    @torch.no_grad()
    def set_low_rank_delta(self, adapter_name: str, up: torch.Tensor, down: torch.Tensor) -> None:
        a, b = self.lora_weights(adapter_name)
        up, down = padded_factors(up, down, a.shape[0])
        a.copy_(down.reshape(a.shape).to(a.dtype))
        b.copy_((up / self.scaling[adapter_name]).reshape(b.shape).to(b.dtype))

    def merge_one(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        if not self.use_dora.get(name):
            return super().merge_one(name, weight, bias)
        merged, weight_norm = self.lora_magnitude_vector[name].merged_weight(weight, self.delta_weight(name))
        self._weight_norm_cache[name] = weight_norm  # unmerging divides by the norm used here
        return merged, bias

    def unmerge_one(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        if not self.use_dora.get(name):
            return super().unmerge_one(name, weight, bias)
        weight_norm = self._weight_norm_cache.pop(name)
        return self.lora_magnitude_vector[name].unmerged_weight(weight, self.delta_weight(name), weight_norm), bias

    def merge_snapshot(self) -> object:
        return super().merge_snapshot(), dict(self._weight_norm_cache)  # unmerging DoRA divides by these norms

    def restore_merge(self, snapshot: object) -> None:
        weights, norms = snapshot
        super().restore_merge(weights)
        self._weight_norm_cache = dict(norms)

    # -- running ----------------------------------------------------------------

    def adapter_output(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """``B(A(dropout(x))) · s`` with A and B modules (Linear, Conv2d); DoRA rescales with its magnitude."""
        lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        x = x.to(lora_A.weight.dtype)
        scaling = self.scaling[name]
        if not self.use_dora.get(name):
            return lora_B(lora_A(dropout(x))) * scaling
        if isinstance(dropout, nn.Identity) or not self.training:
            dora_base = base_result
        else:
            x, dora_base = dropout(x), None
        return self.lora_magnitude_vector[name](
            x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, base_layer=self.get_base_layer(), base_result=dora_base
        )

    fast_path_applies = False  # peftcore-lora's own Linear maths, which fast.py computes exactly

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs and self.fast_path_applies:
            fused = fast.linear_forward(self, x)  # None: preconditions not met, run the plain path
            if fused is not None:
                return fused
        return super().adapted_forward(x, *args, **kwargs)

    def mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        groups = rows_by_adapter(adapter_names, x.shape[0])
        if any(self.use_dora.get(n) for n in groups):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled. (Mixed-adapter batches are not "
                             "supported with DoRA adapters.)")
        result = self.base_layer(x, *args, **kwargs)
        if not args and not kwargs and self.fast_path_applies:
            grouped = fast.mixed_batch_delta(self, x, adapter_names, result)  # None: leaves result untouched
            if grouped is not None:
                return grouped
        return self.add_outputs_by_row(x, result, groups)


class Linear(LoraLayer):
    """LoRA for ``nn.Linear`` and transformers' ``Conv1D`` (weights stored transposed)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = ""):
        in_features, out_features = linear_features(base_layer, config, module_name)
        super().__init__(base_layer, in_features, out_features, module_name)
        self.fan_in_fan_out = config.fan_in_fan_out
        self.create_adapter(adapter_name, config)

    @property
    def fast_path_applies(self) -> bool:
        # a subclass that changes adapter_output keeps its own maths
        return type(self).adapter_output is LoraLayer.adapter_output

    def create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = _uninitialised(nn.Linear, self.in_features, r, bias=False)
        self.lora_B[adapter_name] = _uninitialised(nn.Linear, r, self.out_features, bias=lora_bias)

    def make_dora_layer(self, fan_in_fan_out: bool) -> nn.Module:
        return DoraLinearLayer(fan_in_fan_out=fan_in_fan_out)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return not self.lora_bias.get(adapter_name, False)  # DoRA converts (exactly); a bias change cannot

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        compute_dtype = (
            torch.float32 if a.dtype in (torch.float16, torch.bfloat16) and a.device.type == "cpu" else a.dtype
        )
        delta = transpose(b.to(compute_dtype) @ a.to(compute_dtype), self.fan_in_fan_out) * self.scaling[adapter_name]
        return delta.to(a.dtype)


class Embedding(LoraLayer):
    """LoRA for ``nn.Embedding``: A starts at zero, B is normal (PEFT's choice)."""

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, config, module_name: str = ""):
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim, module_name)
        self.create_adapter(adapter_name, config)

    def create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for Embedding layers")
        base = self.get_base_layer()
        self.lora_embedding_A[adapter_name] = nn.Parameter(base.weight.new_zeros((r, self.in_features)))
        self.lora_embedding_B[adapter_name] = nn.Parameter(base.weight.new_zeros((self.out_features, r)))

    def make_dora_layer(self, fan_in_fan_out: bool) -> nn.Module:
        return DoraEmbeddingLayer(fan_in_fan_out=True)

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return transpose(b @ a, True) * self.scaling[adapter_name]

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                           scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def adapter_output(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        after_a = self._embed(x, self.lora_embedding_A[name].T)
        lora_out = (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]
        if not self.use_dora.get(name):
            return lora_out
        mag_norm_scale = self.lora_magnitude_vector[name].scale(self.get_base_layer().weight, self.delta_weight(name))
        return mag_norm_scale * (base_result + lora_out) - base_result


class Conv2d(LoraLayer):
    """LoRA for ``nn.Conv2d``: A copies the base kernel geometry, B is 1x1."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, config, module_name: str = ""):
        if base_layer.groups != 1:
            raise ValueError(
                f"{module_name}: LoRA for grouped convolutions (groups={base_layer.groups}) is not supported"
            )
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels, module_name)
        self.create_adapter(adapter_name, config)

    def create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        self.lora_A[adapter_name] = _uninitialised(
            nn.Conv2d, self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False
        )
        self.lora_B[adapter_name] = _uninitialised(nn.Conv2d, r, self.out_features, (1, 1), (1, 1), bias=lora_bias)

    def make_dora_layer(self, fan_in_fan_out: bool) -> nn.Module:
        return DoraConv2dLayer(fan_in_fan_out=False)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if self.get_base_layer().weight.shape[2:4] == (1, 1):
            delta = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            delta = F.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)
        return delta * self.scaling[adapter_name]
