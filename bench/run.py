"""peftcore against peft on SmolLM2-135M (fp32, 2 threads): ``python bench/run.py``.

Every measurement runs in a fresh subprocess (``bench/worker.py``), one library per
process, libraries interleaved round by round. Timed workloads also load the frozen
base model in the same process and alternate base and adapted runs, so each figure
comes with a per-pair ratio to the base that cancels what is particular to a process
or a moment on a shared machine. A figure is the median over all repetitions of all
rounds, with min-max; "/ base" is the median of the per-pair ratios, "/ peft" the
quotient of two libraries' "/ base".

``--quick`` is a smoke run (one round, one repetition); ``--markdown PATH`` writes
the report (docs/benchmarks.md), ``--json PATH`` the raw numbers, ``--splice PATH``
puts the QLoRA part of this run into an existing report and keeps the rest of it.
The ``qlora`` section trains LoRA on SmolLM2 loaded 4-bit (NF4, double quantisation)
through bitsandbytes' CPU backend, on real text.
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
import long_seq  # noqa: E402

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


def _interleaved(rounds: int, jobs: list[tuple[str, tuple[str, ...], bool]], log) -> dict[str, list[dict]]:
    """Run ``jobs`` (label, worker args, memory) round-robin; per label, one worker result per round."""
    out: dict[str, list[dict]] = {label: [] for label, *_ in jobs}
    for r in range(rounds):
        for label, args, memory in jobs:
            start = time.perf_counter()
            out[label].append(_worker(*args, memory=memory))
            log(
                f"  round {r + 1}/{rounds} {label:<24} {time.perf_counter() - start:6.1f}s  (load "
                f"{os.getloadavg()[0]:.1f})"
            )
    return out


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _timed(raw: dict[str, list[dict]]) -> dict[str, dict]:
    """Per label: time statistics and the median per-pair ratio to the base of the same process.

    The ``base`` entry pools the base runs of every process of the section.
    """
    section, base_times = {}, []
    for label, results in raw.items():
        times = [t for res in results for t in res["times"]]
        section[label] = _stats(times)
        pairs = [t / b for res in results for t, b in zip(res["times"], res.get("base_times", []))]
        if pairs:
            section[label]["vs_base"] = _stats(pairs)
        base_times += [b for res in results for b in res.get("base_times", [])]
    if base_times and "base" not in section:
        section = {"base": {**_stats(base_times), "vs_base": _stats([1.0])}, **section}
    return section


def vs_base(section: dict, label: str) -> float | None:
    entry = section.get(label, {})
    return entry["vs_base"]["median"] if "vs_base" in entry else None


def relative(section: dict, label: str, reference: str) -> float | None:
    """``label``'s cost relative to ``reference``'s, each taken against its own process's base."""
    a, b = vs_base(section, label), vs_base(section, reference)
    return a / b if a is not None and b else None


