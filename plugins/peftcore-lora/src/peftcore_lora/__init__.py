"""LoRA for peftcore. Importing this package registers nothing: the ``peftcore`` entry point does."""

from peftcore_lora.config import LoftQConfig, LoraConfig, LoraRuntimeConfig
from peftcore_lora.conversion import convert_to_lora, save_as_lora
from peftcore_lora.layer import Conv2d, Embedding, Linear, LoraLayer

__all__ = [
    "Conv2d", "Embedding", "Linear", "LoftQConfig", "LoraConfig", "LoraLayer", "LoraRuntimeConfig", "convert_to_lora",
    "save_as_lora",
]
