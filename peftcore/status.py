"""PEFT's ``get_layer_status`` / ``get_model_status``: what every adapter layer holds, and whether they agree.

A model whose layers disagree (one layer with the adapter merged, another without; different
active adapters) reports ``"irregular"`` in the model-wide field: the sign of a model left in
an inconsistent state, e.g. by calling layer methods directly.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import nn

from peftcore.layer import AdapterLayer
from peftcore.modules_to_save import ModulesToSaveWrapper
from peftcore.plugins import hooks

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _agreement(values: list) -> Union[bool, Irregular]:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _per_adapter_tensors(module: nn.Module, attrs: tuple[str, ...]) -> dict[str, list[torch.Tensor]]:
    found: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for attr in attrs:
        holder = getattr(module, attr, None)
        if isinstance(holder, nn.ModuleDict):
            for name, sub in holder.items():
                found[name].extend(sub.parameters())
        elif isinstance(holder, (nn.ParameterDict, dict)):
            for name, tensor in holder.items():
                if isinstance(tensor, torch.Tensor):
                    found[name].append(tensor)
    return found


def _layer_status(name: str, module: AdapterLayer | ModulesToSaveWrapper) -> TunerLayerStatus:
    if isinstance(module, ModulesToSaveWrapper):
        trainable = {n: list(m.parameters()) for n, m in module.modules_to_save.items()}
        placed = trainable
        active = [module.active_adapter] if module.active_adapter in module.modules_to_save else []
        merged: list[str] = []
        enabled = not module._disable_adapters
        base = module.original_module
    else:
        trainable = _per_adapter_tensors(module, module.adapter_layer_names)
        placed = _per_adapter_tensors(module, module.adapter_layer_names + module.other_param_names)
        active, merged, enabled = module.active_adapters, list(module.merged_adapters), not module.disable_adapters
        base = module.get_base_layer()
    return TunerLayerStatus(
        name=name,
        module_type=repr(module).partition("(")[0],
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={n: _agreement([p.requires_grad for p in ps]) for n, ps in trainable.items()},
        available_adapters=sorted(set(trainable) | set(placed)),
        devices={n: sorted({t.device.type for t in ts}) for n, ts in placed.items()},
        quantization_backend=hooks.describe_quantization(module=base),
    )


def _tuned_module(model: nn.Module) -> nn.Module:
    # a PeftModel says where its adapter layers are (and refuses when it has none); any other module is searched
    root = getattr(model, "adapter_layers_root", None)
    return root() if callable(root) else model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapter layer (and ``modules_to_save`` wrapper) of ``model``: a
    ``PeftModel`` or any module with adapter layers injected (``inject_adapter_in_model``)."""
    statuses = [
        _layer_status(name, module) for name, module in _tuned_module(model).named_modules()
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper))
    ]
    if not statuses:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                         f"PEFT adapters injected in the model. (get_layer_status(): {type(model).__name__} has no "
                         "adapter layers; is it a PEFT model, or a model with adapters injected "
                         "(inject_adapter_in_model)?)")
    return statuses


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; packed 4-bit storage and DeepSpeed ZeRO-3 placeholders count as the
    numbers of weights they stand for."""
    trainable, total = 0, 0
    for param in model.parameters():
        count = param.numel()
        if count == 0 and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 keeps a placeholder
            count = param.ds_numel
        if param.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
            count = count * 2 * getattr(param, "element_size", lambda: 1)()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model-wide summary of :func:`get_layer_status`, with ``"irregular"`` where layers disagree."""
    from transformers import PreTrainedModel

    layers = get_layer_status(model)
    if callable(getattr(model, "adapter_layers_root", None)):  # a PeftModel
        base_type, adapter_type = type(model.get_base_model()).__name__, type(model.base_model).__name__
        peft_types = {name: str(getattr(config.peft_type, "value", config.peft_type))
                      for name, config in model.peft_config.items()}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        base_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        adapter_type, peft_types = "None", {}
        trainable, total = count_parameters(model)

    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_anywhere = set().union(*(s.merged_adapters for s in layers))
    merged_everywhere = all(
        not (merged_anywhere & (set(s.available_adapters) - set(s.merged_adapters))) for s in layers
    )
    requires_grad: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for name, value in s.requires_grad.items():
            requires_grad[name].append(value)
        for name, kinds in s.devices.items():
            devices[name].update(kinds)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters=sorted(merged_anywhere) if merged_everywhere else "irregular",
        requires_grad={name: _agreement(values) for name, values in requires_grad.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={name: sorted(kinds) for name, kinds in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
