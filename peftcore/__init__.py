"""peftcore: PEFT's API and file format on a small core with method plugins.

Config classes (``LoraConfig``, ``IA3Config``, ...) come from the installed
plugins; ``from peftcore import LoraConfig`` finds them by name.
"""

import dis
import sys
import warnings

from peftcore.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from peftcore.config import LayerConfig, PeftConfig, PeftType, TaskType, get_peft_config
from peftcore.distributed import fsdp_auto_wrap_policy
from peftcore.errors import NoMatchingPeftModuleError, PeftError, PeftWarning
from peftcore.files import AdapterFileError
from peftcore.input_adapter import InputAdapter
from peftcore.layer import BASE_ADAPTER, AdapterLayer
from peftcore.layer_tuner import LayerTuner
from peftcore.mapping import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    inject_adapter_in_model,
)
from peftcore.method import LayerSupport, Method
from peftcore.modules_to_save import ModulesToSaveWrapper
from peftcore.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from peftcore.plugins import hookimpl, register_plugin, unregister_plugin
from peftcore.preparation import cast_mixed_precision_params, prepare_model_for_kbit_training
from peftcore.prompt_learning import PromptLearningConfig
from peftcore.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from peftcore.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from peftcore.version import HOOKSPEC_VERSION, __version__

# Names of hookspec version 1, kept for plugins written against it.
_RENAMED = {"ModelAdapter": InputAdapter}
# PEFT's top-level names that an optional plugin provides (through its ``__all__``), and which one: asking for
# one without that plugin says what to install.
_PLUGIN_NAMES = {"replace_lora_weights_loftq": "peftcore-bnb"}


def __getattr__(name: str):
    """Resolve method exports (``LoraConfig``, ``LoraModel``...) from the installed plugins."""
    from peftcore.plugins import get_plugin_manager, methods, no_methods_hint

    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"peftcore.{name} is now peftcore.{new.__name__}", DeprecationWarning, stacklevel=2)
        return new
    for plugin in get_plugin_manager().get_plugins():
        exported = getattr(plugin, "__all__", ())
        if name in exported:
            return getattr(plugin, name)
    if name in _PLUGIN_NAMES:
        message = (f"peftcore.{name} is provided by the {_PLUGIN_NAMES[name]} plugin, which is not installed "
                   f"(pip install {_PLUGIN_NAMES[name]})")
        if _called_by_from_import():
            raise ImportError(message)
        raise AttributeError(message)
    if name.endswith("Config") and name[:1].isupper():
        installed = ", ".join(m.config_class.__name__ for m in methods().values())
        hint = f"installed method configs: {installed}" if installed else no_methods_hint()
        message = f"cannot import {name!r} from peftcore: no installed plugin provides it; {hint}"
        if _called_by_from_import():
            raise ImportError(message)
        raise AttributeError(message)  # hasattr(peftcore, "LoHaConfig") is False, as code probing for methods expects
    raise AttributeError(f"module 'peftcore' has no attribute {name!r}")


def _called_by_from_import() -> bool:
    """Whether ``from peftcore import X`` asked: Python would replace an AttributeError's hint with a bare message."""
    try:
        frame = sys._getframe(2)
        return frame.f_code.co_code[frame.f_lasti] == dis.opmap["IMPORT_FROM"]
    except (AttributeError, IndexError, KeyError, ValueError):
        return False


__all__ = [
    "AdapterFileError", "AdapterLayer", "AutoPeftModel", "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction", "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification", "BASE_ADAPTER", "HOOKSPEC_VERSION",
    "InputAdapter", "LayerConfig", "LayerSupport", "LayerTuner", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "Method",
    "ModulesToSaveWrapper", "NoMatchingPeftModuleError", "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING", "PeftConfig", "PeftError", "PeftModel", "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftType", "PeftWarning",
    "PromptLearningConfig", "TaskType", "TunerLayerStatus", "TunerModelStatus", "__version__",
    "cast_mixed_precision_params", "fsdp_auto_wrap_policy", "get_base_model_state_dict", "get_layer_status",
    "get_model_status", "get_peft_config", "get_peft_model", "get_peft_model_state_dict", "hookimpl",
    "inject_adapter_in_model", "load_peft_weights", "prepare_model_for_kbit_training", "register_plugin",
    "set_base_model_state_dict", "set_peft_model_state_dict", "unregister_plugin"
]
