"""peftcore against peft on SmolLM2-135M (fp32, 2 threads): ``python bench/run.py``.

Every measurement runs in a fresh subprocess (``bench/worker.py``), libraries
interleaved round by round (base, peft, peftcore, base, peft, peftcore, ...) so
that a load change on a shared machine hits all of them alike. Each process does
warm-ups, then repetitions; a figure is the median over all repetitions of all
rounds, with min-max, and every figure is also given as a ratio to peft and to the
frozen base model measured in the same run.

``--quick`` is a smoke run (one round, one repetition); ``--markdown PATH`` writes
the report (docs/benchmarks.md), ``--json PATH`` the raw numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

LIBS = ("base", "peft", "peftcore")


def _worker(workload: str, lib: str, *args: str, memory: bool = False, timeout: int = 1800) -> dict:
    env = common.env_for_worker()
    if memory:
        env.update(common.malloc_env())
    cmd = [sys.executable, os.path.join(HERE, "worker.py"), workload, lib, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def _interleaved(rounds: int, jobs: list[tuple[str, tuple[str, ...], str, bool]], log) -> dict[str, list]:
    """Run ``jobs`` (label, worker args, what to collect, memory) round-robin; collect per label."""
    out: dict[str, list] = {label: [] for label, *_ in jobs}
    for r in range(rounds):
        for label, args, collect, memory in jobs:
            start = time.perf_counter()
            result = _worker(*args, memory=memory)
            if collect == "times":
                out[label].extend(result["times"])
            else:
                out[label].append(result["values"])
            log(f"  round {r + 1}/{rounds} {label:<28} {time.perf_counter() - start:6.1f}s")
    return out


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run(args) -> dict:
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    libs = list(LIBS) + (["peftcore-plain"] if args.with_plain else [])
    lora_libs = [lib for lib in libs if lib != "base"]
    rounds, warm, reps = (1, "0", "1") if args.quick else (args.rounds, str(args.warmup), str(args.reps))
    report = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "load_before": os.getloadavg(), "sections": {}}
    sections = report["sections"]

    if "train" in args.only:
        log("training step (forward + backward + AdamW), batch %dx%d" % common.TRAIN_BATCH)
        jobs = [(lib, ("train", lib, "--warmup", warm, "--reps", reps), "times", False) for lib in libs]
        sections["train"] = {k: _stats(v) for k, v in _interleaved(rounds, jobs, log).items()}
    if "train_mem" in args.only:
        log("peak training memory above the loaded model")
        jobs = [(lib, ("train_mem", lib), "values", True) for lib in libs]
        raw = _interleaved(max(1, rounds - 1) if not args.quick else 1, jobs, log)
        sections["train_mem"] = {k: _stats([v["peak_above_loaded_mib"] for v in vals]) for k, vals in raw.items()}
    if "infer" in args.only:
        log("inference forward, batch %dx%d" % common.INFER_BATCH)
        jobs = [(lib, ("infer", lib, "--warmup", warm, "--reps", reps), "times", False) for lib in libs]
        jobs += [(f"{lib} merged", ("infer", lib, "--merged", "--warmup", warm, "--reps", reps), "times", False) for lib in lora_libs]
        sections["infer"] = {k: _stats(v) for k, v in _interleaved(rounds, jobs, log).items()}
    if "mixed" in args.only:
        log("mixed-adapter batches, one adapter per row, batch %dx%d" % common.INFER_BATCH)
        jobs = [("base", ("mixed", "base", "--warmup", warm, "--reps", reps), "times", False)]
        for k in (1, 4, 16):
            jobs += [(f"{lib} K={k}", ("mixed", lib, "--k", str(k), "--warmup", warm, "--reps", reps), "times", False) for lib in lora_libs]
        sections["mixed"] = {k: _stats(v) for k, v in _interleaved(rounds, jobs, log).items()}
    if "ops" in args.only:
        log("attach / load / hot-swap / merge_and_unload / add adapters")
        jobs = [(lib, ("ops", lib, "--reps", "1" if args.quick else str(args.ops_reps)), "values", False) for lib in lora_libs]
        raw = _interleaved(rounds if not args.quick else 1, jobs, log)
        sections["ops"] = {}
        for lib, runs in raw.items():
            merged: dict[str, dict] = {}
            for op in runs[0]:
                for clock in ("wall", "cpu"):
                    merged[f"{op} {clock}"] = _stats([t for run in runs for t in run[op][clock]])
            sections["ops"][lib] = merged
    report["load_after"] = os.getloadavg()
    report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    report["environment"] = environment()
    report["command"] = "python bench/run.py " + " ".join(sys.argv[1:])
    return report


# -- report -------------------------------------------------------------------------------


def environment() -> dict:
    import importlib.metadata as md

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as fh:
            mem = f"{int(fh.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
        "torch threads": common.THREADS,
        **{dist: version(dist) for dist in ("torch", "transformers", "peft", "peftcore", "peftcore-lora", "triton")},
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _row(label: str, s: dict, peft: dict | None, base: dict | None, unit=_ms) -> str:
    vs_peft = f"{s['median'] / peft['median']:.2f}x" if peft else "-"
    vs_base = f"{s['median'] / base['median']:.2f}x" if base else "-"
    return f"| {label} | {unit(s['median'])} | {unit(s['min'])} - {unit(s['max'])} | {s['n']} | {vs_peft} | {vs_base} |"


HEADER = "| | median | min - max | n | / peft | / base |\n|---|---|---|---|---|---|"


def markdown(report: dict) -> str:
    env, sec = report["environment"], report["sections"]
    lines = ["# Benchmarks: peftcore vs peft on CPU", ""]
    lines += [
        "Produced by `" + report["command"].strip() + "` (see `bench/run.py`; the tox env `bench` runs the same).",
        f"Run {report['started']} - {report['finished']}; load average before {_load(report['load_before'])}, "
        f"after {_load(report['load_after'])} (the machine is shared: compare ratios, which come from interleaved runs).",
        "",
        "Machine: " + f"{env['cpu']}, {env['cores']} cores, {env['memory']}; torch.set_num_threads({env['torch threads']}), fp32.",
        "Versions: " + ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "transformers", "peft", "peftcore", "peftcore-lora", "triton")),
        "",
        "Model: SmolLM2-135M (peftcore.assets.smollm2_dir()), LoRA r=16, alpha=32, dropout 0, target_modules=\"all-linear\" "
        "(210 layers). Each figure: median over all repetitions of all rounds, each library in a fresh process.",
        "",
    ]
    if "train" in sec:
        s = sec["train"]
        lines += ["## Training step", "", f"Batch {common.TRAIN_BATCH[0]} x {common.TRAIN_BATCH[1]} tokens, loss = causal LM loss. "
                  "base = frozen model, forward + backward with gradients through the network (the embeddings' output "
                  "requires grad); adapters: forward + backward + AdamW (lr 1e-4) step.", "", HEADER]
        lines += [_row(k, v, s.get("peft"), s.get("base")) for k, v in s.items()]
        lines.append("")
    if "train_mem" in sec:
        s = sec["train_mem"]
        lines += ["## Peak training memory", "", "Peak RSS (VmHWM, reset through /proc/self/clear_refs) over the first two "
                  "steps above the RSS of the loaded model with adapters and optimizer object, one fresh process per "
                  "measurement, glibc told to return freed blocks (same settings for all).", "", HEADER]
        lines += [_row(k, v, s.get("peft"), s.get("base"), unit=lambda m: f"{m:.0f} MiB") for k, v in s.items()]
        lines.append("")
    if "infer" in sec:
        s = sec["infer"]
        lines += ["## Inference", "", f"Forward under torch.no_grad(), batch {common.INFER_BATCH[0]} x {common.INFER_BATCH[1]} "
                  "tokens, full logits. Unmerged adapter, and after merge_adapter().", "", HEADER]
        lines += [_row(k, v, s.get("peft" if " merged" not in k else "peft merged"), s.get("base")) for k, v in s.items()]
        lines.append("")
    if "mixed" in sec:
        s = sec["mixed"]
        lines += ["## Mixed-adapter batches", "", f"Batch {common.INFER_BATCH[0]} x {common.INFER_BATCH[1]}, "
                  "adapter_names = one adapter per row, K different adapters (row i uses adapter i mod K).", "", HEADER]
        for k, v in s.items():
            k_suffix = k.split(" ", 1)[1] if " " in k else None
            lines.append(_row(k, v, s.get(f"peft {k_suffix}") if k_suffix else None, s.get("base")))
        for lib in ("peftcore", "peft"):
            if f"{lib} K=1" in s and f"{lib} K=16" in s:
                growth = s[f"{lib} K=16"]["median"] / s[f"{lib} K=1"]["median"] - 1
                lines.append(f"\n{lib}: K=1 -> K=16 costs {growth * 100:+.1f}%.")
        lines.append("")
    if "ops" in sec:
        lines += ["## Attaching, loading, swapping, merging", "",
                  "Seconds per operation on a freshly loaded model (wall clock; CPU time of the process beside it, "
                  "less sensitive to other jobs). attach = get_peft_model; load = PeftModel.from_pretrained; hot-swap = "
                  "load_adapter + set_adapter; add = add_adapter of the 2nd and of the 16th adapter.", "",
                  "| operation | peft wall | peftcore wall | peftcore / peft | peft CPU | peftcore CPU | CPU ratio |",
                  "|---|---|---|---|---|---|---|"]
        ops = sec["ops"]
        for op in ("attach", "load", "hotswap", "merge_and_unload", "add_2nd", "add_16th"):
            p, c = ops.get("peft", {}), ops.get("peftcore", {})
            if f"{op} wall" not in c:
                continue
            cells = []
            for clock in ("wall", "cpu"):
                pv, cv = p.get(f"{op} {clock}"), c[f"{op} {clock}"]
                cells += [_stat_cell(pv), _stat_cell(cv), f"{cv['median'] / pv['median']:.2f}x" if pv else "-"]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
        for lib in ("peft", "peftcore"):
            o = ops.get(lib, {})
            if "add_2nd wall" in o:
                lines.append(f"\n{lib}: adding the 16th adapter costs {o['add_16th wall']['median'] / o['add_2nd wall']['median']:.2f}x "
                             f"the 2nd (wall), {o['add_16th cpu']['median'] / o['add_2nd cpu']['median']:.2f}x (CPU).")
        lines.append("")
    lines += targets(report)
    lines += NOTES.splitlines()
    return "\n".join(lines) + "\n"


NOTES = """## What peftcore does differently

