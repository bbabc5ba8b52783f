"""The core's own hook implementations: PEFT's rules, registered last so plugins can answer first."""

from __future__ import annotations

import dataclasses

from peftcore import matching, serialization
from peftcore.plugins import get_method, hookimpl, hooks


@hookimpl(trylast=True)
def prepare_config(config, model):
    def default_targets(model_type):
        return hooks.default_target_modules(config=config, model_type=model_type)

    matching.resolve_targets(config, model, default_targets)


@hookimpl(trylast=True)
def is_target_module(config, module_name, module, model):
    return matching.matches_target(config, module_name)


@hookimpl(trylast=True)
def merge_layer(layer, adapter_names, safe_merge):
    layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
    return True


@hookimpl(trylast=True)
def unmerge_layer(layer):
    layer.unmerge()
    return True


@hookimpl(trylast=True)
def config_from_dict(data):
    return get_method(data["peft_type"]).config_class.from_dict(data)


@hookimpl(trylast=True)
def config_to_dict(config):
    # fields marked "runtime" (LoRA's runtime_config) describe this process, not the adapter: never written
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if not f.metadata.get("runtime")}


@hookimpl(trylast=True)
def adapter_state_dict(model, config, adapter_name):
    return serialization.default_adapter_state_dict(model, config, adapter_name)


@hookimpl(trylast=True)
def load_adapter_state_dict(model, config, adapter_name, state_dict):
    return serialization.default_load_adapter_state_dict(model, config, adapter_name, state_dict)