def run(args) -> dict:
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    libs = list(LIBS) + (["peftcore-plain"] if args.with_plain else [])
    lora_libs = [lib for lib in libs if lib != "base"]
    rounds, warm, reps = (1, "0", "1") if args.quick else (args.rounds, str(args.warmup), str(args.reps))
    report = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_before": os.getloadavg(),
        "sections": {},
    }
    sections = report["sections"]

    timed = lambda *a: ("--warmup", warm, "--reps", reps, *a)  # noqa: E731
    if "train" in args.only:
        log("training step (forward + backward + AdamW), batch %dx%d" % common.TRAIN_BATCH)
        jobs = [(lib, ("train", lib, *timed()), False) for lib in lora_libs]
        sections["train"] = _timed(_interleaved(rounds, jobs, log))
    if "train_mem" in args.only:
        log("peak training memory above the loaded model")
        jobs = [(lib, ("train_mem", lib), True) for lib in libs]
        raw = _interleaved(max(1, rounds - 1) if not args.quick else 1, jobs, log)
        sections["train_mem"] = {k: _stats([r["values"]["peak_above_loaded_mib"] for r in v]) for k, v in raw.items()}
    if "infer" in args.only:
        log("inference forward, batch %dx%d" % common.INFER_BATCH)
        jobs = [(lib, ("infer", lib, *timed()), False) for lib in lora_libs]
        jobs += [(f"{lib} merged", ("infer", lib, *timed("--merged")), False) for lib in lora_libs]
        sections["infer"] = _timed(_interleaved(rounds, jobs, log))
    if "mixed" in args.only:
        log("mixed-adapter batches, one adapter per row, batch %dx%d" % common.INFER_BATCH)
        jobs = [(f"{lib} K={k}", ("mixed", lib, *timed("--k", str(k))), False) for k in (1, 4, 16) for lib in lora_libs]
        sections["mixed"] = _timed(_interleaved(rounds, jobs, log))
    if "ops" in args.only:
        log("attach / load / hot-swap / merge_and_unload / add adapters")
        jobs = [(lib, ("ops", lib, "--reps", "1" if args.quick else str(args.ops_reps)), False) for lib in lora_libs]
        raw = _interleaved(rounds if not args.quick else 1, jobs, log)
        sections["ops"] = {}
        for lib, results in raw.items():
            runs = [res["values"] for res in results]
            merged: dict[str, dict] = {}
            for op in runs[0]:
                for clock in ("wall", "cpu"):
                    merged[f"{op} {clock}"] = _stats([t for run in runs for t in run[op][clock]])
            sections["ops"][lib] = merged
    if "long" in args.only:
        log("long sequences: one step at batch 1 x N tokens, with and without gradient checkpointing")
        tokens = (256,) if args.quick else tuple(args.long_tokens)
        sections["long"] = long_seq.measure(_worker, rounds, 1 if args.quick else args.long_reps, tokens, log)
    if "qlora" in args.only:
        log("QLoRA: SmolLM2 4-bit NF4 (double quant, fp32 compute), real text, batch %dx%d" % common.TRAIN_BATCH)
        q_libs = lora_libs  # peftcore-plain (--with-plain): the 4-bit layers' plain path, as before the fused one
        jobs = [(lib, ("qlora", lib, *timed()), False) for lib in q_libs]
        sections["qlora"] = _timed(_interleaved(rounds, jobs, log))
        jobs = [(lib, ("qlora_mem", lib), True) for lib in ["base", *q_libs]]
        raw = _interleaved(max(1, rounds - 1) if not args.quick else 1, jobs, log)
        sections["qlora_mem"] = {k: _stats([r["values"]["peak_above_loaded_mib"] for r in v]) for k, v in raw.items()}
        sections["qlora_size"] = _worker("qlora_size", "base")["values"]
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


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _row(label: str, section: dict, peft_label: str | None) -> str:
    """A timed row: time, spread, n, against peft (each against its own base), against the base."""
    s = section[label]
    pair = s.get("vs_base")
    spread = f" ({_times(pair['min'])}-{_times(pair['max'])})" if pair and pair["n"] > 1 else ""
    vs_peft = relative(section, label, peft_label) if peft_label in section and label != "base" else None
    return (f"| {label} | {_ms(s['median'])} | {_ms(s['min'])} - {_ms(s['max'])} | {s['n']} | {_times(vs_peft)} | "
            f"{_times(pair['median'] if pair else None)}{spread} |")


def _memory_row(label: str, section: dict) -> str:
    s, peft, base = section[label], section.get("peft"), section.get("base")
    ratio = lambda ref: _times(s["median"] / ref["median"]) if ref else "-"  # noqa: E731
    spread = f"{s['min']:.0f} - {s['max']:.0f} MiB"
    return f"| {label} | {s['median']:.0f} MiB | {spread} | {s['n']} | {ratio(peft)} | {ratio(base)} |"


HEADER = "| | median | min - max | n | / peft | / base (min-max) |\n|---|---|---|---|---|---|"
RATIO_NOTE = (
    '"/ base" is the median over all repetitions of (this run / the base run next to it in the same process), '
    'with its min-max; "/ peft" divides a row\'s "/ base" by peft\'s. Times alone vary by 20% between '
    "processes on this shared machine; these ratios vary far less."
)


