"""GPU benchmark of the LoRA paths, meant to run in one go on an H100: ``python bench/gpu.py``.

Compares, on CUDA, for the same shapes and inputs:
- ``base``: the frozen layer/model alone;
- ``unfused``: PEFT's formula, ``base(x) + B(A(x)) * s`` as separate ops (what peft runs);
- ``torch-fused``: peftcore's fused autograd function with PyTorch matmuls
  (``PEFTCORE_LORA_TRITON=0``);
- ``triton``: peftcore's Triton kernels (the default on CUDA).

Sections: (1) one LoRA linear, forward and forward+backward, several shapes and
dtypes, with a correctness check of every variant against fp32 maths first;
(2) mixed-adapter batches (K = 1, 4, 16) -- peft's per-adapter loop, the grouped
PyTorch path, the segmented Triton kernel; (3) whole models (SmolLM2-135M shape and a
1.1B Llama shape, random weights, bf16) with peft and peftcore, each in a fresh
process: training step time and peak memory, unmerged inference, a 16-adapter
mixed batch; (4) QLoRA: the same two shapes loaded 4-bit (NF4, double quantisation, bf16
compute) through bitsandbytes, LoRA r=16 on the attention and MLP projections, training step
time and peak memory for the frozen base, peft and peftcore, each in a fresh process.

Writes a markdown report to stdout and, with ``--out DIR`` (default ``$OUT`` when
set), ``gpu_bench.md`` and ``gpu_bench.json`` there. ``--smoke`` runs tiny shapes on
CPU (no Triton, unless TRITON_INTERPRET=1) to check the script itself.
No GPU was available where this was written: the script has only run in ``--smoke``.
In particular the QLoRA GPU workloads have never run on a GPU; in ``--smoke`` they run the
tiny shapes on bitsandbytes' CPU backend with fp32 compute (skipped, with the reason, when
that backend cannot train a 4-bit layer). On a bf16 4-bit model both libraries keep the
adapters in fp32, and peftcore-bnb's fused 4-bit path needs adapters in the input's dtype:
the bf16 QLoRA rows measure peftcore's plain path (checked on CPU: no fused call there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))

MODEL_SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-1.1b": (2048, 5632, 22, 32, 4, 32000),
}


# -- timing ----------------------------------------------------------------------------


def bench_ms(fn, device: str, reps: int = 20, warmup: int = 5) -> dict:
    """Median / min / max milliseconds of ``fn`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def peak_mib(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# -- section 1: one LoRA linear ---------------------------------------------------------------


def _variants(triton_ok: bool):
    from peftcore_lora import fast, kernels

    def base(x, W, A, B, s):
        return F.linear(x, W)

    def unfused(x, W, A, B, s):
        return F.linear(x, W) + F.linear(F.linear(x, A), B) * s

    def torch_fused(x, W, A, B, s):
        return fast.FusedLoraLinear.apply(x, W, None, False, (s,), (0.0,), None, A, B, None)

    def triton(x, W, A, B, s):
        return kernels.TritonLoraLinear.apply(x, W, None, A, B, None, False, s, 0.0)

    out = {"base": base, "unfused": unfused, "torch-fused": torch_fused}
    if triton_ok:
        out["triton"] = triton
    return out


def layer_section(device: str, smoke: bool, triton_ok: bool) -> list[dict]:
    shapes = (
        [(64, 32, 48, 8)]
        if smoke
        else [(8192, 2048, 2048, 16), (8192, 2048, 5632, 16), (8192, 5632, 2048, 16), (4096, 4096, 4096, 64)]
    )
    dtypes = [torch.float32] if smoke else [torch.bfloat16, torch.float16, torch.float32]
    rows = []
    for dtype in dtypes:
        for n, d_in, d_out, r in shapes if dtype != torch.float32 or smoke else shapes[:1]:
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = (torch.randn(n, d_in, generator=gen) * 0.5).to(device, dtype)
            W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(device, dtype)
            A = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(device, dtype).requires_grad_()
            B = (torch.randn(d_out, r, generator=gen) * 0.1).to(device, dtype).requires_grad_()
            dy = torch.randn(n, d_out, generator=gen).to(device, dtype)
            s = 2.0
            ref = (x.double() @ W.double().T + s * (x.double() @ A.double().T) @ B.double().T)
            for name, fn in _variants(triton_ok).items():
                xg = x.clone().requires_grad_()
                y = fn(xg, W, A, B, s)
                err = None if name == "base" else (y.double() - ref).abs().max().item()

                def fwd(fn=fn):
                    with torch.no_grad():
                        fn(x, W, A, B, s)

                def fwd_bwd(fn=fn):
                    xg = x.detach().requires_grad_()
                    fn(xg, W, A, B, s).backward(dy)

                rows.append(
                    {
                        "dtype": str(dtype).replace("torch.", ""),
                        "shape": f"{n}x{d_in}->{d_out} r{r}",
                        "variant": name,
                        "max_abs_err_vs_fp64": err,
                        "fwd_ms": bench_ms(fwd, device),
                        "fwd_bwd_ms": bench_ms(fwd_bwd, device),
                        "fwd_bwd_peak_mib": peak_mib(fwd_bwd, device),
                    }
                )
                A.grad = B.grad = None
    return rows


# -- section 2: mixed batches ------------------------------------------------------------------


def mixed_section(device: str, smoke: bool, triton_ok: bool) -> list[dict]:
    from peftcore_lora import fast, kernels

    rows_n, T, d_in, d_out, r = (16, 8, 32, 48, 4) if smoke else (16, 256, 2048, 2048, 16)
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    x3 = torch.randn(rows_n, T, d_in, generator=gen).to(device, dtype)
    W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(device, dtype)
    out = []
    for k in (1, 4, 16):
        As = [(torch.randn(r, d_in, generator=gen) / d_in**0.5).to(device, dtype) for _ in range(k)]
        Bs = [(torch.randn(d_out, r, generator=gen) * 0.1).to(device, dtype) for _ in range(k)]
        picks = [row % k for row in range(rows_n)]

        def base():
            return F.linear(x3, W)

        def peft_loop():
            result = F.linear(x3, W)
            for i in range(k):
                rows = [row for row, p in enumerate(picks) if p == i]
                sub = x3[rows]
                result[rows] = result[rows] + F.linear(F.linear(sub, As[i]), Bs[i]) * 2.0
            return result

        def grouped():
            return F.linear(x3, W) + fast._grouped_delta(x3, As, Bs, [None] * k, [2.0] * k, picks)

        def segmented():
            return F.linear(x3, W) + kernels.segmented_lora(x3, As, Bs, [None] * k, [2.0] * k, picks)

        variants = {"base": base, "peft-loop": peft_loop, "grouped-torch": grouped}
        if triton_ok:
            variants["triton-segmented"] = segmented
        with torch.no_grad():
            reference = peft_loop().float()
            for name, fn in variants.items():
                err = None if name == "base" else (fn().float() - reference).abs().max().item()
                out.append({"K": k, "variant": name, "max_abs_err_vs_loop": err, "ms": bench_ms(fn, device)})
    return out


# -- section 3: whole models, one process per measurement ------------------------------------------


def _model(shape: str, device: str, dtype, smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = MODEL_SHAPES[shape]
    if smoke:
        hidden, inter, layers, heads, kv, vocab = 64, 128, 2, 4, 2, 256
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=2048,
        use_cache=False,
    )
    return LlamaForCausalLM(config).to(device, dtype), vocab


QLORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _qlora_model(shape: str, device: str, dtype, smoke: bool, lib: str):
    """The random-weight model saved once and loaded 4-bit (NF4, double quant, ``dtype`` compute), as a user loads it.

    Then ``lib``'s ``prepare_model_for_kbit_training`` (no checkpointing) and ``enable_input_require_grads``
    for every library, as in ``bench/run.py``'s qlora section.
    """
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, vocab = _model(shape, "cpu", dtype, smoke)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map=device, dtype=dtype)
    model.config.use_cache = False
    if lib == "peft":
        from peft import prepare_model_for_kbit_training
    else:
        from peftcore import prepare_model_for_kbit_training
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.enable_input_require_grads()
    return model, vocab


def _adamw_step(model, ids):
    """One training step of the trainable parameters: forward, causal-LM loss backward, AdamW (lr 1e-4)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def model_worker(args) -> dict:
    """One (model shape, library, workload) measurement; prints JSON."""
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.workload == "qlora_train":
        return qlora_worker(args, device, dtype)
    if args.lib == "peftcore-torch":
        os.environ["PEFTCORE_LORA_TRITON"] = "0"
    model, vocab = _model(args.shape, device, dtype, args.smoke)
    rows, tokens = (2, 16) if args.smoke else (8, 512)
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    lib = "peft" if args.lib == "peft" else "peftcore"
    if lib == "peft":
        from peft import LoraConfig, get_peft_model
    else:
        from peftcore import LoraConfig, get_peft_model
    config = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    result = {"shape": args.shape, "lib": args.lib, "workload": args.workload}
    if args.workload == "train":
        if args.lib == "base":
            model.requires_grad_(False)
            model.enable_input_require_grads()

            def step():
                model(input_ids=ids, labels=ids).loss.backward()
        else:
            model = get_peft_model(model, LoraConfig(**config))
            # PEFT keeps adapters of a bf16 model in fp32 (autocast_adapter_dtype); peftcore in the model's dtype
            step = _adamw_step(model, ids)

        model.train()
        result["ms"] = bench_ms(step, device, reps=5 if args.smoke else 10, warmup=2)
        result["peak_mib"] = peak_mib(step, device)
    else:
        model.eval()
        names = None
        if args.lib != "base":
            model = get_peft_model(model, LoraConfig(**config), adapter_name="a0")
            if args.workload == "mixed":
                for i in range(1, 16):
                    model.add_adapter(f"a{i}", LoraConfig(**config))
                names = [f"a{row % 16}" for row in range(rows)]
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.01)
            model.eval()
        kwargs = {"adapter_names": names} if names else {}

        def forward():
            with torch.no_grad():
                model(input_ids=ids, **kwargs)

        result["ms"] = bench_ms(forward, device, reps=5 if args.smoke else 20, warmup=2)
    return result


def qlora_worker(args, device: str, dtype) -> dict:
    """QLoRA training step: the 4-bit base (``base``: frozen, forward + backward) or LoRA r=16 on it + AdamW."""
    lib = "peft" if args.lib == "peft" else "peftcore"
    model, vocab = _qlora_model(args.shape, device, dtype, args.smoke, lib)
    rows, tokens = (2, 16) if args.smoke else (8, 512)
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    result = {"shape": args.shape, "lib": args.lib, "workload": args.workload}
    if args.lib == "base":

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
    else:
        if lib == "peft":
            from peft import LoraConfig, get_peft_model
        else:
            from peftcore import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=QLORA_TARGETS))
        step = _adamw_step(model, ids)

    model.train()
    result["ms"] = bench_ms(step, device, reps=3 if args.smoke else 10, warmup=1 if args.smoke else 2)
    result["peak_mib"] = peak_mib(step, device)
    return result


def _qlora_smoke_check() -> str | None:
    """None if bitsandbytes' CPU backend trains a tiny 4-bit layer here, else why not (the smoke run then skips)."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to("cpu")
        x = torch.randn(4, 64, requires_grad=True)
        layer(x).sum().backward()
        return None if x.grad is not None and torch.isfinite(x.grad).all() else "no finite input gradient"
    except Exception as error:  # ImportError, or whatever the backend raises
        return f"{type(error).__name__}: {error}"


def model_section(smoke: bool, triton_ok: bool) -> list[dict]:
    libs = ["base", "peft", "peftcore-torch"] + (["peftcore"] if triton_ok else [])
    shapes = ["smollm2-135m"] if smoke else list(MODEL_SHAPES)
    out = []
    for shape in shapes:
        for workload in ("train", "infer", "mixed"):
            for lib in libs:
                if workload == "mixed" and lib == "base":
                    continue
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--worker",
                    "--shape",
                    shape,
                    "--lib",
                    lib,
                    "--workload",
                    workload,
                ]
                if smoke:
                    cmd.append("--smoke")
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if done.returncode != 0:
                    out.append({"shape": shape, "lib": lib, "workload": workload, "error": done.stderr[-1500:]})
                    continue
                out.append(json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]))
                print(
                    f"  {shape} {workload} {lib}: {out[-1].get('ms', {}).get('median', '?')}",
                    file=sys.stderr,
                    flush=True,
                )
    return out


def qlora_section(smoke: bool) -> tuple[list[dict], str | None]:
    """QLoRA training steps, each (shape, library) in a fresh process; (rows, why skipped or None)."""
    if smoke:
        why = _qlora_smoke_check()
        if why is not None:
            print(f"QLoRA workloads skipped: bitsandbytes' CPU backend cannot train a 4-bit layer here ({why})",
                  file=sys.stderr, flush=True)
            return [], why
    out = []
    for shape in ["smollm2-135m"] if smoke else list(MODEL_SHAPES):
        for lib in ("base", "peft", "peftcore"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--shape", shape, "--lib", lib,
                   "--workload", "qlora_train"] + (["--smoke"] if smoke else [])
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                out.append({"shape": shape, "lib": lib, "workload": "qlora_train", "error": done.stderr[-1500:]})
                continue
            out.append(json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]))
            print(f"  {shape} qlora_train {lib}: {out[-1]['ms']['median']:.1f} ms", file=sys.stderr, flush=True)
    return out, None


# -- report -----------------------------------------------------------------------------------


def _fmt(ms: dict | None) -> str:
    return "-" if not ms else f"{ms['median']:.3f} ({ms['min']:.3f}-{ms['max']:.3f})"


def markdown(report: dict) -> str:
    lines = [
        "# LoRA on GPU: peftcore (Triton / PyTorch) vs peft",
        "",
        f"Device: {report['device']}; torch {report['torch']}, "
        f"triton {report['triton']}; command `{report['command']}`.",
        "",
    ]
    lines += [
        "## One LoRA linear (ms, median (min-max); ratio to the unfused peft formula)",
        "",
        "| dtype | shape | variant | fwd | fwd / unfused | fwd+bwd | fwd+bwd / unfused | peak MiB fwd+bwd "
        "| max err vs fp64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["dtype"], r["shape"], r["variant"]): r for r in report["layer"]}
    for r in report["layer"]:
        u = by_key.get((r["dtype"], r["shape"], "unfused"))
        rf = f"{r['fwd_ms']['median'] / u['fwd_ms']['median']:.2f}x" if u else "-"
        rb = f"{r['fwd_bwd_ms']['median'] / u['fwd_bwd_ms']['median']:.2f}x" if u else "-"
        peak = "-" if r["fwd_bwd_peak_mib"] is None else f"{r['fwd_bwd_peak_mib']:.0f}"
        err = "-" if r["max_abs_err_vs_fp64"] is None else f"{r['max_abs_err_vs_fp64']:.2e}"
        lines.append(
            f"| {r['dtype']} | {r['shape']} | {r['variant']} | {_fmt(r['fwd_ms'])} | {rf} | {_fmt(r['fwd_bwd_ms'])} "
            f"| {rb} | {peak} | {err} |"
        )
    lines += [
        "",
        "## Mixed batches (ms; one adapter per row)",
        "",
        "| K | variant | ms | / peft loop | max err vs loop |",
        "|---|---|---|---|---|",
    ]
    by_k = {(r["K"], r["variant"]): r for r in report["mixed"]}
    for r in report["mixed"]:
        loop = by_k.get((r["K"], "peft-loop"))
        ratio = f"{r['ms']['median'] / loop['ms']['median']:.2f}x" if loop else "-"
        err = "-" if r["max_abs_err_vs_loop"] is None else f"{r['max_abs_err_vs_loop']:.2e}"
        lines.append(f"| {r['K']} | {r['variant']} | {_fmt(r['ms'])} | {ratio} | {err} |")
    lines += ["", "## Whole models (bf16, batch 8x512; ms and peak MiB above the loaded model)", "",
              "| shape | workload | library | ms | / peft | / base | peak MiB |", "|---|---|---|---|---|---|---|"]
    by_m = {(r["shape"], r["workload"], r["lib"]): r for r in report["models"] if "ms" in r}
    for r in report["models"]:
        if "error" in r:
            lines.append(
                f"| {r['shape']} | {r['workload']} | {r['lib']} | failed: "
                f"{r['error'].splitlines()[-1] if r['error'] else '?'} | | | |"
            )
            continue
        p = by_m.get((r["shape"], r["workload"], "peft"))
        b = by_m.get((r["shape"], "infer" if r["workload"] == "mixed" else r["workload"], "base"))
        rp = f"{r['ms']['median'] / p['ms']['median']:.2f}x" if p else "-"
        rb = f"{r['ms']['median'] / b['ms']['median']:.2f}x" if b else "-"
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['shape']} | {r['workload']} | {r['lib']} | {_fmt(r['ms'])} | {rp} | {rb} | {peak} |")
    if "qlora" in report:
        lines += qlora_markdown(report)
    return "\n".join(lines) + "\n"


def qlora_markdown(report: dict) -> list[str]:
    lines = [
        "",
        "## QLoRA training step (4-bit NF4 double-quant base, bf16 compute (fp32 in --smoke); ms and peak MiB above "
        "the loaded model)",
        "",
        "Random weights saved once and loaded through `BitsAndBytesConfig(load_in_4bit=True, "
        'bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)`, '
        "each library's `prepare_model_for_kbit_training(use_gradient_checkpointing=False)` + "
        "`enable_input_require_grads()`, LoRA r=16 on q/k/v/o/gate/up/down, AdamW; batch 8x512. "
        "base = the frozen 4-bit model, forward + backward.",
        "",
    ]
    if report.get("qlora_skipped"):
        return lines + [f"Skipped: {report['qlora_skipped']}"]
    lines += ["| shape | library | ms | / peft | / base | peak MiB | / peft |", "|---|---|---|---|---|---|---|"]
    by = {(r["shape"], r["lib"]): r for r in report["qlora"] if "ms" in r}
    for r in report["qlora"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['lib']} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'}"
                         " | | | | |")
            continue
        p, b = by.get((r["shape"], "peft")), by.get((r["shape"], "base"))
        rp = f"{r['ms']['median'] / p['ms']['median']:.2f}x" if p else "-"
        rb = f"{r['ms']['median'] / b['ms']['median']:.2f}x" if b else "-"
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        mp = (f"{r['peak_mib'] / p['peak_mib']:.2f}x" if p and p.get("peak_mib") and r.get("peak_mib") is not None
              else "-")
        lines.append(f"| {r['shape']} | {r['lib']} | {_fmt(r['ms'])} | {rp} | {rb} | {peak} | {mp} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing useful"
    )
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-qlora", action="store_true", help="leave out the QLoRA (4-bit base) workloads")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="smollm2-135m", help=argparse.SUPPRESS)
    parser.add_argument("--lib", default="base", help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="train", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(model_worker(args)))
        return
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (use --smoke to check the script on CPU)")
    device = "cpu" if args.smoke else "cuda"
    from peftcore_lora import kernels

    triton_ok = kernels.usable(torch.zeros(1, device=device))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows compare fp32 with fp32
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print("one LoRA linear ...", file=sys.stderr, flush=True)
    report["layer"] = layer_section(device, args.smoke, triton_ok)
    print("mixed batches ...", file=sys.stderr, flush=True)
    report["mixed"] = mixed_section(device, args.smoke, triton_ok)
    report["models"] = [] if args.skip_models else model_section(args.smoke, triton_ok)
    if not args.skip_qlora:
        print("QLoRA training steps ...", file=sys.stderr, flush=True)
        report["qlora"], report["qlora_skipped"] = qlora_section(args.smoke)
    report["triton_fallback"] = kernels._broken
    text = markdown(report)
    if kernels._broken:
        text += f"\nTriton kernels failed and were switched off: {kernels._broken}\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_bench.md"), "w") as fh:
            fh.write(text)
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as fh:
            json.dump(report, fh, indent=2)


def _version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
