"""peftcore: PEFT's API and file format on a small core with method plugins.

Config classes (``LoraConfig``, ``IA3Config``, ...) come from the installed
plugins; ``from peftcore import LoraConfig`` finds them by name.
"""

__version__ = "0.1.0"
HOOKSPEC_VERSION = 1

from peftcore.config import LayerConfig, PeftConfig, PeftType, TaskType  # noqa: E402
from peftcore.layer import AdapterLayer  # noqa: E402
from peftcore.method import LayerSupport, Method  # noqa: E402
from peftcore.model_adapter import ModelAdapter  # noqa: E402
from peftcore.modules_to_save import ModulesToSaveWrapper  # noqa: E402
from peftcore.peft_model import (  # noqa: E402
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from peftcore.plugins import hookimpl, register_plugin, unregister_plugin  # noqa: E402
from peftcore.serialization import AdapterFileError, get_peft_config  # noqa: E402
from peftcore.state_dict import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict  # noqa: E402
from peftcore.training import prepare_model_for_kbit_training  # noqa: E402


def __getattr__(name: str):
    """Resolve method exports (``LoraConfig``, ``LoraModel``...) from the installed plugins."""
    from peftcore.plugins import get_plugin_manager, methods, no_methods_hint

    for plugin in get_plugin_manager().get_plugins():
        exported = getattr(plugin, "__all__", ())
        if name in exported:
            return getattr(plugin, name)
    if name.endswith("Config") and name[:1].isupper():
        installed = ", ".join(m.config_class.__name__ for m in methods().values())
        hint = f"installed method configs: {installed}" if installed else no_methods_hint()
        raise ImportError(f"cannot import {name!r} from peftcore: no installed plugin provides it; {hint}")
    raise AttributeError(f"module 'peftcore' has no attribute {name!r}")


__all__ = [
    "AdapterFileError", "AdapterLayer", "LayerConfig", "LayerSupport", "Method", "ModelAdapter", "ModulesToSaveWrapper",
    "PeftConfig", "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftType",
    "TaskType", "get_peft_config", "get_peft_model", "get_peft_model_state_dict", "hookimpl", "load_peft_weights",
    "prepare_model_for_kbit_training", "register_plugin", "set_peft_model_state_dict", "unregister_plugin",
]
