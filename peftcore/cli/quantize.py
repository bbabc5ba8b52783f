"""``peftcore apply --quantize 4bit|8bit``: the base loaded through bitsandbytes, as a QLoRA user loads it."""

from __future__ import annotations

import importlib.util

import torch

from peftcore.cli.errors import CliError


def loading_kwargs(kind: str | None, device: str) -> dict:
    """``from_pretrained`` keyword arguments for ``kind`` (None: full precision)."""
    if kind is None:
        return {}
    missing = [name for name in ("bitsandbytes", "peftcore_bnb") if importlib.util.find_spec(name) is None]
    if missing:
        raise CliError(f"--quantize {kind} needs {' and '.join(missing)}, which is not installed",
                       "pip install ./plugins/peftcore-bnb (it brings bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32  # CPU matmuls are fastest in fp32
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)}


def prepare(model, kind: str | None, gradient_checkpointing: bool):
    """PEFT's ``prepare_model_for_kbit_training`` for a quantized base; the model as it is otherwise."""
    if kind is None:
        return model
    from peftcore import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
