"""P-tuning for peftcore. Importing this package registers nothing: the ``peftcore`` entry point does."""

from peftcore_p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftcore_p_tuning.model import PromptEncoder

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
