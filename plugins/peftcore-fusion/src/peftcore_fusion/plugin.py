"""The fusion plugin: weighted merging for every layer method, and the learned FUSION method, as peftcore hooks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from peftcore import AdapterLayer, LayerSupport, Method, hookimpl
from peftcore.matching import matches_target
from peftcore.serialization import tensors_by_module
from peftcore.walking import walk_modules

from peftcore_fusion.combine import combine_adapters as combine
from peftcore_fusion.config import FusionConfig
from peftcore_fusion.layer import FusionLayer

__all__ = ["FusionConfig", "FusionLayer"]
PEFTCORE_HOOKSPEC_VERSION = 2

FUSABLE = ("LORA", "ADALORA")  # additive methods: their layers answer adapter_output
TENSOR_PREFIXES = ("fusion_",)


@hookimpl
def register_methods(register):
    register(Method(peft_type="FUSION", name="fusion", config_class=FusionConfig, tensor_prefixes=TENSOR_PREFIXES,
                    builds_on=FUSABLE,
                    description="Learned AdapterFusion over frozen LoRA adapters (the package also merges adapters "
                                "of every layer method: add_weighted_adapter)"))


@hookimpl
def register_layer_support(register):
    register(LayerSupport("FUSION", AdapterLayer, FusionLayer))


def _members_layer(module) -> AdapterLayer | None:
    """The layer holding the members at this position: the module itself, or the one a fusion layer wraps."""
    if isinstance(module, FusionLayer):
        return module.base_layer
    if isinstance(module, AdapterLayer) and module.peft_type in FUSABLE:
        return module
    return None


def _layers_with_members(model, names: list[str]) -> dict[str, set[str]]:
    """Module path -> which of ``names`` its (outermost) adapter layer holds."""
    found = {}
    for key, module in walk_modules(model, stop_at=(AdapterLayer,)):
        layer = _members_layer(module)
        if layer is not None:
            held = {name for name in names if layer.has_adapter(name)}
            if held:
                found[key] = held
    return found


@hookimpl
def prepare_config(config, model):
    """All members must be in the model; ``target_modules=None`` means every layer holding one of them."""
    if not isinstance(config, FusionConfig):
        return
    layers = _layers_with_members(model, config.adapters)
    present = set().union(*layers.values()) if layers else set()
    missing = [name for name in config.adapters if name not in present]
    if missing:
        raise ValueError(
            f"FusionConfig: the model holds no {' or '.join(FUSABLE)} adapter named {missing} (fusion fuses adapters "
            "the model already holds); load them first, e.g. model.load_adapter(folder, name), or fix the names"
        )
    if config.target_modules is None:
        config.target_modules = {key.rsplit(".", 1)[-1] for key in layers}


@hookimpl
def is_target_module(config, module_name, module, model):
    if not isinstance(config, FusionConfig):
        return None
    layer = _members_layer(module)
    holds = layer is not None and any(layer.has_adapter(name) for name in config.adapters)
    return holds and matches_target(config, module_name)


@hookimpl
def process_model_output(model, output):
    """In training, add ``value_regularization · Σ ||I - V||²`` of the active fusion adapters to the loss."""
    if not model.training:
        return
    active = [(name, model.peft_config[name]) for name in model.active_adapters if name in model.peft_config]
    fusions = [(n, c.value_regularization) for n, c in active if isinstance(c, FusionConfig) and c.value_regularization]
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not fusions or not isinstance(loss, torch.Tensor):
        return
    layers = [layer for _, layer in model.adapter_layers() if isinstance(layer, FusionLayer)]
    for name, weight in fusions:
        loss = loss + weight * sum(layer.value_regularizer(name) for layer in layers if layer.has_adapter(name))
    if isinstance(output, Mapping):
        output["loss"] = loss
    else:
        output.loss = loss


@hookimpl
def combine_adapters(model, adapters, weights, adapter_name, combination_type, options):
    """``add_weighted_adapter`` for adapters of every layer method (see peftcore_fusion.combine)."""
    return combine(model, adapters, weights, adapter_name, combination_type, options)


@hookimpl
def check_adapter_files(config, tensors):
    """Each fused module has square query/key (with bias) and value (without) projections of one width."""
    if not isinstance(config, FusionConfig):
        return None
    problems = []
    for module, parts in sorted(tensors_by_module(tensors, TENSOR_PREFIXES).items()):
        value = parts.get("fusion_value.weight")
        width = value.shape[0] if value is not None and value.dim() == 2 else None
        for name in ("fusion_query.weight", "fusion_key.weight", "fusion_value.weight"):
            tensor = parts.get(name)
            if tensor is None or tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1] or tensor.shape[0] != width:
                shape = None if tensor is None else tuple(tensor.shape)
                problems.append(f"{module}: {name} is {shape}; expected square ({width}, {width}) like fusion_value")
        for name in ("fusion_query.bias", "fusion_key.bias"):
            tensor = parts.get(name)
            if tensor is None or tuple(tensor.shape) != (width,):
                problems.append(f"{module}: {name} is {None if tensor is None else tuple(tensor.shape)}; "
                                f"expected ({width},)")
    return problems
