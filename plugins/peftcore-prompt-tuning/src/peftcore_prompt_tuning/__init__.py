"""Prompt tuning for peftcore. Importing this package registers nothing: the ``peftcore`` entry point does."""

from peftcore_prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from peftcore_prompt_tuning.model import PromptEmbedding

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]