- **Training and unmerged inference** (`peftcore_lora/fast.py`): for `nn.Linear` / GPT-2 `Conv1D` base layers one
  autograd function computes `x W.T + b + s * B(A(dropout(x)))` for every active adapter, accumulating the LoRA
  product into the base output inside the GEMM (`addmm_(..., alpha=s)`), so the `(N, out)` LoRA product, its scaled
  copy and the sum never exist. Backward recomputes what it needs and saves only the input (shared by q/k/v and by
  gate/up, which read the same tensor), the `(N, r)` products `x A.T` and a 1-byte dropout mask, never a dropout copy.
  With `p = 0` no dropout work is done. Dropout with `p > 0` draws the same mask as `nn.Dropout` (same RNG calls).
- **Mixed-adapter batches**: the A and B of each row's adapter are gathered (ranks zero-padded) and applied with two
  batched matmuls accumulated into the base output, instead of a Python loop over adapters with row gathers and scatters.
- **Attaching and loading** (`peftcore/tuner.py`, `serialization.py`): one pruned walk over the model that never enters
  the per-adapter sub-modules, the new adapter's flags set without re-walking every older adapter, adapter weights
  written once (no constructor init that the LoRA init overwrites), and loading matches file keys against this
  adapter's tensors only. The cost of adding or loading an adapter no longer grows with the adapters already there.
