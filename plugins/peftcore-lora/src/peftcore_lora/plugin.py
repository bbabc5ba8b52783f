"""The LoRA plugin: what it registers with peftcore, through public hooks only."""

from __future__ import annotations

import warnings

from torch import nn

from peftcore import LayerSupport, LayerTuner, Method, hookimpl
from peftcore.method import strip_adapter_name
from peftcore.serialization import tensors_by_module

from peftcore_lora.config import DEFAULT_TARGET_MODULES, LoftQConfig, LoraConfig, LoraRuntimeConfig, matches_pattern
from peftcore_lora.conversion import convert_to_lora, save_as_lora
from peftcore_lora.initial_weights import base_moving_init, convert_for_original_base, warn_base_moved
from peftcore_lora.layer import Conv2d, Embedding, Linear, LoraLayer

__all__ = ["LoftQConfig", "LoraConfig", "LoraLayer", "LoraModel", "LoraRuntimeConfig", "convert_to_lora",
           "save_as_lora"]

TENSOR_PREFIXES = ("lora_",)


def lora_disk_key(key: str, adapter_name: str, config: LoraConfig) -> str | None:
    """PEFT's names: adapter segment dropped, DoRA magnitude without ``.weight``, biases per ``bias``."""
    name = strip_adapter_name(key, adapter_name, TENSOR_PREFIXES)
    if name is not None:
        if name.endswith(".lora_magnitude_vector.weight"):
            name = name[: -len(".weight")]
        return name
    if ".lora_" in key or ".modules_to_save." in key or ".original_module." in key:
        return None  # another adapter's tensors, or the core's modules_to_save copies
    if config.bias == "all" and key.endswith(".bias"):
        return key
    if config.bias == "lora_only" and key.endswith(".base_layer.bias"):
        return key
    return None


class LoraModel(LayerTuner):
    """PEFT's ``LoraModel``: ``LoraModel(model, config, adapter_name)`` wraps ``model``'s target modules with LoRA
    layers in place; ``PeftModel.base_model`` is one for LoRA adapters."""

    def inject_adapter(self, config, adapter_name: str, fill=None, module_names=None) -> None:
        # PiSSA/OLoRA leave the base changed even after their adapter is deleted: remembered, not looked up
        moved_by = self.__dict__.get("_base_moved_by") or base_moving_init(config)
        if moved_by and self.peft_config:
            warn_base_moved(moved_by)
        super().inject_adapter(config, adapter_name, fill=fill, module_names=module_names)
        self.__dict__["_base_moved_by"] = moved_by

    def convert_for_initial_model(self, config, adapter_name: str, tensors: dict, initial_path: str):
        """``save_pretrained(path_initial_model_for_weight_conversion=...)``: see ``initial_weights``."""
        return convert_for_original_base(config, tensors, initial_path)


@hookimpl
def register_methods(register):
    register(Method(peft_type="LORA", name="lora", config_class=LoraConfig, tensor_prefixes=TENSOR_PREFIXES,
                    tuner_class=LoraModel, disk_key=lora_disk_key,
                    description="Low-rank adapters (LoRA, rsLoRA, DoRA, PiSSA/OLoRA/LoftQ init)"))


@hookimpl
def register_layer_support(register):
    from transformers.pytorch_utils import Conv1D

    register(LayerSupport("LORA", nn.Linear, Linear))
    register(LayerSupport("LORA", Conv1D, Linear))
    register(LayerSupport("LORA", nn.Embedding, Embedding))
    register(LayerSupport("LORA", nn.Conv2d, Conv2d))


@hookimpl
def default_target_modules(config, model_type):
    if isinstance(config, LoraConfig):
        return DEFAULT_TARGET_MODULES.get(model_type)
    return None


@hookimpl
def adapter_injected(model, config, adapter_name):
    """Warn about patterns that matched nothing; ``bias``: "all" trains every bias, "lora_only" wrapped layers' ones."""
    if not isinstance(config, LoraConfig):
        return
    wrapped = [name for name, layer in model.adapter_layers() if adapter_name in layer.adapter_names]
    for field_name in ("rank_pattern", "alpha_pattern"):
        unused = [key for key in getattr(config, field_name) if not any(matches_pattern(key, name) for name in wrapped)]
        if unused:
            warnings.warn(
                f"LoraConfig.{field_name} keys {unused} matched no targeted module and were ignored",
                RuntimeWarning,
                stacklevel=2,
            )
    if config.bias == "none" or config.inference_mode:
        return
    for name, param in model.model.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name or ".original_module." in name:
            continue
        if config.bias == "all" and name.endswith(".bias"):
            param.requires_grad_(True)
        elif config.bias == "lora_only" and name.endswith(".base_layer.bias"):
            param.requires_grad_(True)


@hookimpl
def check_adapter_files(config, tensors):
    """Every module has A and B, with r (after ``rank_pattern``) rows and columns; DoRA's magnitude fits B."""
    if not isinstance(config, LoraConfig):
        return None
    problems = []
    for module, parts in sorted(tensors_by_module(tensors, TENSOR_PREFIXES).items()):
        r = config.rank_and_alpha(module)[0]
        for a_name, b_name in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            a, b = parts.get(a_name), parts.get(b_name)
            if a is None and b is None:
                continue
            if a is None or b is None:
                problems.append(f"{module}: has {a_name if a is not None else b_name} but not its partner")
                continue
            rows, cols = a.shape[0], (b.shape[1] if b.dim() > 1 else None)  # Linear, Conv and Embedding alike
            if rows != r or cols != r:
                problems.append(f"{module}: {a_name} has {rows} rows and {b_name} {cols} columns; config says r={r}")
        magnitude = parts.get("lora_magnitude_vector")
        if config.use_dora and magnitude is None:
            problems.append(f"{module}: use_dora is set but the file has no lora_magnitude_vector")
        elif magnitude is not None and not config.use_dora:
            problems.append(f"{module}: has a DoRA lora_magnitude_vector but the config says use_dora=false")
    return problems
