"""The bitsandbytes plugin: layer support for methods it does not own, through public hooks only.

For every installed method that wraps ``nn.Linear`` (LoRA, IA3, AdaLoRA) it registers
that method's layer class, with quantised storage (:mod:`peftcore_bnb.layers`), for
``bnb.nn.Linear4bit`` and ``bnb.nn.Linear8bitLt``. Those are ``nn.Linear`` subclasses,
so they are matched first (the closest class wins). The methods never import bitsandbytes.
It also provides ``peftcore.replace_lora_weights_loftq`` (:mod:`peftcore_bnb.loftq`).
"""

from __future__ import annotations

import importlib

import bitsandbytes as bnb

from peftcore import LayerSupport, hookimpl

from peftcore_bnb import quant
from peftcore_bnb.layers import QuantizedBase, QuantizedLoraMixin, quantized_class
from peftcore_bnb.loftq import replace_lora_weights_loftq

#: what ``peftcore.<name>`` finds here (peftcore's ``__getattr__`` reads the plugins' ``__all__``)
__all__ = ["replace_lora_weights_loftq"]

# (peft_type, module, class name, mixin): the method layer classes that get a quantised twin
_METHOD_LAYERS = (
    ("LORA", "peftcore_lora.layer", "Linear", QuantizedLoraMixin),
    ("IA3", "peftcore_ia3.layer", "Linear", QuantizedBase),
    ("ADALORA", "peftcore_adalora.layer", "SVDLinear", QuantizedBase),
)
_BASES = ((bnb.nn.Linear4bit, "4bit"), (bnb.nn.Linear8bitLt, "8bitLt"))
_classes: dict[tuple[str, str], type] = {}


def quantized_layer_class(peft_type: str, suffix: str, method_class: type, mixin: type) -> type:
    key = (peft_type, suffix)
    if key not in _classes:  # one class per pair, so isinstance and pickling see the same type
        _classes[key] = quantized_class(method_class, suffix, mixin)
    return _classes[key]


@hookimpl
def register_layer_support(register):
    for peft_type, module_name, class_name, mixin in _METHOD_LAYERS:
        try:
            method_class = getattr(importlib.import_module(module_name), class_name)
        except ImportError:
            continue  # that method's plugin is not installed
        for base_type, suffix in _BASES:
            register(LayerSupport(peft_type, base_type, quantized_layer_class(peft_type, suffix, method_class, mixin)))


@hookimpl
def adapter_injected(model, config, adapter_name):
    """Every 4-bit layer of the model (wrapped or not: gradients flow through all) keeps its standard layout
    for training and saving (see :func:`peftcore_bnb.quant.keep_trainable_layout`)."""
    if model.__dict__.get("_peftcore_bnb_checked"):
        return  # the base layers do not change between adapters: one walk per model keeps add_adapter flat
    model._peftcore_bnb_checked = True
    for module in model.model.modules():
        if quant.is_4bit(module) and not getattr(module, "_peftcore_bnb_layout_hook", False):
            module.register_forward_pre_hook(quant.keep_trainable_layout)
            module.register_state_dict_pre_hook(quant.standard_layout_for_saving)
            module._peftcore_bnb_layout_hook = True


@hookimpl
def merge_layer(layer, adapter_names, safe_merge):
    if not isinstance(layer, QuantizedBase):
        return None
    layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
    return True


@hookimpl
def unmerge_layer(layer):
    if not isinstance(layer, QuantizedBase):
        return None
    if layer.merged:
        layer.unmerge()
    return True


@hookimpl
def dequantize_module(module, dtype):
    if not (quant.is_4bit(module) or quant.is_8bit(module)):
        return None
    return quant.dequantized_linear(module, dtype, type(module).__name__)


@hookimpl
def describe_quantization(module):
    if not (quant.is_4bit(module) or quant.is_8bit(module)):
        return None
    return quant.describe(module)