def markdown(report: dict) -> str:
    env, sec = report["environment"], report["sections"]
    lines = ["# Benchmarks: peftcore vs peft on CPU", ""]
    lines += [
        (
            "Produced by the runs listed below, sections of the later run replacing the earlier's (see `bench/run.py`; "
            "`tox -e bench` measures every section but `long`, which takes hours here: `--only long`)."
            if report.get("runs")
            else "Produced by `"
            + report["command"].strip()
            + "` (see `bench/run.py`; the tox env `bench` runs all sections but `long`)."
        ),
        f"Run {report['started']} - {report['finished']}; load average before {_load(report['load_before'])}, "
        f"after {_load(report['load_after'])} (the machine is shared: compare ratios, which come from interleaved "
        "runs).",
        "",
        *[
            f"- `{r['command']}`: {r['started']} - {r['finished']}, load {_load(r['load_before'])} -> "
            f"{_load(r['load_after'])}"
            for r in report.get("runs", [])
        ],
        "",
        "Machine: "
        + f"{env['cpu']}, {env['cores']} cores, {env['memory']}; torch.set_num_threads({env['torch threads']}), fp32.",
        "Versions: "
        + ", ".join(
            f"{k} {env[k]}" for k in ("python", "torch", "transformers", "peft", "peftcore", "peftcore-lora", "triton")
        ),
        "",
        "Model: SmolLM2-135M (peftcore.cli.assets.smollm2_dir()), LoRA r=16, alpha=32, dropout 0, "
        'target_modules="all-linear" '
        "(210 layers). Each figure: median over all repetitions of all rounds, each library in a fresh process "
        "that also holds a frozen copy of the base model. " + RATIO_NOTE,
        "",
    ]
    if "train" in sec:
        s = sec["train"]
        lines += [
            "## Training step",
            "",
            f"Batch {common.TRAIN_BATCH[0]} x {common.TRAIN_BATCH[1]} tokens, loss = causal LM loss. "
            "base = frozen model, forward + backward with gradients through the network (the embeddings' output "
            "requires grad); adapters: forward + backward + AdamW step (lr 1e-4, `fused=True`: the optimizer "
            "transformers' Trainer picks by default).",
            "",
            HEADER,
        ]
        lines += [_row(k, s, "peft") for k in s]
        lines.append("")
    if "train_mem" in sec:
        s = sec["train_mem"]
        lines += [
            "## Peak training memory",
            "",
            "Peak RSS (VmHWM, reset through /proc/self/clear_refs) over the first two "
            "steps above the RSS of the loaded model with adapters and optimizer object, one fresh process per "
            "measurement (no base copy beside it), glibc told to return freed blocks (same settings for all). "
            "Memory does not vary like time: ratios are plain quotients of medians.",
            "",
            HEADER.replace(" (min-max)", ""),
        ]
        lines += [_memory_row(k, s) for k in s]
        lines.append("")
    if "infer" in sec:
        s = sec["infer"]
        lines += [
            "## Inference",
            "",
            f"Forward under torch.no_grad(), batch {common.INFER_BATCH[0]} x {common.INFER_BATCH[1]} "
            "tokens, full logits. Unmerged adapter, and after merge_adapter().",
            "",
            HEADER,
        ]
        lines += [_row(k, s, "peft" if " merged" not in k else "peft merged") for k in s]
        lines.append("")
    if "mixed" in sec:
        s = sec["mixed"]
        lines += ["## Mixed-adapter batches", "", f"Batch {common.INFER_BATCH[0]} x {common.INFER_BATCH[1]}, "
                  "adapter_names = one adapter per row, K different adapters (row i uses adapter i mod K).", "", HEADER]
        lines += [_row(k, s, f"peft {k.split(' ', 1)[1]}" if " " in k else None) for k in s]
        for lib in ("peftcore", "peft"):
            growth = relative(s, f"{lib} K=16", f"{lib} K=1")
            if growth is not None:
                lines.append(f"\n{lib}: K=1 -> K=16 costs {(growth - 1) * 100:+.1f}% (each against its own base).")
        lines.append("")
    if "ops" in sec:
        lines += [
            "## Attaching, loading, swapping, merging",
            "",
            "Seconds per operation on a freshly loaded model (wall clock; CPU time of the process beside it, "
            "less sensitive to other jobs). attach = get_peft_model; load = PeftModel.from_pretrained; hot-swap = "
            "load_adapter + set_adapter; add = add_adapter of the 2nd and of the 16th adapter.",
            "",
            "| operation | peft wall | peftcore wall | peftcore / peft | peft CPU | peftcore CPU | CPU ratio |",
            "|---|---|---|---|---|---|---|",
        ]
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
                lines.append(
                    f"\n{lib}: adding the 16th adapter costs "
                    f"{o['add_16th wall']['median'] / o['add_2nd wall']['median']:.2f}x "
                    f"the 2nd (wall), {o['add_16th cpu']['median'] / o['add_2nd cpu']['median']:.2f}x (CPU)."
                )
        lines.append("")
    if "long" in sec:
        lines += long_seq.markdown(sec["long"])
    lines += qlora_markdown(sec)
    lines += targets(report)
    lines += NOTES.splitlines()
    return "\n".join(lines) + "\n"


