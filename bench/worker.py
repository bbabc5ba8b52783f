"""One measurement in a fresh process: ``python bench/worker.py WORKLOAD LIB [options]``.

Prints one JSON line: ``{"workload", "lib", "times": [seconds...], "values": {...}}``,
and for the timed workloads of an adapter library also ``"base_times"``: the frozen
base model run alternately in the same process. LIB is ``base`` (the frozen model
only), ``peft``, ``peftcore``, or ``peftcore-plain`` (peftcore with its fast paths
switched off, for comparison). ``bench/run.py`` starts these; run one by hand to
debug a workload.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def _lib(lib: str) -> str:
    if lib == "peftcore-plain":
        os.environ["PEFTCORE_LORA_FAST"] = "0"
        return "peftcore"
    return lib


def _wrap(model, lib: str, adapter_name: str = "default", **overrides):
    _, get_peft_model, _ = common.library(lib)
    return get_peft_model(model, common.lora_config(lib, **overrides), adapter_name=adapter_name)


# -- timed workloads: the library's model against a frozen base copy in the same process --
#
# Two processes running the same code can differ by 20% on a shared VM (where their
# memory landed, what the neighbours do), more than the effects measured here. So
# every process also loads the base model and alternates base and adapted runs
# (A B B A ...): the per-pair ratio cancels whatever is particular to the process.


def _optimizer(params):
    """AdamW as transformers' Trainer uses it by default (``adamw_torch_fused`` with torch >= 2.8)."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, ValueError):  # a build without the fused kernel for this device
        return torch.optim.AdamW(params, lr=1e-4)


def _base_train_step():
    model = common.load_model()
    ids = common.batch(*common.TRAIN_BATCH)
    model.requires_grad_(False)
    # a frozen model's backward is empty unless the embeddings' output needs a gradient
    model.enable_input_require_grads()
    model.train()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def _train_step(lib: str, dropout: float):
    """A closure running one step: forward + backward (+ AdamW for adapters)."""
    if lib == "base":
        return _base_train_step()
    ids = common.batch(*common.TRAIN_BATCH)
    peft_model = _wrap(common.load_model(), _lib(lib), lora_dropout=dropout)
    common.randomize_lora_B(peft_model)
    peft_model.train()
    optimizer = _optimizer([p for p in peft_model.parameters() if p.requires_grad])

    def step():
        optimizer.zero_grad(set_to_none=True)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def _paired(run, base_run, warmup: int, reps: int) -> dict:
    """Times of ``run`` and of ``base_run``, alternated A B B A so neither always goes first."""
    if base_run is None:
        return {"times": common.repeat(run, warmup, reps)}
    for _ in range(warmup):
        base_run()
        run()
    times, base_times = [], []
    for i in range(reps):
        pair = (run, base_run) if i % 2 == 0 else (base_run, run)
        for fn in pair:
            (times if fn is run else base_times).append(common.timed(fn))
    return {"times": times, "base_times": base_times}


def train(args) -> dict:
    base = None if args.lib == "base" else _base_train_step()
    return _paired(_train_step(args.lib, args.dropout), base, args.warmup, args.reps)


def _peak_above_loaded(step) -> dict:
    """Peak RSS of two calls of ``step`` above the RSS before them (what is loaded already)."""
    gc.collect()
    common.reset_peak_rss()
    before = common.rss_mib()
    step()
    step()
    return {"times": [], "values": {"peak_above_loaded_mib": common.peak_rss_mib() - before, "loaded_mib": before}}


def train_mem(args) -> dict:
    """Peak RSS of two steps above the loaded model (adapters and optimizer object included).

    Memory needs a process of its own: the base model is not loaded beside it.
    """
    return _peak_above_loaded(_train_step(args.lib, args.dropout))


def long(args) -> dict:
    """Batch 1 x ``args.tokens``: peak RSS above the loaded model over every step, times of all but the first.

    The first step is the warm-up (the optimizer allocates its state there); the
    peak covers it and the ``args.reps`` timed steps after it, so at least two steps.
    """
    lib = _lib(args.lib)
    peft_model = _wrap(common.load_model(), lib)
    common.randomize_lora_B(peft_model)
    if args.checkpointing:  # the same call and settings for both libraries
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    optimizer = _optimizer([p for p in peft_model.parameters() if p.requires_grad])
    ids = common.batch(1, args.tokens)

    def step():
        optimizer.zero_grad(set_to_none=True)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    gc.collect()
    common.reset_peak_rss()
    before = common.rss_mib()
    step()
    walls, cpus = [], []
    for _ in range(args.reps):
        wall, cpu = common.timed_both(step)
        walls.append(wall)
        cpus.append(cpu)
    values = {"peak_above_loaded_mib": common.peak_rss_mib() - before, "loaded_mib": before, "cpu_times": cpus}
    return {"times": walls, "values": values}


