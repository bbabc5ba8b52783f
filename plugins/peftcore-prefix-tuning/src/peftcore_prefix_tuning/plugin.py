"""The prefix-tuning plugin: what it registers with peftcore, through public hooks only."""

from __future__ import annotations

from peftcore import Method, hookimpl
from peftcore.prompt_learning import (
    check_prompt_embeddings,
    load_prompt_learning_state_dict,
    prompt_learning_state_dict,
    word_embeddings,
)

from peftcore_prefix_tuning.config import PrefixTuningConfig
from peftcore_prefix_tuning.model import GRADIENT_CHECKPOINTING_ERROR, PrefixEncoder, uses_gradient_checkpointing

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]


@hookimpl
def register_methods(register):
    register(Method(peft_type="PREFIX_TUNING", name="prefix_tuning", config_class=PrefixTuningConfig, kind="model",
                    description="Prefix tuning: learned key/value prefixes for every attention layer"))


@hookimpl
def create_model_adapter(model, config, adapter_name):
    if not isinstance(config, PrefixTuningConfig):
        return None
    if uses_gradient_checkpointing(model):
        raise ValueError(GRADIENT_CHECKPOINTING_ERROR)
    config.fill_from_model_config(getattr(model, "config", None))
    return PrefixEncoder(config).to(word_embeddings(model).weight.device)


@hookimpl
def adapter_state_dict(model, config, adapter_name):
    if not isinstance(config, PrefixTuningConfig):
        return None
    return prompt_learning_state_dict(model, adapter_name)


@hookimpl
def load_adapter_state_dict(model, config, adapter_name, state_dict):
    if not isinstance(config, PrefixTuningConfig):
        return None
    return load_prompt_learning_state_dict(model, adapter_name, state_dict)


@hookimpl
def check_adapter_files(config, tensors):
    if not isinstance(config, PrefixTuningConfig):
        return None
    return check_prompt_embeddings(
        config,
        tensors,
        None if None in (config.num_layers, config.token_dim) else config.num_layers * 2 * config.token_dim,
    )