NOTES = """## What peftcore does differently

- **Training and unmerged inference** (`peftcore_lora/fast.py`): for `nn.Linear` / GPT-2 `Conv1D` base layers one
  autograd function computes `x W.T + b + s * B(A(dropout(x)))` for every active adapter, accumulating the LoRA
  product into the base output inside the GEMM (`addmm_(..., alpha=s)`), so the `(N, out)` LoRA product, its scaled
  copy and the sum never exist. Backward saves only the input (shared by q/k/v and by gate/up, which read the same
  tensor), the `(N, r)` products `x A.T` and a 1-byte dropout mask, never a dropout copy. With `p = 0` no dropout
  work is done; with `p > 0` the mask is the one `nn.Dropout` draws (same RNG calls).
- **Inputs rebuilt, not kept**: a frozen base layer's backward needs only its weight; LoRA's gradient of A needs the
  layer's input, which is what made peft's training memory 1.35x the base's here. When that input is a product whose
  factors autograd keeps anyway (SwiGLU's `act(gate) * up` before `down_proj`; RMSNorm's `weight * (h * rsqrt(var))`
  before q/k/v and gate/up), peftcore keeps references to the factors and multiplies them again in backward, once
  for all layers sharing the input: the same bits, no copy. Only the inputs of `o_proj` (the attention output) are
  still kept. Not done under saved-tensor hooks (non-reentrant checkpointing, CPU offload), where reading the
  factors would run the hooks.
- **Activation outputs redone, not kept** (`peftcore/activation_savings.py`, without checkpointing): autograd keeps
  `act(gate)` for SwiGLU's product although `gate` is kept for the activation's own backward; peftcore keeps it as
  "SiLU/GELU of that kept input" and redoes it in backward (one elementwise op per block, the same bits). At 2,048
  tokens on SmolLM2 this took the step's peak from 2,013 to 1,658 MiB (peft: 3,549), with no change in step time.
- **Mixed-adapter batches**: the A and B of each row's adapter are gathered (ranks zero-padded) and applied with two
  batched matmuls accumulated into the base output, instead of a Python loop over adapters with row gathers and
  scatters.
- **Attaching and loading** (`peftcore/layer_tuner.py`, `serialization.py`): one pruned walk over the model that
  never enters the per-adapter sub-modules, the new adapter's flags set without re-walking every older adapter,
  adapter weights written once (no constructor init that the LoRA init overwrites), and loading matches file keys
  against this adapter's tensors only. The cost of adding or loading an adapter no longer grows with the adapters
  already there.
- **Causal-LM loss without logits** (`peftcore/lm_loss.py`, `peftcore/chunked_loss.py`): with labels in training
  mode the loss is computed from the final hidden states a chunk of tokens at a time (the head's matmul, float32
  log-softmax, cross-entropy; backward recomputes each chunk), so the tokens x 49,152 logits, their log-softmax and
  their gradients never exist; ignored positions are dropped before any matmul. Same loss and gradients as
  transformers' (fp32, atol 1e-5 in the tests); the price is one more head matmul per step.
- **Checkpointed steps** (issue 14 reported peftcore's at 219 s against peft's 91 s in one loaded run): counted in
  `plugins/peftcore-lora/tests/test_fast_checkpointing.py`, every adapted layer runs exactly as often as in peft
  (forward plus the checkpoint's one recompute) and the input rebuild stays off under non-reentrant checkpointing:
  nothing is recomputed twice. That run's gap was the shared machine's load; the long-sequence table compares
  neighbouring processes.
- **QLoRA** (`peftcore_bnb/layers.py`): training on a bitsandbytes `Linear4bit` runs the same fused function, the
  4-bit weight dequantised (bitsandbytes' own `dequantize_4bit`) for the forward GEMM and again in backward, as
  bitsandbytes' `MatMul4Bit` does; no full-precision weight is kept between them. Inference keeps bitsandbytes' own
  forward (and its CPU kernels). Adapters in another dtype than the input (fp32 adapters on a bf16 model) and
  8-bit bases take the plain path.
- Everything else (DoRA, 8-bit or hooked base layers, Embedding/Conv2d, autocast, merged or disabled adapters,
  torch.compile) takes the plain path, which is the reference the fast paths are tested against (fp32, atol 1e-5).
  `PEFTCORE_LORA_FAST=0` switches the fast paths off (the `peftcore-plain` rows, when run with `--with-plain`).

## Limits of this CPU comparison

- Time: any exact LoRA runs six rank-r GEMMs per adapted layer in a training step (x A.T, the update of the output,
  dy B, the gradients of A and B, the update of dx); at 256 tokens they are memory-bound on the (N, out) tensors and
  cost ~90 ms of SmolLM2's ~1.3 s step here, so ~1.07x the frozen base is the floor on this CPU. Medians over 24
  pairs still move by about +-5% between runs on this shared 2-vCPU machine; read the min-max beside each ratio.
- Memory: what remains above the base is the optimizer state and gradients of 4.9 M adapter parameters (~58 MiB
  with AdamW), the `o_proj` inputs (~17 MiB here) and the `(N, r)` products.
- Long sequences: every point is a single-sequence step on 2 cores, minutes each; two rounds only, so read the
  min-max beside each time ratio. `offload=True` (checkpointed inputs in host memory) only acts on an accelerator
  and is not measured here.
- GPU: `bench/gpu.py` (Triton kernels vs the PyTorch paths vs peft's formula, layer level and whole models, H100) is
  ready to run in one go; no GPU was available where these numbers were taken, so it has only run in `--smoke` mode.
"""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def qlora_markdown(sec: dict) -> list[str]:
    """The QLoRA section: step time, peak training memory, the 4-bit model's size."""
    lines = []
    if "qlora" in sec:
        s = sec["qlora"]
        lines += [
            "## QLoRA training step (4-bit base)",
            "",
            "SmolLM2-135M loaded by transformers with `BitsAndBytesConfig(load_in_4bit=True, "
            'bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)` '
            "on CPU (bitsandbytes' CPU backend), then each library's `prepare_model_for_kbit_training("
            "use_gradient_checkpointing=False)` and `enable_input_require_grads()` (peft's prepare does that only "
            f"with checkpointing; called for both so the backward is the same), then LoRA r={common.RANK}, "
            f"alpha={common.ALPHA}, dropout 0 on {', '.join(common.QLORA_TARGETS)} (210 4-bit layers), the same "
            f"config for both. Batch {common.TRAIN_BATCH[0]} x {common.TRAIN_BATCH[1]} tokens of real text (the "
            "wheel-shipped movie-review snippets run together), loss = causal LM loss. base = the frozen 4-bit model, "
            "forward + backward with gradients through the network; adapters: forward + backward + AdamW step "
            "(lr 1e-4, `fused=True`).",
            "",
            HEADER,
        ]
        lines += [_row(k, s, "peft") for k in s]
        lines.append("")
    if "qlora_mem" in sec:
        s = sec["qlora_mem"]
        lines += [
            "### QLoRA peak training memory",
            "",
            "Peak RSS over the first two steps above the RSS of the loaded 4-bit model with adapters and optimizer "
            "object, measured as in the fp32 section (fresh process, no base copy beside it).",
            "",
            HEADER.replace(" (min-max)", ""),
        ]
        lines += [_memory_row(k, s) for k in s]
        lines.append("")
    if "qlora_size" in sec:
        fp32, four = sec["qlora_size"]["fp32"], sec["qlora_size"]["4bit"]
        total = lambda b: b["parameters"] + b["buffers"] + b.get("quant_state", 0)  # noqa: E731
        lines += [
            "### The 4-bit model's size",
            "",
            "Bytes of `parameters()` and `buffers()` of each model as loaded (both measured in one process), and "
            "the 4-bit layers' quantisation state (absmax, and with double quantisation its own absmax and code "
            "book), which lives outside `parameters()`. The embeddings (tied with the head) and norms stay fp32.",
            "",
            "| | parameters | buffers | quantisation state | total | / fp32 |",
            "|---|---|---|---|---|---|",
        ]
        for name, b in (("fp32", fp32), ("4-bit NF4, double quant", four)):
            lines.append(
                f"| {name} | {_mib(b['parameters'])} | {_mib(b['buffers'])} | {_mib(b.get('quant_state', 0))} | "
                f"{_mib(total(b))} | {total(b) / total(fp32):.3f}x |"
            )
        lines.append("")
    return lines


