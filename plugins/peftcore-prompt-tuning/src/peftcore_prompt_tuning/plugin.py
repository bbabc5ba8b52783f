"""The prompt-tuning plugin: what it registers with peftcore, through public hooks only."""

from __future__ import annotations

from peftcore import Method, hookimpl
from peftcore.prompt_learning import (
    check_prompt_embeddings,
    load_prompt_learning_state_dict,
    prompt_learning_state_dict,
    word_embeddings,
)

from peftcore_prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from peftcore_prompt_tuning.model import PromptEmbedding

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]


@hookimpl
def register_methods(register):
    register(Method(peft_type="PROMPT_TUNING", name="prompt_tuning", config_class=PromptTuningConfig, kind="model",
                    description="Soft prompt: learned virtual-token embeddings prepended to the input"))


@hookimpl
def create_model_adapter(model, config, adapter_name):
    if not isinstance(config, PromptTuningConfig):
        return None
    config.fill_from_model_config(getattr(model, "config", None))
    embeddings = word_embeddings(model)
    return PromptEmbedding(config, embeddings).to(embeddings.weight.device)


@hookimpl
def adapter_state_dict(model, config, adapter_name):
    if not isinstance(config, PromptTuningConfig):
        return None
    return prompt_learning_state_dict(model, adapter_name)


@hookimpl
def load_adapter_state_dict(model, config, adapter_name, state_dict):
    if not isinstance(config, PromptTuningConfig):
        return None
    return load_prompt_learning_state_dict(model, adapter_name, state_dict)


@hookimpl
def check_adapter_files(config, tensors):
    if not isinstance(config, PromptTuningConfig):
        return None
    return check_prompt_embeddings(config, tensors, config.token_dim)