- Everything else (DoRA, quantised or hooked base layers, Embedding/Conv2d, autocast, merged or disabled adapters,
  torch.compile) takes the plain path, which is the reference the fast paths are tested against (fp32, atol 1e-5).
  `PEFTCORE_LORA_FAST=0` switches the fast paths off (the `peftcore-plain` rows, when run with `--with-plain`).

## Limits of this CPU comparison

- Memory: an exact LoRA backward needs each adapted layer's input to form the gradient of A. A frozen base saves
  none of them (its backward needs only the weights), so for SmolLM2 four extra activations per layer (the inputs of
  q/k/v, o, gate/up and down: 3,264 floats per token per layer, ~100 MiB for 2 x 128 tokens) stay alive in any exact
  implementation, peft's and peftcore's alike. That sets the floor of the memory ratio.
- GPU: `bench/gpu.py` (Triton kernels vs the PyTorch paths vs peft's formula, layer level and whole models, H100) is
  ready to run in one go; no GPU was available where these numbers were taken, so it has only run in `--smoke` mode.
"""


def _stat_cell(s: dict | None) -> str:
    return "-" if s is None else f"{_ms(s['median'])} ({_ms(s['min'])}-{_ms(s['max'])})"


def _load(load) -> str:
    return "/".join(f"{v:.1f}" for v in load)


def targets(report: dict) -> list[str]:
    """Issue 6's targets, each from figures measured in the same run."""
    sec = report["sections"]
    rows = []

    def add(name, value, limit, fmt="{:.2f}x"):
        if value is None:
            return
        rows.append(f"| {name} | {fmt.format(value)} | <= {fmt.format(limit)} | {'met' if value <= limit else 'missed'} |")

    med = lambda s, k: s[k]["median"] if k in s else None  # noqa: E731
    if "train" in sec:
        s = sec["train"]
        if med(s, "peftcore") and med(s, "base"):
            add("training step / frozen-base fwd+bwd", med(s, "peftcore") / med(s, "base"), 1.12)
        if med(s, "peftcore") and med(s, "peft"):
            add("training step / peft's step", med(s, "peftcore") / med(s, "peft"), 0.90)
    if "train_mem" in sec:
        s = sec["train_mem"]
        if med(s, "peftcore") and med(s, "base"):
            add("peak training memory / frozen base's", med(s, "peftcore") / med(s, "base"), 1.25)
    if "infer" in sec:
        s = sec["infer"]
        if med(s, "peftcore") and med(s, "base"):
            add("unmerged inference / base forward", med(s, "peftcore") / med(s, "base"), 1.05)
    if "mixed" in sec:
        s = sec["mixed"]
        if med(s, "peftcore K=16") and med(s, "base"):
            add("mixed batch, 16 adapters / base forward", med(s, "peftcore K=16") / med(s, "base"), 1.10)
        if med(s, "peftcore K=16") and med(s, "peftcore K=1"):
            add("mixed batch growth K=1 -> K=16", med(s, "peftcore K=16") / med(s, "peftcore K=1") - 1, 0.05, fmt="{:+.1%}")
    if "ops" in sec and "peft" in sec["ops"] and "peftcore" in sec["ops"]:
        p, c = sec["ops"]["peft"], sec["ops"]["peftcore"]
        add("attach / peft's", c["attach wall"]["median"] / p["attach wall"]["median"], 0.5)
        add("load a saved adapter / peft's", c["load wall"]["median"] / p["load wall"]["median"], 0.5)
        add("16th adapter / 2nd adapter (add_adapter)", c["add_16th wall"]["median"] / c["add_2nd wall"]["median"], 1.0)
    if not rows:
        return []
    return ["## Targets (issue 6)", "", "| target | measured | limit | |", "|---|---|---|---|", *rows, ""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one round, one repetition, no warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ops-reps", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=["train", "train_mem", "infer", "mixed", "ops"],
                        choices=["train", "train_mem", "infer", "mixed", "ops"])
    parser.add_argument("--with-plain", action="store_true", help="also run peftcore with its fast paths off")
    parser.add_argument("--markdown", help="write the report here (e.g. docs/benchmarks.md)")
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args(argv)
    report = run(args)
    text = markdown(report)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
