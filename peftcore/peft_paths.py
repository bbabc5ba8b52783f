"""Where PEFT's internal names that outside code imports live in peftcore.

Code written for PEFT reaches past its top-level API for a few names: the layer base class
(``isinstance(module, BaseTunerLayer)`` is how transformers, accelerate and user code find adapter
layers), ``_get_submodules``, the wrapper classes, some ``peft.utils`` functions. Each has an
equivalent under a peftcore name, listed here and, for readers, in docs/compatibility.md. A script
changes ``from peft.tuners.tuners_utils import BaseTunerLayer`` to ``from peftcore import AdapterLayer``;
tools that translate imports (the PEFT test-suite harness) read this table.
"""

from __future__ import annotations

import importlib


class NoCounterpart:
    """Stands for a PEFT class peftcore has no counterpart of: no peftcore object is an instance of it (so
    ``isinstance`` checks answer as they should), and making one is refused."""

    def __new__(cls, *args, **kwargs):
        raise TypeError(f"{cls.__name__}: peftcore has no counterpart of this PEFT class (see docs/compatibility.md)")


class TrainableTokensWrapper(NoCounterpart):
    """PEFT's wrapper for ``trainable_token_indices``, which peftcore-lora does not claim."""


class BufferDict(NoCounterpart):
    """PEFT's dict of buffers (VeRA, ...); no peftcore method keeps buffers per adapter."""


# PEFT path -> peftcore path ("module:attribute"; a plugin's names resolve through the ``peftcore`` package)
PEFT_PATHS: dict[str, str] = {
    "peft.tuners.tuners_utils.BaseTunerLayer": "peftcore:AdapterLayer",
    "peft.tuners.tuners_utils.BaseTuner": "peftcore:LayerTuner",
    "peft.utils._get_submodules": "peftcore.walking:get_submodules",
    "peft.utils.other._get_submodules": "peftcore.walking:get_submodules",
    "peft.utils.ModulesToSaveWrapper": "peftcore:ModulesToSaveWrapper",
    "peft.utils.other.ModulesToSaveWrapper": "peftcore:ModulesToSaveWrapper",
    # peftcore has one kind of auxiliary wrapper (no trainable-tokens wrapper): isinstance checks agree
    "peft.utils.AuxiliaryTrainingWrapper": "peftcore:ModulesToSaveWrapper",
    "peft.utils.other.AuxiliaryTrainingWrapper": "peftcore:ModulesToSaveWrapper",
    "peft.utils.other.prepare_model_for_kbit_training": "peftcore:prepare_model_for_kbit_training",
    "peft.utils.other.fsdp_auto_wrap_policy": "peftcore:fsdp_auto_wrap_policy",
    "peft.utils.other.cast_mixed_precision_params": "peftcore:cast_mixed_precision_params",
    "peft.utils.get_peft_model_state_dict": "peftcore:get_peft_model_state_dict",
    "peft.utils.set_peft_model_state_dict": "peftcore:set_peft_model_state_dict",
    "peft.utils.load_peft_weights": "peftcore:load_peft_weights",
    "peft.utils.save_and_load.get_peft_model_state_dict": "peftcore:get_peft_model_state_dict",
    "peft.utils.save_and_load.set_peft_model_state_dict": "peftcore:set_peft_model_state_dict",
    "peft.utils.save_and_load.load_peft_weights": "peftcore:load_peft_weights",
    "peft.utils.PeftType": "peftcore:PeftType",
    "peft.utils.TaskType": "peftcore:TaskType",
    "peft.utils.SAFETENSORS_WEIGHTS_NAME": "peftcore.files:SAFETENSORS_WEIGHTS_NAME",
    "peft.utils.WEIGHTS_NAME": "peftcore.files:PICKLE_WEIGHTS_NAME",
    "peft.utils.other.WEIGHTS_NAME": "peftcore.files:PICKLE_WEIGHTS_NAME",
    "peft.utils.CONFIG_NAME": "peftcore.files:CONFIG_NAME",
    "peft.utils.INCLUDE_LINEAR_LAYERS_SHORTHAND": "peftcore.matching:ALL_LINEAR",
    "peft.utils.error.PeftError": "peftcore:PeftError",
    "peft.utils.error.NoMatchingPeftModuleError": "peftcore:NoMatchingPeftModuleError",
    "peft.utils.warning.PeftWarning": "peftcore:PeftWarning",
    "peft.peft_model.PeftModel": "peftcore:PeftModel",
    "peft.config.PeftConfig": "peftcore:PeftConfig",
    "peft.config.PromptLearningConfig": "peftcore:PromptLearningConfig",
    "peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING": "peftcore:PEFT_TYPE_TO_CONFIG_MAPPING",
    "peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING": "peftcore:PEFT_TYPE_TO_TUNER_MAPPING",
    "peft.mapping.inject_adapter_in_model": "peftcore:inject_adapter_in_model",
    "peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING": "peftcore:PEFT_TYPE_TO_PREFIX_MAPPING",
    "peft.tuners.lora.LoraLayer": "peftcore:LoraLayer",
    "peft.tuners.lora.layer.LoraLayer": "peftcore:LoraLayer",
    "peft.tuners.lora.LoraModel": "peftcore:LoraModel",
    "peft.tuners.lora.model.LoraModel": "peftcore:LoraModel",
    "peft.tuners.lora.Linear": "peftcore_lora:Linear",
    "peft.tuners.lora.layer.Linear": "peftcore_lora:Linear",
    "peft.tuners.lora.Embedding": "peftcore_lora:Embedding",
    "peft.tuners.lora.layer.Embedding": "peftcore_lora:Embedding",
    "peft.tuners.lora.Conv2d": "peftcore_lora:Conv2d",
    "peft.tuners.lora.layer.Conv2d": "peftcore_lora:Conv2d",
    "peft.tuners.lora.config.LoraRuntimeConfig": "peftcore:LoraRuntimeConfig",
    "peft.tuners.lora.LoraRuntimeConfig": "peftcore:LoraRuntimeConfig",
    "peft.tuners.ia3.IA3Layer": "peftcore:IA3Layer",
    "peft.tuners.ia3.layer.IA3Layer": "peftcore:IA3Layer",
    "peft.tuners.ia3.IA3Model": "peftcore:IA3Model",
    "peft.tuners.adalora.AdaLoraLayer": "peftcore:AdaLoraLayer",
    "peft.tuners.adalora.layer.AdaLoraLayer": "peftcore:AdaLoraLayer",
    "peft.tuners.adalora.AdaLoraModel": "peftcore:AdaLoraModel",
    "peft.tuners.adalora.SVDLinear": "peftcore_adalora:SVDLinear",
    "peft.tuners.adalora.layer.SVDLinear": "peftcore_adalora:SVDLinear",
    "peft.tuners.adalora.RankAllocator": "peftcore_adalora:RankAllocator",
    "peft.tuners.adalora.layer.RankAllocator": "peftcore_adalora:RankAllocator",
    "peft.utils.TrainableTokensWrapper": "peftcore.peft_paths:TrainableTokensWrapper",
    "peft.utils.other.TrainableTokensWrapper": "peftcore.peft_paths:TrainableTokensWrapper",
    "peft.tuners._buffer_dict.BufferDict": "peftcore.peft_paths:BufferDict",
}


def peft_equivalent(peft_path: str):
    """The peftcore object for a PEFT path such as ``peft.tuners.tuners_utils.BaseTunerLayer``, or None when the
    table has none or the plugin that provides it is not installed."""
    target = PEFT_PATHS.get(peft_path)
    if target is None:
        return None
    module_name, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return None
