"""A tiny Llama saved once, loaded quantized by transformers exactly as a user would (BitsAndBytesConfig)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

warnings.filterwarnings("ignore", message="MatMul8bitLt")

QUANT = {
    "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32),
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def load_quantized(tiny_llama_dir):
    def load(kind: str):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=QUANT[kind]())
        return model.eval()

    return load


@pytest.fixture
def tokens():
    return torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(1))
