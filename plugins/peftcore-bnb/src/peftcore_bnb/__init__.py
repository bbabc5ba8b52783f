"""bitsandbytes quantized base layers for peftcore's layer methods (QLoRA and LLM.int8)."""

from peftcore_bnb.quant import QuantizedLayerError

__all__ = ["QuantizedLayerError"]
