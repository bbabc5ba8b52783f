"""The p-tuning plugin: what it registers with peftcore, through public hooks only."""

from __future__ import annotations

from peftcore import Method, hookimpl
from peftcore.prompt_learning import (
    check_prompt_embeddings,
    load_prompt_learning_state_dict,
    prompt_learning_state_dict,
    word_embeddings,
)

from peftcore_p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftcore_p_tuning.model import PromptEncoder

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]


@hookimpl
def register_methods(register):
    register(Method(peft_type="P_TUNING", name="p_tuning", config_class=PromptEncoderConfig, kind="model",
                    description="P-tuning: virtual tokens produced by an MLP or LSTM prompt encoder"))


@hookimpl
def create_model_adapter(model, config, adapter_name):
    if not isinstance(config, PromptEncoderConfig):
        return None
    config.fill_from_model_config(getattr(model, "config", None))
    return PromptEncoder(config).to(word_embeddings(model).weight.device)


@hookimpl
def adapter_state_dict(model, config, adapter_name):
    if not isinstance(config, PromptEncoderConfig):
        return None
    return prompt_learning_state_dict(model, adapter_name)


@hookimpl
def load_adapter_state_dict(model, config, adapter_name, state_dict):
    if not isinstance(config, PromptEncoderConfig):
        return None
    return load_prompt_learning_state_dict(model, adapter_name, state_dict)


@hookimpl
def check_adapter_files(config, tensors):
    if not isinstance(config, PromptEncoderConfig):
        return None
    return check_prompt_embeddings(config, tensors, config.token_dim)
