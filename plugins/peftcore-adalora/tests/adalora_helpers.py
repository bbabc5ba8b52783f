"""Tiny transformers models built from configs (no downloads), and a training loop, for the AdaLoRA tests."""

from __future__ import annotations

import torch

TASK_TYPES = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def tiny_model(arch: str, seed: int = 0):
    """(model in eval mode, inputs with labels). Dropout is off so train and eval passes compute the same function."""
    import transformers as t

    torch.manual_seed(seed)
    ids = torch.randint(3, 60, (4, 7))
    if arch == "bert":
        model = t.BertForSequenceClassification(t.BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        return model.eval(), dict(input_ids=ids, labels=torch.tensor([0, 1, 1, 0]))
    if arch == "gpt2":
        model = t.GPT2LMHeadModel(
            t.GPT2Config(
                vocab_size=64,
                n_embd=16,
                n_layer=2,
                n_head=2,
                n_positions=32,
                bos_token_id=0,
                eos_token_id=0,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
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
    elif arch == "t5":
        model = t.T5ForConditionalGeneration(
            t.T5Config(
                vocab_size=64,
                d_model=16,
                d_ff=32,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=2,
                d_kv=8,
                dropout_rate=0.0,
            )
        )
        return model.eval(), dict(input_ids=ids, decoder_input_ids=ids[:, :5], labels=ids[:, 1:6])
    else:
        raise ValueError(arch)
    return model.eval(), dict(input_ids=ids, labels=ids)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


@torch.no_grad()
def randomize_adapters(model, seed: int = 1) -> None:
    """Move every AdaLoRA triplet (E starts at 0) and saved head copy off its init, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def train_with_allocation(model, inputs, steps: int, lr: float = 1e-2, on_step=None) -> list[float]:
    """PEFT's documented loop: backward, step, update_and_allocate, zero_grad. Returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**inputs).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        if on_step is not None:
            on_step(step)
        optimizer.zero_grad()
    model.eval()
    return losses
