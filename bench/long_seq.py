"""Long sequences (``bench/run.py --only long``): a LoRA step at batch 1 x 512 ... 4,096 tokens, peft vs peftcore.

Each point (library, gradient checkpointing on/off, tokens) is one fresh worker
process (``worker.py long``): one warm-up step, then ``--long-reps`` timed steps;
its peak RSS above the loaded model covers all of them. Rounds repeat every point,
the two libraries next to each other. Before each process the free memory is
checked against what that point should need (scaled from the same library's
last, shorter point): a point that would not fit is skipped and reported, not
risked on a shared machine. One ``peftcore apply`` run at the longest length then
checks that the CLI trains within the memory measured here.
"""

from __future__ import annotations

import statistics
import time

LIBS = ("peft", "peftcore")
TOKENS = (512, 1024, 2048, 4096)
HEADROOM_MIB = 2048  # left free for everyone else on the machine
TARGET_TOKENS = 2048
MEMORY_LIMITS = {True: 0.33, False: 0.5}  # peftcore / peft peak at TARGET_TOKENS, by checkpointing


def label(lib: str, checkpointing: bool, tokens: int) -> str:
    return f"{lib} {'checkpointed' if checkpointing else 'plain'} {tokens}"


def available_mib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable; memory checks need Linux")


def estimate_mib(done: dict[str, list[dict]], lib: str, checkpointing: bool, tokens: int) -> float | None:
    """Loaded model + peak, scaled linearly from this library's longest shorter point (None: nothing to go on)."""
    shorter = [n for n in TOKENS if n < tokens and done.get(label(lib, checkpointing, n))]
    if not shorter:
        return None
    base = max(shorter)
    runs = done[label(lib, checkpointing, base)]
    peak = max(r["values"]["peak_above_loaded_mib"] for r in runs)
    loaded = max(r["values"]["loaded_mib"] for r in runs)
    return loaded + peak * tokens / base * 1.15


def measure(worker, rounds: int, reps: int, tokens: tuple[int, ...], log) -> dict:
    """``worker(workload, lib, *args, memory=..., timeout=...)`` runs one process; returns the section's raw data."""
    done: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    for r in range(rounds):
        for n in tokens:
            for checkpointing in (False, True):
                for lib in LIBS:
                    key = label(lib, checkpointing, n)
                    need, free = estimate_mib(done, lib, checkpointing, n), available_mib()
                    if need is not None and need > free - HEADROOM_MIB:
                        skipped[key] = f"needs ~{need / 1024:.1f} GiB, {free / 1024:.1f} GiB available"
                        log(f"  round {r + 1}/{rounds} {key:<28} skipped: {skipped[key]}")
                        continue
                    args = ["--tokens", str(n), "--reps", str(reps)] + (["--checkpointing"] if checkpointing else [])
                    start = time.perf_counter()
                    done.setdefault(key, []).append(worker("long", lib, *args, memory=True, timeout=4 * 3600))
                    log(f"  round {r + 1}/{rounds} {key:<28} {time.perf_counter() - start:7.1f}s")
    cli = None
    longest = max(tokens)
    measured = done.get(label("peftcore", False, longest))
    if measured:  # the CLI trains like that point, and holds a second model for its reload check
        loaded = max(r["values"]["loaded_mib"] for r in measured)
        need = 2 * loaded + max(r["values"]["peak_above_loaded_mib"] for r in measured)
    if measured and need <= available_mib() - HEADROOM_MIB:
        start = time.perf_counter()
        cli = worker("apply_cli", "peftcore", "--tokens", str(longest), memory=True, timeout=4 * 3600)
        cli["values"]["tokens"] = longest
        log(f"  peftcore apply at {longest} tokens {time.perf_counter() - start:7.1f}s")
    return {"raw": done, "skipped": skipped, "cli": cli, "tokens": list(tokens), "rounds": rounds, "reps": reps}


# -- figures ----------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def point(section: dict, lib: str, checkpointing: bool, tokens: int) -> dict | None:
    runs = section["raw"].get(label(lib, checkpointing, tokens))
    if not runs:
        return None
    return {
        "peak": _stats([r["values"]["peak_above_loaded_mib"] for r in runs]),
        "loaded": _stats([r["values"]["loaded_mib"] for r in runs]),
        "wall": _stats([t for r in runs for t in r["times"]]),
        "cpu": _stats([t for r in runs for t in r["values"]["cpu_times"]]),
    }


def round_ratios(section: dict, checkpointing: bool, tokens: int, clock: str) -> list[float]:
    """Per round: peftcore's median step time / peft's, from the two processes run next to each other."""
    mine = section["raw"].get(label("peftcore", checkpointing, tokens), [])
    theirs = section["raw"].get(label("peft", checkpointing, tokens), [])
    key = (lambda r: r["times"]) if clock == "wall" else (lambda r: r["values"]["cpu_times"])
    return [statistics.median(key(a)) / statistics.median(key(b)) for a, b in zip(mine, theirs)]


def ratio(section: dict, checkpointing: bool, tokens: int, what: str) -> float | None:
    mine, theirs = point(section, "peftcore", checkpointing, tokens), point(section, "peft", checkpointing, tokens)
    if mine is None or theirs is None:
        return None
    return mine[what]["median"] / theirs[what]["median"]


