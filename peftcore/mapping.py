"""PEFT's lookup tables and ``inject_adapter_in_model``, answered by the installed plugins.

The tables are live views: a plugin registered after import (``register_plugin``) shows up in
them, and one unregistered disappears. Keys are ``PeftType`` members where PEFT has one (they
are also plain strings, so ``PEFT_TYPE_TO_CONFIG_MAPPING["LORA"]`` works) and the plugin's own
``peft_type`` string otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Callable

from torch import nn

from peftcore.config import PeftConfig, PeftType
from peftcore.plugins import method_for_config, methods


def _key(peft_type: str) -> str:
    return PeftType(peft_type) if peft_type in PeftType._value2member_map_ else peft_type


class _PluginTable(Mapping):
    """A read-only mapping recomputed from the plugin registry on every access (it is small)."""

    def __init__(self, build: Callable[[], dict[str, Any]], name: str):
        self._build, self._name = build, name

    def __getitem__(self, key: str) -> Any:
        table = self._build()
        if key not in table:
            raise KeyError(f"{self._name}: no installed plugin provides {key!r}; installed: {sorted(table)}")
        return table[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return f"{self._name}({self._build()!r})"


def _tuner_class(method):
    from peftcore.layer_tuner import LayerTuner

    return method.tuner_class or LayerTuner


PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[str, type[PeftConfig]] = _PluginTable(
    lambda: {_key(m.peft_type): m.config_class for m in methods().values()}, "PEFT_TYPE_TO_CONFIG_MAPPING"
)
PEFT_TYPE_TO_TUNER_MAPPING: Mapping[str, type] = _PluginTable(
    lambda: {_key(m.peft_type): _tuner_class(m) for m in methods().values() if m.kind == "layer"},
    "PEFT_TYPE_TO_TUNER_MAPPING",
)
PEFT_TYPE_TO_PREFIX_MAPPING: Mapping[str, str] = _PluginTable(
    lambda: {_key(m.peft_type): m.tensor_prefixes[0] for m in methods().values() if m.tensor_prefixes},
    "PEFT_TYPE_TO_PREFIX_MAPPING",
)


def _task_models() -> dict[str, type]:
    from peftcore.peft_model import TASK_MODELS

    return dict(TASK_MODELS)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: Mapping[str, type] = _PluginTable(_task_models, "MODEL_TYPE_TO_PEFT_MODEL_MAPPING")


def inject_adapter_in_model(
    peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
    state_dict: dict | None = None,
) -> nn.Module:
    """Wrap ``model``'s target modules with the adapter's layers in place and return ``model`` itself (no
    ``PeftModel`` around it), as PEFT does. With ``state_dict``, the modules to wrap are those it has tensors for
    (its values are not loaded: use ``set_peft_model_state_dict``). Prompt-learning methods edit the inputs, not
    the layers, and need ``get_peft_model``."""
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"inject_adapter_in_model: peft_config must be a peftcore config, got "
                        f"{type(peft_config).__name__}")
    method = method_for_config(peft_config)
    if method.kind != "layer":
        raise ValueError(f"inject_adapter_in_model does not support {peft_config.peft_type}: prompt-learning "
                         "methods change the model's inputs, not its layers; use get_peft_model")
    tuner = _tuner_class(method)(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                                 state_dict=state_dict)
    # PEFT's low-level API: get/set_peft_model_state_dict(model) find the adapter's config here
    model.peft_config = {**getattr(model, "peft_config", {}), **tuner.peft_config}
    return tuner.model
