"""Helpers for plugin test suites: tiny transformers models built from configs (no downloads)."""

from __future__ import annotations

import torch


def tiny_model(arch: str):
    """Return (model, inputs) for a tiny model of architecture ``arch``, in eval mode."""
    import transformers as t

    torch.manual_seed(0)
    ids = torch.randint(3, 60, (2, 7))
    common = dict(vocab_size=64)
    if arch == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common))
    elif arch == "mistral":
        model = t.MistralForCausalLM(t.MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = t.Qwen2ForCausalLM(t.Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common))
    elif arch == "gemma":
        model = t.GemmaForCausalLM(t.GemmaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4, **common))
    elif arch == "gemma3":
        model = t.Gemma3ForCausalLM(t.Gemma3TextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4, **common))
    elif arch == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0, **common))
    elif arch == "opt":
        model = t.OPTForCausalLM(t.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32, **common))
    elif arch == "bert":
        model = t.BertForSequenceClassification(t.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **common))
    elif arch == "roberta":
        model = t.RobertaForSequenceClassification(t.RobertaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, pad_token_id=1, **common))
    elif arch == "distilbert":
        model = t.DistilBertForSequenceClassification(t.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, **common))
    elif arch == "t5":
        model = t.T5ForConditionalGeneration(t.T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **common))
        return model.eval(), dict(input_ids=ids, decoder_input_ids=ids[:, :5])
    elif arch == "bart":
        model = t.BartForConditionalGeneration(t.BartConfig(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, **common))
        return model.eval(), dict(input_ids=ids, decoder_input_ids=ids[:, :5])
    else:
        raise ValueError(arch)
    return model.eval(), dict(input_ids=ids)


TASK_TYPES = {"llama": "CAUSAL_LM", "mistral": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "gemma": "CAUSAL_LM", "gemma3": "CAUSAL_LM",
         "gpt2": "CAUSAL_LM", "opt": "CAUSAL_LM", "bert": "SEQ_CLS", "roberta": "SEQ_CLS", "distilbert": "SEQ_CLS",
         "t5": "SEQ_2_SEQ_LM", "bart": "SEQ_2_SEQ_LM"}
