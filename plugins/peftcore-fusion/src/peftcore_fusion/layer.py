"""``FusionLayer``: AdapterFusion attention over the member adapters of the layer it wraps.

The wrapped module is the members' own adapter layer (LoRA, AdaLoRA): the fusion
reads their outputs only through the public ``AdapterLayer.adapter_output``. Per
token, with ``h`` the layer's base output and ``dᵢ`` what member i adds::

    αᵢ = softmax_i((Q h) · (K dᵢ) / T)        out = h + V Σᵢ αᵢ dᵢ

(``V`` has no bias, so ``V Σ αᵢ dᵢ = Σ αᵢ V dᵢ``, AdapterHub's "value before
softmax"). The wrapper is invisible in state-dict names: the layer inside keeps the
names it had before the fusion came (``...query.lora_A.<name>``), so the members still
save and load in PEFT's format.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcore import AdapterLayer

INNER = "base_layer."


def output_features(base: nn.Module, where: str) -> int:
    """Width of the feature dimension (the last) of ``base``'s output."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(base, nn.Linear):
        return base.out_features
    if isinstance(base, Conv1D):
        return base.weight.shape[1]
    if isinstance(base, nn.Embedding):
        return base.embedding_dim
    raise ValueError(
        f"{where}: learned fusion attends over the last dimension of a layer's output (Linear, Conv1D, Embedding); "
        f"this layer is a {type(base).__name__}; leave it out with FusionConfig(target_modules=...)"
    )


class FusionLayer(AdapterLayer):
    adapter_layer_names = ("fusion_query", "fusion_key", "fusion_value")
    other_param_names = ("fusion_adapters", "fusion_temperature", "fusion_dropout")
    peft_type = "FUSION"

    def __init__(self, base_layer: AdapterLayer, adapter_name: str, config, module_name: str = ""):
        if not isinstance(base_layer, AdapterLayer):
            raise ValueError(f"{module_name}: a fusion adapter wraps the layer of the adapters it fuses, got a "
                             f"{type(base_layer).__name__}")
        super().__init__(base_layer, module_name)
        self.features = output_features(base_layer.get_base_layer(), module_name)
        self.fusion_query = nn.ModuleDict({})
        self.fusion_key = nn.ModuleDict({})
        self.fusion_value = nn.ModuleDict({})
        self.fusion_dropout = nn.ModuleDict({})
        self.fusion_adapters: dict[str, list[str]] = {}
        self.fusion_temperature: dict[str, float] = {}
        self.register_state_dict_post_hook(_hide_wrapper_in_names)
        self.register_load_state_dict_pre_hook(_restore_wrapper_in_names)
        self.create_adapter(adapter_name, config)

    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        members = [name for name in config.adapters if self.base_layer.has_adapter(name)]
        if not members:
            raise ValueError(f"{self.location}: holds none of the adapters {config.adapters} to fuse")
        width = self.features
        query, key, value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width, bias=False)
        with torch.no_grad():  # AdapterHub's init: small Q and K (uniform attention at first), V = I
            for projection in (query, key):
                projection.weight.normal_(0.0, config.init_std)
                projection.bias.zero_()
            value.weight.copy_(torch.eye(width))
        self.fusion_query[adapter_name] = query
        self.fusion_key[adapter_name] = key
        self.fusion_value[adapter_name] = value
        self.fusion_dropout[adapter_name] = (
            nn.Dropout(config.attention_dropout) if config.attention_dropout > 0 else nn.Identity()
        )
        self.fusion_adapters[adapter_name] = members
        self.fusion_temperature[adapter_name] = float(config.temperature)

    # -- running --------------------------------------------------------------------------

    def member_outputs(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """What each member of fusion adapter ``name`` adds here, stacked: (..., members, features)."""
        inner = self.base_layer
        if inner.merged:
            raise ValueError(
                f"{self.location}: adapters {inner.merged_adapters} are merged into the base weights, so the fusion "
                f"adapter {name!r} cannot see the base output; call unmerge_adapter() first"
            )
        members = self.fusion_adapters[name]
        gone = [m for m in members if not inner.has_adapter(m)]
        if gone:
            raise ValueError(f"{self.location}: fusion adapter {name!r} fuses {gone}, which were deleted")
        return torch.stack([inner.adapter_output(m, x, base_result).to(base_result.dtype) for m in members], dim=-2)

    def attention(self, name: str, base_result: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Per token, the weight of each member: (..., members), summing to 1."""
        dtype = self.fusion_query[name].weight.dtype
        query = self.fusion_query[name](base_result.to(dtype))
        keys = self.fusion_key[name](outputs.to(dtype))
        scores = (keys @ query.unsqueeze(-1)).squeeze(-1)
        scores = self.fusion_dropout[name](scores)
        return torch.softmax(scores / self.fusion_temperature[name], dim=-1)

    def adapter_output(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        outputs = self.member_outputs(name, x, base_result)
        weights = self.attention(name, base_result, outputs)
        mixed = (weights.unsqueeze(-1) * outputs.to(weights.dtype)).sum(dim=-2)
        return self.fusion_value[name](mixed)

    def value_regularizer(self, name: str) -> torch.Tensor:
        """AdapterHub's ``||I - V||²`` for fusion adapter ``name`` (added to the training loss)."""
        value = self.fusion_value[name].weight
        return (torch.eye(value.shape[0], device=value.device, dtype=value.dtype) - value).pow(2).sum()

    # -- merging ----------------------------------------------------------------------------

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError(
            f"Fusion adapter {adapter_name!r} in {self.location} cannot be merged: its output mixes its member "
            "adapters with attention weights computed from each input, so no fixed weight change equals it; merge "
            "a member adapter instead, or combine the members with add_weighted_adapter"
        )


def _hide_wrapper_in_names(module: FusionLayer, state_dict: dict, prefix: str, local_metadata) -> None:
    """``<prefix>base_layer.X`` (the wrapped layer's entries) -> ``<prefix>X``, as without the fusion."""
    inner = prefix + INNER
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[prefix + key[len(inner):] if key.startswith(inner) else key] = value


def _restore_wrapper_in_names(module: FusionLayer, state_dict: dict, prefix: str, *args) -> None:
    own = tuple(f"{prefix}{holder}." for holder in module.adapter_layer_names + module.other_param_names)
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
        state_dict[prefix + INNER + key[len(prefix):]] = state_dict.pop(key)