def _stat_cell(s: dict | None) -> str:
    return "-" if s is None else f"{_ms(s['median'])} ({_ms(s['min'])}-{_ms(s['max'])})"


def _load(load) -> str:
    return "/".join(f"{v:.1f}" for v in load)


def _target_table(title: str, rows: list[str]) -> list[str]:
    if not rows:
        return []
    return [f"## Targets ({title})", "", "| target | measured | limit | |", "|---|---|---|---|", *rows, ""]


def targets(report: dict) -> list[str]:
    """Issue 6's and issue 14's targets, each from figures measured in the same run."""
    sec = report["sections"]
    rows = []

    def add(name, value, limit, fmt="{:.3f}x", limit_fmt="{:.2f}x"):
        # one more digit for the measurement, so that 1.052x against 1.05x reads as the miss it is
        if value is None:
            return
        rows.append(
            f"| {name} | {fmt.format(value)} | <= {limit_fmt.format(limit)} | {'met' if value <= limit else 'missed'} |"
        )

    if "train" in sec:
        add("training step / frozen-base fwd+bwd", vs_base(sec["train"], "peftcore"), 1.12)
        add("training step / peft's step", relative(sec["train"], "peftcore", "peft"), 0.90)
    if "train_mem" in sec and {"peftcore", "base"} <= set(sec["train_mem"]):
        add(
            "peak training memory / frozen base's",
            sec["train_mem"]["peftcore"]["median"] / sec["train_mem"]["base"]["median"],
            1.25,
        )
    if "infer" in sec:
        add("unmerged inference / base forward", vs_base(sec["infer"], "peftcore"), 1.05)
    if "mixed" in sec:
        add("mixed batch, 16 adapters / base forward", vs_base(sec["mixed"], "peftcore K=16"), 1.10)
        growth = relative(sec["mixed"], "peftcore K=16", "peftcore K=1")
        add(
            "mixed batch growth K=1 -> K=16",
            None if growth is None else growth - 1,
            0.05,
            fmt="{:+.1%}",
            limit_fmt="{:+.1%}",
        )
    if "ops" in sec and "peft" in sec["ops"] and "peftcore" in sec["ops"]:
        p, c = sec["ops"]["peft"], sec["ops"]["peftcore"]
        add("attach / peft's", c["attach wall"]["median"] / p["attach wall"]["median"], 0.5)
        add("load a saved adapter / peft's", c["load wall"]["median"] / p["load wall"]["median"], 0.5)
        add("16th adapter / 2nd adapter (add_adapter)", c["add_16th wall"]["median"] / c["add_2nd wall"]["median"], 1.0)
    out = _target_table("issue 6", rows)
    rows.clear()  # add() appends here
    if "qlora" in sec:
        add("QLoRA step / peft's step (4-bit SmolLM2)", relative(sec["qlora"], "peftcore", "peft"), 0.90)
    if "qlora_mem" in sec and {"peftcore", "peft"} <= set(sec["qlora_mem"]):
        add(
            "QLoRA peak training memory / peft's",
            sec["qlora_mem"]["peftcore"]["median"] / sec["qlora_mem"]["peft"]["median"],
            1.00,
        )
    out += _target_table("quantized bases, item 7", rows)
    if "long" in sec:
        rows.clear()  # add() appends here
        for name, value, limit in long_seq.targets(sec["long"]):
            add(name, value, limit)
        out += _target_table("issue 14", rows)
    return out