def _mib(s: dict | None) -> str:
    if s is None:
        return "skipped"
    spread = f" ({s['min']:.0f}-{s['max']:.0f})" if s["n"] > 1 and s["max"] - s["min"] >= 1 else ""
    return f"{s['median']:.0f} MiB{spread}"


def _seconds(s: dict | None) -> str:
    return "-" if s is None else f"{s['median']:.1f} s ({s['min']:.1f}-{s['max']:.1f}, n={s['n']})"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(section: dict) -> list[str]:
    tokens = section["tokens"]
    lines = [
        "## Long sequences: peak memory and step time vs sequence length",
        "",
        "One LoRA training step (forward + backward + AdamW) at batch 1 x N tokens, causal LM loss, with and without "
        "gradient checkpointing (non-reentrant, the same call on both sides). peftcore computes the loss chunk by "
        "chunk from the final hidden states (`peftcore/lm_loss.py`); peft lets transformers build the full logits. "
        f"Each point: {section['rounds']} round(s) x one fresh process (one warm-up step, then {section['reps']} "
        "timed step(s)); peak RSS above the loaded model over all its steps, glibc told to return freed blocks (both "
        "libraries alike). Step times are wall clock and process CPU time; the ratio column divides peftcore's median "
        "by peft's, with the min-max over the rounds' pairs of neighbouring processes.",
        "",
    ]
    for checkpointing in (False, True):
        lines += [
            f"### {'With' if checkpointing else 'Without'} gradient checkpointing",
            "",
            "| tokens | peft peak | peftcore peak | memory / peft | peft step (wall) | peftcore step (wall) | "
            "time / peft (wall) | time / peft (CPU) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n in tokens:
            mine, theirs = point(section, "peftcore", checkpointing, n), point(section, "peft", checkpointing, n)
            cells = []
            for clock in ("wall", "cpu"):
                pairs = round_ratios(section, checkpointing, n, clock)
                spread = f" ({min(pairs):.2f}-{max(pairs):.2f})" if len(pairs) > 1 else ""
                cells.append(_x(ratio(section, checkpointing, n, clock)) + (spread if pairs else ""))
            lines.append(
                f"| {n} | {_mib(theirs and theirs['peak'])} | {_mib(mine and mine['peak'])} | "
                f"{_x(ratio(section, checkpointing, n, 'peak'))} | {_seconds(theirs and theirs['wall'])} | "
                f"{_seconds(mine and mine['wall'])} | {cells[0]} | {cells[1]} |"
            )
        lines.append("")
    for key, reason in sorted(section["skipped"].items()):
        lines.append(f"- {key}: skipped in a round ({reason}).")
    lines += _growth(section) + _cli(section)
    return lines


def _growth(section: dict) -> list[str]:
    """How each library's peak grows per 1,000 tokens (least squares over the measured points)."""
    out = []
    for checkpointing in (False, True):
        parts = []
        for lib in LIBS:
            pts = [(n, point(section, lib, checkpointing, n)) for n in section["tokens"]]
            pts = [(n, p["peak"]["median"]) for n, p in pts if p is not None]
            if len(pts) < 2:
                continue
            mean_n = statistics.mean(n for n, _ in pts)
            mean_m = statistics.mean(m for _, m in pts)
            slope = sum((n - mean_n) * (m - mean_m) for n, m in pts) / sum((n - mean_n) ** 2 for n, _ in pts)
            parts.append(f"{lib} {slope * 1000:.0f} MiB")
        if parts:
            setting = "with" if checkpointing else "without"
            out.append(f"- Growth per 1,000 tokens {setting} checkpointing (least squares): {', '.join(parts)}.")
    return out + ([""] if out else [])


def _cli(section: dict) -> list[str]:
    cli = section.get("cli")
    if not cli:
        return []
    n = cli["values"]["tokens"]
    bench = point(section, "peftcore", False, n)
    total = None if bench is None else bench["loaded"]["median"] + bench["peak"]["median"]
    lines = [
        f"`{cli['values']['command']}` (training examples of {n} tokens, then the held-out loss, generation, "
        f"saving and the reload check with a second copy of the model): peak RSS of the whole process "
        f"{cli['values']['peak_total_mib']:.0f} MiB, {cli['times'][0]:.0f} s.",
    ]
    if total is not None:
        lines.append(
            f"The benchmark's peftcore step at {n} tokens without checkpointing peaks at {total:.0f} MiB in all "
            f"(loaded model {bench['loaded']['median']:.0f} MiB + {bench['peak']['median']:.0f} MiB): the CLI "
            f"needs {cli['values']['peak_total_mib'] / total:.2f}x that."
        )
    return lines + [""]


def targets(section: dict) -> list[tuple[str, float | None, float]]:
    """Issue 14's targets at TARGET_TOKENS: (name, measured, limit)."""
    rows = []
    for checkpointing in (True, False):
        setting = "with" if checkpointing else "without"
        rows.append((f"peak memory at {TARGET_TOKENS} tokens / peft's, {setting} checkpointing",
                     ratio(section, checkpointing, TARGET_TOKENS, "peak"), MEMORY_LIMITS[checkpointing]))
        rows.append((f"step time (wall) at {TARGET_TOKENS} tokens / peft's, {setting} checkpointing",
                     ratio(section, checkpointing, TARGET_TOKENS, "wall"), 1.0))
    return rows
