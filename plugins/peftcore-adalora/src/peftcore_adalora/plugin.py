"""The AdaLoRA plugin: what it registers with peftcore, through public hooks only."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from peftcore import LayerSupport, LayerTuner, Method, hookimpl
from peftcore.method import strip_adapter_name
from peftcore.serialization import default_adapter_state_dict, default_load_adapter_state_dict, tensors_by_module

from peftcore_adalora import allocator
from peftcore_adalora.config import DEFAULT_TARGET_MODULES, AdaLoraConfig, rank_pattern_module
from peftcore_adalora.layer import AdaLoraLayer, SVDConv2d, SVDLinear

__all__ = ["AdaLoraCallback", "AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator"]  # noqa: F822 (AdaLoraCallback: lazily)

RankAllocator = allocator.RankAllocator
TENSOR_PREFIXES = ("lora_",)
_PEFT_DUPLICATE_BIASES = (".modules_to_save.bias", ".original_module.bias")


def __getattr__(name: str):
    # the callback pulls in transformers' Trainer stack (seconds of imports): only on demand
    if name == "AdaLoraCallback":
        from peftcore_adalora.callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def adalora_disk_key(key: str, adapter_name: str, config: AdaLoraConfig) -> str | None:
    """PEFT's names: the adapter segment dropped; ``ranknum`` never saved; biases per ``bias``."""
    name = strip_adapter_name(key, adapter_name, TENSOR_PREFIXES)
    if name is not None:
        return name
    if ".lora_" in key or ".ranknum." in key or ".modules_to_save." in key or ".original_module." in key:
        return None  # another adapter's tensors, the fixed rank, or the core's modules_to_save copies
    if config.bias == "all" and key.endswith(".bias"):
        return key
    if config.bias == "lora_only" and key.endswith(".base_layer.bias"):
        return key
    return None


def _is_adalora_model(model: nn.Module) -> bool:
    return any(isinstance(c, AdaLoraConfig) for c in getattr(model, "peft_config", {}).values())


class AdaLoraModel(LayerTuner):
    """PEFT's ``AdaLoraModel``: ``AdaLoraModel(model, config, adapter_name)`` wraps ``model``'s target modules with
    AdaLoRA layers in place; ``PeftModel.base_model`` is one for AdaLoRA adapters."""


@hookimpl
def register_methods(register):
    register(Method(peft_type="ADALORA", name="adalora", config_class=AdaLoraConfig, tensor_prefixes=TENSOR_PREFIXES,
                    tuner_class=AdaLoraModel,
                    disk_key=adalora_disk_key,
                    description="AdaLoRA: SVD-form LoRA whose ranks are reallocated by importance during training"))


@hookimpl
def register_layer_support(register):
    from transformers.pytorch_utils import Conv1D

    register(LayerSupport("ADALORA", nn.Linear, SVDLinear))
    register(LayerSupport("ADALORA", Conv1D, SVDLinear))
    register(LayerSupport("ADALORA", nn.Conv2d, SVDConv2d))


@hookimpl
def default_target_modules(config, model_type):
    if isinstance(config, AdaLoraConfig) and model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    return None


@hookimpl
def adapter_injected(model, config, adapter_name):
    """One trainable AdaLoRA adapter per model (PEFT's rule); it gets the rank allocator."""
    if not isinstance(config, AdaLoraConfig):
        return
    trainable = [n for n, c in model.peft_config.items() if isinstance(c, AdaLoraConfig) and not c.inference_mode]
    if len(trainable) > 1:
        model.delete_adapter(adapter_name)  # leave the model as it was before this adapter
        raise ValueError(
            f"AdaLoraModel supports only 1 trainable adapter: {trainable[0]!r} already trains; add "
            f"{adapter_name!r} with inference_mode=True (or load it with is_trainable=False)"
        )
    model.update_and_allocate = partial(allocator.update_and_allocate, model)
    model.resize_modules_by_rank_pattern = partial(allocator.resize_modules_by_rank_pattern, model)
    if config.inference_mode:
        return
    try:
        model.rankallocator = allocator.RankAllocator(model.model, config, adapter_name)
    except ValueError:
        model.delete_adapter(adapter_name)
        raise
    model.trainable_adapter_name = adapter_name
    if config.bias != "none":
        for name, param in model.model.named_parameters():
            if ".lora_" in name or ".ranknum." in name or ".modules_to_save." in name or ".original_module." in name:
                continue
            if name.endswith(".bias") and (config.bias == "all" or name.endswith(".base_layer.bias")):
                param.requires_grad_(True)