def apply_cli(args) -> dict:
    """``peftcore apply lora`` on SmolLM2 with examples of ``args.tokens`` tokens: the process's peak RSS.

    The texts are movie-review snippets joined into documents longer than
    ``args.tokens`` tokens, so every training and held-out example is cut to exactly that.
    """
    from peftcore.cli import datasets, main
    from peftcore.cli.models import load_tokenizer

    snippets = datasets.load_dataset("movie-sentiment").texts
    per_document = 2 * args.tokens // 10  # snippets average ~25 tokens: twice the length needed
    documents = [" ".join(snippets[i * per_document:(i + 1) * per_document]) for i in range(3)]
    tokenizer = load_tokenizer(common.model_dir())
    shortest = min(len(tokenizer(d)["input_ids"]) for d in documents)
    if shortest <= args.tokens:
        raise RuntimeError(f"the generated documents have {shortest} tokens, fewer than {args.tokens}")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "long.jsonl")
        with open(data, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": d}) + "\n" for d in documents)
        command = ["apply", "lora", "--model", "smollm2", "--dataset", data, "--max-length", str(args.tokens),
                   "--batch-size", "1", "--n-train", "2", "--n-test", "1", "--epochs", "1", "--r", str(common.RANK),
                   "--alpha", str(common.ALPHA), "--dropout", "0", "--target", "all-linear", "--out",
                   os.path.join(tmp, "adapter")]
        if args.checkpointing:
            command.append("--gradient-checkpointing")
        wall = common.timed(lambda: main(command, standalone_mode=False))
    shown = ["long.jsonl" if part == data else part for part in command[:-1]]  # no temp paths in the report
    values = {"peak_total_mib": common.peak_rss_mib(), "command": "peftcore " + " ".join(shown) + " DIR"}
    return {"times": [wall], "values": values}


# -- QLoRA: SmolLM2 loaded 4-bit (NF4, double quant), real text --------------------------
#
# Both libraries get the same model, batch, LoRA config and optimizer; each runs its own
# prepare_model_for_kbit_training. Without gradient checkpointing peft's does not make the
# embeddings' output require grad and peftcore's does: enable_input_require_grads() is called
# for every model, so the backward does the same work in both.


def _kbit_prepared(lib: str):
    if lib == "peft":
        from peft import prepare_model_for_kbit_training
    else:
        from peftcore import prepare_model_for_kbit_training
    model = prepare_model_for_kbit_training(common.load_4bit_model(), use_gradient_checkpointing=False)
    model.enable_input_require_grads()
    return model


def _qlora_base_step(lib: str):
    """The frozen 4-bit model (prepared by ``lib``): forward + backward with gradients through the network."""
    model = _kbit_prepared(lib)
    ids = common.text_batch(*common.TRAIN_BATCH)
    model.train()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def _qlora_step(lib: str):
    if lib == "base":
        return _qlora_base_step("peftcore")
    lib = _lib(lib)
    _, get_peft_model, _ = common.library(lib)
    peft_model = get_peft_model(_kbit_prepared(lib), common.qlora_config(lib))
    common.randomize_lora_B(peft_model)
    peft_model.train()
    optimizer = _optimizer([p for p in peft_model.parameters() if p.requires_grad])
    ids = common.text_batch(*common.TRAIN_BATCH)

    def step():
        optimizer.zero_grad(set_to_none=True)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def qlora(args) -> dict:
    base = None if args.lib == "base" else _qlora_base_step(_lib(args.lib))
    return _paired(_qlora_step(args.lib), base, args.warmup, args.reps)


def qlora_mem(args) -> dict:
    """Peak RSS of two QLoRA steps above the loaded 4-bit model (adapters and optimizer object included)."""
    return _peak_above_loaded(_qlora_step(args.lib))


def qlora_size(args) -> dict:
    """Bytes of the fp32 model and of the 4-bit model (parameters, buffers, quantisation state), both loaded here."""
    fp32 = common.tensor_bytes(common.load_model())
    gc.collect()
    four = common.tensor_bytes(common.load_4bit_model())
    return {"times": [], "values": {"fp32": fp32, "4bit": four}}


# -- inference ----------------------------------------------------------------------


def _forward(model, ids, **kwargs):
    import torch

    def run():
        with torch.no_grad():
            model(input_ids=ids, **kwargs)

    return run


def _base_forward(ids):
    model = common.load_model()
    model.eval()
    return _forward(model, ids)


def infer(args) -> dict:
    ids = common.batch(*common.INFER_BATCH)
    if args.lib == "base":
        return _paired(_base_forward(ids), None, args.warmup, args.reps)
    model = _wrap(common.load_model(), _lib(args.lib))
    common.randomize_lora_B(model)
    model.eval()
    if args.merged:
        model.merge_adapter()
    return _paired(_forward(model, ids), _base_forward(ids), args.warmup, args.reps)


def mixed(args) -> dict:
    """One adapter per row, ``args.k`` different adapters in the batch."""
    rows, tokens = common.INFER_BATCH
    ids = common.batch(rows, tokens)
    if args.lib == "base":
        return _paired(_base_forward(ids), None, args.warmup, args.reps)
    lib = _lib(args.lib)
    peft_model = _wrap(common.load_model(), lib, adapter_name="a0")
    for i in range(1, args.k):
        peft_model.add_adapter(f"a{i}", common.lora_config(lib))
    common.randomize_lora_B(peft_model)
    peft_model.eval()
    names = [f"a{row % args.k}" for row in range(rows)]
    return _paired(_forward(peft_model, ids, adapter_names=names), _base_forward(ids), args.warmup, args.reps)


# -- attaching, loading, swapping, merging -------------------------------------------------


def ops(args) -> dict:
    """Seconds per operation; each repetition starts from a freshly loaded base model."""
    lib = _lib(args.lib)
    _, get_peft_model, PeftModel = common.library(lib)
    ops_ = ("attach", "load", "hotswap", "merge_and_unload", "add_2nd", "add_16th")
    results: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in ops_}

    def record(op: str, fn) -> None:
        wall, cpu = common.timed_both(fn)
        results[op]["wall"].append(wall)
        results[op]["cpu"].append(cpu)

    with tempfile.TemporaryDirectory() as tmp:
        seed_model = _wrap(common.load_model(), lib)  # warm-up: first-use imports are not the operation's cost
        common.randomize_lora_B(seed_model)
        seed_model.save_pretrained(tmp)
        del seed_model
        for rep in range(args.reps):
            gc.collect()
            model = common.load_model()
            config = common.lora_config(lib)
            record("attach", lambda model=model, config=config: get_peft_model(model, config))
            del model
            gc.collect()
            model = common.load_model()
            holder = {}
            record(
                "load", lambda holder=holder, model=model: holder.setdefault("m", PeftModel.from_pretrained(model, tmp))
            )
            loaded = holder["m"]

            def hotswap(loaded=loaded):
                loaded.load_adapter(tmp, adapter_name="second")
                loaded.set_adapter("second")

            record("hotswap", hotswap)
            del loaded, holder, model
            gc.collect()
            peft_model = _wrap(common.load_model(), lib)
            record("merge_and_unload", peft_model.merge_and_unload)
            del peft_model
            gc.collect()
            peft_model = _wrap(common.load_model(), lib)
            for i in range(2, 17):
                config = common.lora_config(lib)
                wall, cpu = common.timed_both(
                    lambda peft_model=peft_model, i=i, config=config: peft_model.add_adapter(f"a{i}", config)
                )
                if i in (2, 16):
                    op = "add_2nd" if i == 2 else "add_16th"
                    results[op]["wall"].append(wall)
                    results[op]["cpu"].append(cpu)
            del peft_model
    return {"times": [], "values": results}


WORKLOADS = {
    "train": train, "train_mem": train_mem, "long": long, "apply_cli": apply_cli, "infer": infer, "mixed": mixed,
    "ops": ops, "qlora": qlora, "qlora_mem": qlora_mem, "qlora_size": qlora_size,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("lib", choices=["base", "peft", "peftcore", "peftcore-plain"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--merged", action="store_true")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    common.setup_torch()
    out = WORKLOADS[args.workload](args)
    out.setdefault("values", {})
    print(json.dumps({"workload": args.workload, "lib": args.lib, **out}))


if __name__ == "__main__":
    main()