SPLICE_BEGIN, SPLICE_END = "<!-- bench/run.py --splice: begin -->", "<!-- bench/run.py --splice: end -->"


def splice(report: dict, path: str) -> None:
    """Put this run's QLoRA part (its run line, section and targets) into the report at ``path``.

    The rest of the file is kept as it is: the part goes between the splice markers when the file
    has them (replacing what a previous splice wrote), else at the end. For a report whose other
    sections' raw figures (``--json``) are gone, so that ``--from-json`` cannot rebuild it whole.
    """
    part = [
        SPLICE_BEGIN,
        "",
        *qlora_markdown(report["sections"]),
        f"Measured by `{report['command'].strip()}`, {report['started']} - {report['finished']}, load average "
        f"{_load(report['load_before'])} -> {_load(report['load_after'])}; same machine and versions as above "
        f"(bitsandbytes {_dist_version('bitsandbytes')}). " + RATIO_NOTE,
        *_spread_note(report["sections"].get("qlora", {})),
        "",
        *targets({"sections": {k: v for k, v in report["sections"].items() if k.startswith("qlora")}}),
        SPLICE_END,
    ]
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if SPLICE_BEGIN in text and SPLICE_END in text:
        head, rest = text.split(SPLICE_BEGIN, 1)
        text = head + "\n".join(part) + rest.split(SPLICE_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(part) + "\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _spread_note(section: dict) -> list[str]:
    """Say so when the per-pair ratios of a timed section spread wide (a loaded machine): read the medians with care."""
    wide = {k: v["vs_base"] for k, v in section.items() if k != "base" and "vs_base" in v
            and v["vs_base"]["max"] > 1.5 * v["vs_base"]["min"]}
    if not wide:
        return []
    spans = ", ".join(f"{k} {_times(v['min'])}-{_times(v['max'])} (n={v['n']})" for k, v in wide.items())
    return ["", f"In this run the per-pair ratios spread wide ({spans}): other jobs shared the two cores. The medians "
            "are the figures, but a ratio between them is uncertain by more than a target's margin."]


def _dist_version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def merge(reports: list[dict]) -> dict:
    """One report out of several runs (sections measured by separate invocations)."""
    merged = {
        "sections": {},
        "environment": reports[0]["environment"],
        "started": reports[0]["started"],
        "finished": reports[-1]["finished"],
        "load_before": reports[0]["load_before"],
        "load_after": reports[-1]["load_after"],
    }
    for report in reports:
        merged["sections"].update(report["sections"])
    merged["command"] = " ; ".join(r["command"] for r in reports)
    merged["runs"] = [
        {
            "command": r["command"],
            "started": r["started"],
            "finished": r["finished"],
            "load_before": r["load_before"],
            "load_after": r["load_after"],
            "sections": sorted(r["sections"]),
        }
        for r in reports
    ]
    return merged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one round, one repetition, no warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ops-reps", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=["train", "train_mem", "infer", "mixed", "ops", "qlora"],
                        choices=["train", "train_mem", "infer", "mixed", "ops", "long", "qlora"],
                        help="sections to measure; long (hours on 2 cores) only when named")
    parser.add_argument("--long-tokens", nargs="+", type=int, default=list(long_seq.TOKENS),
                        help="sequence lengths of the long section")
    parser.add_argument("--long-reps", type=int, default=2, help="timed steps per process in the long section")
    parser.add_argument("--with-plain", action="store_true", help="also run peftcore with its fast paths off")
    parser.add_argument("--markdown", help="write the report here (e.g. docs/benchmarks.md)")
    parser.add_argument("--json", help="write the raw figures here")
    parser.add_argument(
        "--splice",
        metavar="PATH",
        help="put the QLoRA part of this run into an existing report (e.g. docs/benchmarks.md), keeping the rest",
    )
    parser.add_argument(
        "--from-json",
        nargs="+",
        metavar="JSON",
        help="measure nothing: build the report from earlier --json files (e.g. one per --only section)",
    )
    args = parser.parse_args(argv)
    report = merge([_load_json(path) for path in args.from_json]) if args.from_json else run(args)
    text = markdown(report)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
    if args.splice:
        splice(report, args.splice)


if __name__ == "__main__":
    main()
