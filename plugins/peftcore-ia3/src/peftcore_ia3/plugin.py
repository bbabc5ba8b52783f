"""The (IA)^3 plugin: what it registers with peftcore, through public hooks only."""

from __future__ import annotations

import dataclasses

from torch import nn

from peftcore import LayerSupport, LayerTuner, Method, hookimpl
from peftcore.serialization import tensors_by_module

from peftcore_ia3.config import DEFAULT_FEEDFORWARD_MODULES, DEFAULT_TARGET_MODULES, PEFTCORE_ONLY_FIELDS, IA3Config
from peftcore_ia3.layer import Conv2d, Conv3d, IA3Layer, Linear

__all__ = ["IA3Config", "IA3Layer", "IA3Model"]

TENSOR_PREFIXES = ("ia3_",)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


class IA3Model(LayerTuner):
    """PEFT's ``IA3Model``: ``IA3Model(model, config, adapter_name)`` wraps ``model``'s target modules with (IA)^3
    layers in place; ``PeftModel.base_model`` is one for (IA)^3 adapters."""


@hookimpl
def register_methods(register):
    register(Method(peft_type="IA3", name="ia3", config_class=IA3Config, tensor_prefixes=TENSOR_PREFIXES,
                    tuner_class=IA3Model,
                    description="(IA)^3: learned vectors that rescale activations (Linear, Conv1D, Conv2d/3d)"))


@hookimpl
def register_layer_support(register):
    from transformers.pytorch_utils import Conv1D

    register(LayerSupport("IA3", nn.Linear, Linear))
    register(LayerSupport("IA3", Conv1D, Linear))
    register(LayerSupport("IA3", nn.Conv2d, Conv2d))
    register(LayerSupport("IA3", nn.Conv3d, Conv3d))


@hookimpl
def default_target_modules(config, model_type):
    if isinstance(config, IA3Config) and model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    return None


@hookimpl
def prepare_config(config, model):
    """``feedforward_modules`` from PEFT's table when None (the core resolves ``target_modules`` after this)."""
    if not isinstance(config, IA3Config) or config.feedforward_modules is not None:
        return
    model_type = _model_type(model)
    if model_type not in DEFAULT_FEEDFORWARD_MODULES:
        if config.target_modules is None:
            return  # the core asks for target_modules first; feedforward_modules come with them
        raise ValueError(
            f"IA3Config: feedforward_modules is None and PEFT has no IA3 default for model_type {model_type!r}; "
            "pass feedforward_modules explicitly (a list, possibly empty, of target names whose input is scaled)"
        )
    config.feedforward_modules = set(DEFAULT_FEEDFORWARD_MODULES[model_type])


@hookimpl
def config_to_dict(config):
    if not isinstance(config, IA3Config):
        return None
    data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for name in PEFTCORE_ONLY_FIELDS:
        if data[name] is None:
            del data[name]
    return data


@hookimpl
def check_adapter_files(config, tensors):
    """A 2-D vector scales the input (1 x in) of a feedforward module and the output (out x 1) of any other."""
    if not isinstance(config, IA3Config) or config.feedforward_modules is None:
        return None
    problems = []
    for module, parts in sorted(tensors_by_module(tensors, TENSOR_PREFIXES).items()):
        vector = parts.get("ia3_l")
        if vector is None or vector.dim() != 2:
            continue  # convolutions keep (1, C, 1, ...) for both roles
        feedforward = config.is_feedforward(module)
        if (vector.shape[0] != 1) if feedforward else (vector.shape[1] != 1):
            want = "(1, in) for a feedforward module" if feedforward else "(out, 1)"
            problems.append(f"{module}: ia3_l has shape {tuple(vector.shape)}, expected {want} (feedforward_modules)")
    return problems
