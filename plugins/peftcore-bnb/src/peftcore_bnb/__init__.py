"""bitsandbytes quantized base layers for peftcore's layer methods (QLoRA and LLM.int8)."""

from peftcore_bnb.loftq import replace_lora_weights_loftq
from peftcore_bnb.quant import QuantizedLayerError

__all__ = ["QuantizedLayerError", "replace_lora_weights_loftq"]
