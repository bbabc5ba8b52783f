"""Tiny transformers models built from configs (no downloads), for the (IA)^3 tests."""

from __future__ import annotations

import torch

TASK_TYPES = {
    "bert": "SEQ_CLS",
    "gpt2": "CAUSAL_LM",
    "llama": "CAUSAL_LM",
    "mistral": "CAUSAL_LM",
    "t5": "SEQ_2_SEQ_LM",
}


def tiny_model(arch: str, seed: int = 0):
    """(model in eval mode, inputs). Same seed, same weights: build twice for peft and peftcore."""
    import transformers as t

    torch.manual_seed(seed)
    ids = torch.randint(3, 60, (3, 7))
    if arch == "bert":
        model = t.BertForSequenceClassification(
            t.BertConfig(
                vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
            )
        )
    elif arch == "gpt2":
        model = t.GPT2LMHeadModel(
            t.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
        )
    elif arch == "llama":
        model = t.LlamaForCausalLM(
            t.LlamaConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    elif arch == "mistral":
        model = t.MistralForCausalLM(
            t.MistralConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    elif arch == "t5":
        model = t.T5ForConditionalGeneration(
            t.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=8)
        )
        return model.eval(), dict(input_ids=ids, decoder_input_ids=ids[:, :5])
    else:
        raise ValueError(arch)
    return model.eval(), dict(input_ids=ids)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@torch.no_grad()
def randomize_vectors(model, low: float = 0.5, high: float = 1.5, seed: int = 1) -> None:
    """Move every (IA)^3 vector (and saved head copy) off its no-op init, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".ia3_l." in name:
            param.copy_(torch.rand(param.shape, generator=gen) * (high - low) + low)
        elif ".modules_to_save." in name:
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)
