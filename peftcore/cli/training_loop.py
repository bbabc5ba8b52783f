"""A small training and evaluation loop for adapters (what ``peftcore apply`` runs).

Plain PyTorch on purpose: it is short enough to read, and the same model also
trains under transformers' ``Trainer`` (see :mod:`peftcore.integrations.trainer`).
Nothing here prints; progress is reported through the ``on_step`` callback.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from peftcore.cli import launch
from peftcore.cli.datasets import LabelledText, PromptCompletions
from peftcore.loop_hooks import optimizer_step_done

IGNORE_INDEX = -100  # label value that cross-entropy skips (transformers' convention)


@dataclass
class TrainSettings:
    epochs: float = 2
    learning_rate: float = 1e-3
    batch_size: int = 16
    max_length: int = 128
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    seed: int = 0


# -- batches ---------------------------------------------------------------------------


def classification_examples(tokenizer, data: LabelledText, max_length: int) -> list[dict]:
    encoded = tokenizer(list(data.texts), truncation=True, max_length=max_length)
    return [{**{k: v[i] for k, v in encoded.items()}, "labels": label} for i, label in enumerate(data.labels)]


def prompt_completion_examples(tokenizer, data: PromptCompletions, max_length: int) -> list[dict]:
    """Token ids of prompt + completion + EOS, with the prompt's positions masked out of the loss.

    Prompt and completion are tokenized separately so the boundary is exact;
    truncation cuts the prompt's start first, keeping what the model must write.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for prompt, completion in zip(data.prompts, data.completions):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else _bos(tokenizer)
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        completion_ids = completion_ids[:max_length]
        prompt_ids = prompt_ids[-(max_length - len(completion_ids)):] if max_length > len(completion_ids) else []
        examples.append({"input_ids": prompt_ids + completion_ids,
                         "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids})
    return examples


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def pad_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every field to the longest example; labels pad with IGNORE_INDEX, masks with 0."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {}
    for key in examples[0]:
        if not isinstance(examples[0][key], list):
            batch[key] = torch.tensor([e[key] for e in examples])
            continue
        fill = IGNORE_INDEX if key == "labels" else (pad_token_id if key == "input_ids" else 0)
        batch[key] = torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in examples])
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
        )
    return batch


def batches(examples: list[dict], batch_size: int, pad_token_id: int, order: list[int] | None = None) -> list[dict]:
    order = list(range(len(examples))) if order is None else order
    return [
        pad_batch([examples[i] for i in order[s : s + batch_size]], pad_token_id)
        for s in range(0, len(order), batch_size)
    ]


def length_grouped_order(examples: list[dict], batch_size: int, seed: int) -> list[int]:
    """A shuffled order whose batches hold examples of similar length (less padding, same randomness).

    Shuffle, sort within windows of 16 batches by length, then shuffle the batches.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 16
    grouped = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start:start + window], key=lambda i: len(examples[i]["input_ids"]))
    chunks = [grouped[s:s + batch_size] for s in range(0, len(grouped), batch_size)]
    rng.shuffle(chunks)
    return [i for chunk in chunks for i in chunk]


def _by_length(examples: list[dict]) -> list[int]:
    return sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))


def _unsort(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    out = torch.empty_like(values)
    out[torch.tensor(order)] = values
    return out


# -- training ------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (adapter loaded with is_trainable=False?)")
    return params


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)


def total_steps(n_examples: int, settings: TrainSettings) -> int:
    return max(1, math.ceil(steps_per_epoch(n_examples, settings.batch_size) * settings.epochs))


def fit(model: nn.Module, examples: list[dict], pad_token_id: int, settings: TrainSettings,
        on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW with linear warm-up and decay over ``settings.epochs`` (fractional epochs allowed); returns step losses."""
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps = total_steps(len(examples), settings)
    warmup = int(steps * settings.warmup_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    torch.manual_seed(settings.seed)  # dropout masks
    model.train()
    rank, world = launch.rank(), launch.world_size()
    # several processes (peftcore apply --nproc-per-node): DDP, each rank taking its share of every batch
    runner = model if world == 1 else nn.parallel.DistributedDataParallel(model)
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        order = length_grouped_order(examples, settings.batch_size, settings.seed + epoch)
        for batch in batches(examples, settings.batch_size, pad_token_id, order):
            if world > 1:
                batch = {k: v.tensor_split(world)[rank] for k, v in batch.items()}
            loss = runner(**to_device(batch, model)).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {len(losses) + 1}; lower --lr")
            loss.backward()
            optimizer.step()
            optimizer_step_done(model, len(losses))  # while the gradients are still there (AdaLoRA scores them)
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(_mean_over_ranks(loss.detach(), world))
            if on_step is not None:
                on_step(len(losses), losses[-1])
            if len(losses) == steps:
                break
        epoch += 1
    model.eval()
    return losses


def _mean_over_ranks(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return loss.item()


# -- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def predict_logits(model: nn.Module, examples: list[dict], batch_size: int, pad_token_id: int) -> torch.Tensor:
    """Output logits of a sequence classifier, one row per example in the given order."""
    model.eval()
    order = _by_length(examples)
    outputs = []
    for batch in batches(examples, batch_size, pad_token_id, order):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs.append(model(**to_device(inputs, model)).logits.float().cpu())
    return _unsort(torch.cat(outputs), order)


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()


@torch.no_grad()
def completion_nll(model: nn.Module, examples: list[dict], batch_size: int, pad_token_id: int) -> torch.Tensor:
    """Per-example summed negative log-likelihood of the completion tokens (labels != IGNORE_INDEX).

    ``model.token_nll`` computes it chunk by chunk from the final hidden states: no
    (batch, seq, vocabulary) logits, so long sequences evaluate in the memory they train in.
    """
    model.eval()
    order = _by_length(examples)
    out = []
    for batch in batches(examples, batch_size, pad_token_id, order):
        out.append(model.token_nll(**to_device(batch, model)).float().cpu().sum(-1))
    return _unsort(torch.cat(out), order)


def mean_token_loss(model: nn.Module, tokenizer, data: PromptCompletions, settings: TrainSettings) -> float:
    """Held-out loss per completion token (the quantity training minimises)."""
    examples = prompt_completion_examples(tokenizer, data, settings.max_length)
    n_tokens = sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples)
    nll = completion_nll(model, examples, settings.batch_size, pad_id(tokenizer))
    return nll.sum().item() / max(1, n_tokens)


def choice_accuracy(model: nn.Module, tokenizer, data: PromptCompletions, settings: TrainSettings) -> float | None:
    """When completions come from a small label set: how often the right one is the most likely.

    Scores every candidate completion after each prompt (EOS included, as trained)
    and counts the argmax; None when the completions are free text.
    """
    candidates = sorted(set(data.completions))
    if not 2 <= len(candidates) <= 10:
        return None
    expanded = PromptCompletions(
        [p for p in data.prompts for _ in candidates],
        [c for _ in data.prompts for c in candidates],
        data.name,
        data.source,
    )
    examples = prompt_completion_examples(tokenizer, expanded, settings.max_length)
    nll = completion_nll(model, examples, settings.batch_size, pad_id(tokenizer)).view(len(data), len(candidates))
    truth = torch.tensor([candidates.index(c) for c in data.completions])
    return (nll.argmin(-1) == truth).float().mean().item()


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    model.eval()
    encoded = to_device(dict(tokenizer(prompt, return_tensors="pt")), model)
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tokenizer))
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def to_device(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
