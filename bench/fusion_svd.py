"""Factored vs dense SVD merge of LoRA adapters (``add_weighted_adapter(combination_type="svd")``).

``python bench/fusion_svd.py [--reps 3] [--json PATH] [--markdown PATH]``

Workload: 8 adapters of rank 64 on one 4096 x 11008 layer (a 7B model's MLP projection), weights
1/8 each, merged to rank 64. Three ways, each repetition in a fresh process (``--worker``), the
ways interleaved repetition by repetition so that load on the shared machine hits all of them:

- ``factored``: peftcore-fusion (QR of the stacked factors, SVD of the 512 x 512 core);
- ``dense``: PEFT's algorithm (every ΔWᵢ dense, stacked and summed, ``torch.linalg.svd`` with
  ``full_matrices=True``, PEFT's default), written out here step by step;
- ``dense-reduced``: the same with ``full_matrices=False``, the cheapest dense variant.

Time is the wall time of the merge alone; memory is the peak resident set size during the
merge above the resident size just before it (the adapters already in memory), with glibc told
to return freed blocks (the same for all). Ratios: dense / factored (time), and factored peak /
the adapters' own bytes. The run also checks that the three agree (singular values, product).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

ADAPTERS, RANK, OUT_FEATURES, IN_FEATURES = 8, 64, 4096, 11008
# One thread for every way: with two, MKL's LAPACK (QR, SVD) on this shared 2-core machine slows down
# 10-30x whenever the other core is busy (threads waiting on each other), which would measure the load.
THREADS = 1
WAYS = ("factored", "dense", "dense-reduced")


def _deltas():
    import torch

    from peftcore.layer import LowRankDelta

    g = torch.Generator().manual_seed(0)
    return [LowRankDelta(up=torch.randn(OUT_FEATURES, RANK, generator=g) * 0.02,
                         down=torch.randn(RANK, IN_FEATURES, generator=g) * 0.02, scale=2.0) for _ in range(ADAPTERS)]


def _dense_merge(deltas, weights, full_matrices: bool):
    """PEFT's svd path: get_delta_weight per adapter, task_arithmetic (stack, weight, sum), svd, truncate."""
    import torch

    dense = [(d.up @ d.down) * d.scale for d in deltas]
    stacked = torch.stack(dense)
    del dense
    merged = (stacked * torch.tensor(weights).view(-1, 1, 1)).sum(dim=0)
    del stacked
    u, s, vh = torch.linalg.svd(merged, full_matrices=full_matrices)
    return u[:, :RANK] @ torch.diag(s[:RANK]), vh[:RANK], s


def worker(way: str) -> dict:
    import torch

    from peftcore_fusion.low_rank import factored_svd

    common.setup_torch()
    torch.set_num_threads(THREADS)
    deltas = _deltas()
    weights = [1.0 / ADAPTERS] * ADAPTERS
    adapter_bytes = sum(d.up.numel() + d.down.numel() for d in deltas) * 4
    common.reset_peak_rss()
    before = common.rss_mib()
    start = time.perf_counter()
    if way == "factored":
        up, down, singular = factored_svd(deltas, weights, RANK)
    else:
        up, down, singular = _dense_merge(deltas, weights, full_matrices=(way == "dense"))
    seconds = time.perf_counter() - start
    peak = common.peak_rss_mib() - before
    # a fingerprint of the result, compared across ways by the parent: top singular values and a probe
    probe = torch.randn(IN_FEATURES, 4, generator=torch.Generator().manual_seed(1))
    return {"way": way, "seconds": seconds, "peak_mib": peak, "adapter_mib": adapter_bytes / 2**20,
            "singular": singular[:RANK].tolist(), "probe": (up @ (down @ probe)).flatten().tolist()}