@hookimpl
def on_optimizer_step(model, step):
    """Rank allocation after every optimizer step (PEFT asks users to call ``update_and_allocate`` themselves)."""
    tuner = getattr(model, "base_model", None)
    if getattr(tuner, "rankallocator", None) is not None and _is_adalora_model(tuner):
        allocator.update_and_allocate(tuner, step)


@hookimpl
def process_model_output(model, output):
    """In training, add ``orth_reg_weight · mean ||PᵀP − I||_F`` to the loss (PEFT's AdaLoraModel.forward)."""
    if not model.training or not _is_adalora_model(model):
        return
    name = getattr(model, "trainable_adapter_name", None)
    config = model.peft_config.get(name) if name is not None else None
    if config is None or config.orth_reg_weight == 0:
        return
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        return
    regularised = loss + config.orth_reg_weight * allocator.orthogonal_regularizer(model.model, name)
    if isinstance(output, Mapping):
        output["loss"] = regularised  # a ModelOutput keeps its attribute in step
    else:
        output.loss = regularised


@hookimpl
def config_to_dict(config):
    """PEFT saves ``rank_pattern`` keys without the adapter name (``<module>.lora_E``)."""
    if not isinstance(config, AdaLoraConfig):
        return None
    data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if config.rank_pattern is not None:
        data["rank_pattern"] = {f"{rank_pattern_module(k)[0]}.lora_E": list(v) for k, v in config.rank_pattern.items()}
    return data


@hookimpl
def adapter_state_dict(model, config, adapter_name):
    """Saved at the allocated ranks: the pruned triplets are cut from the files, as PEFT does."""
    if not isinstance(config, AdaLoraConfig):
        return None
    state_dict = default_adapter_state_dict(model, config, adapter_name)
    if config.rank_pattern:
        state_dict = allocator.resize_state_dict_by_rank_pattern(state_dict, config.rank_pattern)
    return state_dict


@hookimpl
def load_adapter_state_dict(model, config, adapter_name, state_dict):
    """Shrink the matrices to the saved allocation first, so the file's shapes fit."""
    if not isinstance(config, AdaLoraConfig):
        return None
    if config.rank_pattern:
        allocator.resize_modules_by_rank_pattern(model.base_model, config.rank_pattern, adapter_name)
    if config.bias == "all":
        # peft's bias="all" also writes the head copies' biases under their internal names; both
        # duplicate tensors that load elsewhere (``<head>.bias``, the base model's own bias)
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(_PEFT_DUPLICATE_BIASES)}
    return default_load_adapter_state_dict(model, config, adapter_name, state_dict)


@hookimpl
def check_adapter_files(config, tensors):
    """Each module has its triplet A (r x in), E (r x 1), B (out x r) at the rank ``rank_pattern`` allocates."""
    if not isinstance(config, AdaLoraConfig):
        return None
    allocated = {rank_pattern_module(k)[0]: sum(map(bool, v)) for k, v in (config.rank_pattern or {}).items()}
    problems = []
    for module, parts in sorted(tensors_by_module(tensors, TENSOR_PREFIXES).items()):
        a, e, b = (parts.get(name) for name in ("lora_A", "lora_E", "lora_B"))
        if a is None or e is None or b is None:
            missing = [n for n, t in (("lora_A", a), ("lora_E", e), ("lora_B", b)) if t is None]
            problems.append(f"{module}: has part of an AdaLoRA triplet but not {', '.join(missing)}")
            continue
        rank = allocated.get(module, config.init_r)
        shapes = {"lora_A rows": a.shape[0], "lora_E rows": e.shape[0], "lora_B columns": b.shape[-1]}
        wrong = {k: v for k, v in shapes.items() if v != rank}
        if wrong or e.dim() != 2 or e.shape[1] != 1:
            source = "rank_pattern" if module in allocated else "init_r"
            problems.append(f"{module}: triplet shapes A {tuple(a.shape)}, E {tuple(e.shape)}, B {tuple(b.shape)} do "
                            f"not fit rank {rank} ({source})")
    return problems