def _run_worker(way: str) -> dict:
    env = common.env_for_worker()
    env.update({"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)})
    env.update(common.malloc_env())
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", way], capture_output=True, text=True,
                          env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"worker {way} failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def _agreement(results: dict[str, list[dict]]) -> dict[str, float]:
    import torch

    ref = results["dense"][0]
    out = {}
    for way in WAYS:
        got = results[way][0]
        s_ref, s_got = torch.tensor(ref["singular"]), torch.tensor(got["singular"])
        p_ref, p_got = torch.tensor(ref["probe"]), torch.tensor(got["probe"])
        out[way] = max(((s_got - s_ref).abs().max() / s_ref.abs().max()).item(),
                       ((p_got - p_ref).abs().max() / p_ref.abs().max()).item())
    return out


def _summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def markdown(report: dict) -> str:
    res, load = report["results"], report["load"]
    lines = [
        "## Merging adapters: factored vs dense SVD",
        "",
        f"Run {report['started']} - {report['finished']}; load average before {load['before']}, after "
        f"{load['after']} (shared machine: the ways run interleaved, so load hits each alike).",
        f"Command: `{report['command']}`. {ADAPTERS} LoRA adapters of rank {RANK} on one {OUT_FEATURES} x "
        f"{IN_FEATURES} layer, weights 1/{ADAPTERS}, merged to rank {RANK} "
        '(`add_weighted_adapter(..., combination_type="svd")`). Each repetition a fresh process, '
        f"{THREADS} thread; time = the merge alone; peak = peak RSS during the merge above the RSS before it "
        "(adapters already loaded).",
        "",
        "| | n | time: median (min - max) | / factored | peak memory: median (min - max) | / adapters' memory | "
        "agrees with dense |",
        "|---|---|---|---|---|---|---|",
    ]
    factored_time = statistics.median(r["seconds"] for r in res["factored"])
    adapter_mib = res["factored"][0]["adapter_mib"]
    for way in WAYS:
        t, t_lo, t_hi = _summary([r["seconds"] for r in res[way]])
        m, m_lo, m_hi = _summary([r["peak_mib"] for r in res[way]])
        lines.append(f"| {way} | {len(res[way])} | {t:.2f} s ({t_lo:.2f} - {t_hi:.2f}) | {t / factored_time:.1f}x | "
                     f"{m:.0f} MiB ({m_lo:.0f} - {m_hi:.0f}) | {m / adapter_mib:.2f}x | "
                     f"{report['agreement'][way]:.1e} |")
    lines += ["", f"The adapters themselves hold {adapter_mib:.1f} MiB. \"agrees with dense\": the largest relative "
              "difference from the dense result in the top singular values and in the merged product applied to a "
              "probe. Time ratios are quotients of medians over all repetitions.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=WAYS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--full-reps", type=int, help="repetitions of the slowest way, dense [default: --reps]")
    parser.add_argument("--json")
    parser.add_argument("--markdown", help="write the section to this file (replacing a previous one)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    started, load_before = datetime.datetime.now().isoformat(timespec="seconds"), os.getloadavg()
    results: dict[str, list[dict]] = {way: [] for way in WAYS}
    full_reps = args.reps if args.full_reps is None else args.full_reps
    for rep in range(args.reps):
        for way in WAYS:
            if way == "dense" and rep >= full_reps:
                continue
            results[way].append(_run_worker(way))
            print(f"rep {rep + 1}/{args.reps} {way:<14} {results[way][-1]['seconds']:7.2f} s  "
                  f"{results[way][-1]['peak_mib']:7.0f} MiB  (load {os.getloadavg()[0]:.1f})", flush=True)
    report = {"started": started, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
              "load": {"before": "/".join(f"{x:.1f}" for x in load_before),
                       "after": "/".join(f"{x:.1f}" for x in os.getloadavg())},
              "command": "python bench/fusion_svd.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": results}
    report["agreement"] = _agreement(results)
    text = markdown(report)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.markdown:
        _replace_section(args.markdown, text)


def _replace_section(path: str, section: str) -> None:
    """Put ``section`` in ``path`` in place of an earlier copy of it (or at the end)."""
    title = section.splitlines()[0]
    text = open(path).read() if os.path.exists(path) else ""
    if title in text:
        start = text.index(title)
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
