"""The benchmark harness's arithmetic and its GPU script's smoke mode (no timing is asserted).

Worker results are made up here, so every ratio the report prints can be worked out
by hand: "/ base" is the median of per-pair ratios within a process, "/ peft" the
quotient of two libraries' "/ base".
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"peftcore_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run():
    return _load("run")


def _raw():
    # two rounds (processes) per library; each pairs its own runs with base runs
    return {
        "peft": [{"times": [1.2, 1.4], "base_times": [1.0, 1.0]}, {"times": [2.6], "base_times": [2.0]}],
        "peftcore": [{"times": [1.1, 1.05], "base_times": [1.0, 1.0]}, {"times": [2.4], "base_times": [2.0]}],
    }


def test_ratios_come_from_pairs_in_the_same_process(run):
    section = run._timed(_raw())
    # peft pairs: 1.2, 1.4, 1.3 -> median 1.3; peftcore pairs: 1.1, 1.05, 1.2 -> median 1.1
    assert run.vs_base(section, "peft") == pytest.approx(1.3)
    assert run.vs_base(section, "peftcore") == pytest.approx(1.1)
    assert run.relative(section, "peftcore", "peft") == pytest.approx(1.1 / 1.3)
    # the base row pools every process's base runs
    assert section["base"]["n"] == 6 and section["base"]["median"] == pytest.approx(1.0)
    assert section["peftcore"]["median"] == pytest.approx(1.1) and section["peftcore"]["max"] == pytest.approx(2.4)
    assert run.vs_base(section, "missing") is None and run.relative(section, "peftcore", "missing") is None


def test_targets_say_met_or_missed_from_the_paired_ratios(run):
    report = {"sections": {"train": run._timed(_raw())}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in run.targets(report) if line.startswith("| training")}
    assert "1.100x" in rows["training step / frozen-base fwd+bwd"] and rows[
        "training step / frozen-base fwd+bwd"
    ].endswith("met |")
    assert "0.846x" in rows["training step / peft's step"] and rows["training step / peft's step"].endswith("met |")
    slow = _raw()
    slow["peftcore"] = [{"times": [1.3], "base_times": [1.0]}]
    rows = [line for line in run.targets({"sections": {"train": run._timed(slow)}}) if line.startswith("| training")]
    assert all(line.endswith("missed |") for line in rows)


def test_markdown_report_renders_every_section(run):
    timed = run._timed(_raw())
    mixed = run._timed({"peftcore K=1": _raw()["peftcore"], "peftcore K=16": _raw()["peft"]})
    ops = {
        op: run._stats([0.1, 0.2]) for op in ("attach", "load", "hotswap", "merge_and_unload", "add_2nd", "add_16th")
    }
    ops = {f"{op} {clock}": s for op, s in ops.items() for clock in ("wall", "cpu")}
    report = {
        "sections": {"train": timed, "infer": timed, "mixed": mixed, "ops": {"peft": ops, "peftcore": ops},
                     "train_mem": {"base": run._stats([400.0]), "peftcore": run._stats([440.0])}},
        "environment": run.environment(), "started": "s", "finished": "f", "load_before": (0.0, 0.0, 0.0),
        "load_after": (0.0, 0.0, 0.0), "command": "python bench/run.py",
    }
    text = run.markdown(report)
    for heading in ("## Training step", "## Peak training memory", "## Inference", "## Mixed-adapter batches",
                    "## Attaching, loading", "## Targets"):
        assert heading in text
    assert "| peak training memory / frozen base's | 1.100x | <= 1.25x | met |" in text
    # K=16 here is peft's figures (1.3x base) against K=1 (1.1x): growth 1.3 / 1.1 - 1
    assert f"{(1.3 / 1.1 - 1) * 100:+.1f}%" in text


@pytest.mark.slow
def test_gpu_script_smoke_mode_runs_on_cpu(tmp_path):
    """bench/gpu.py is meant for one run on a lent GPU; its CPU smoke mode keeps it from rotting."""
    env = dict(os.environ, PEFTCORE_LORA_TRITON="0", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--skip-models", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "gpu_bench.md").read_text().count("|") > 10


def _long_run(peak: float, wall: list[float], cpu: list[float], loaded: float = 500.0) -> dict:
    return {"times": wall, "values": {"peak_above_loaded_mib": peak, "loaded_mib": loaded, "cpu_times": cpu}}


def _long_section(long_seq, peftcore_peak_2048: float = 300.0) -> dict:
    raw = {}
    for checkpointing in (False, True):
        for n in (1024, 2048):
            scale = n / 1024 * (0.5 if checkpointing else 1.0)
            raw[long_seq.label("peft", checkpointing, n)] = [_long_run(1000 * scale, [10.0, 12.0], [20.0, 20.0]),
                                                             _long_run(1000 * scale, [14.0], [22.0])]
            mine = peftcore_peak_2048 if n == 2048 else 200.0
            raw[long_seq.label("peftcore", checkpointing, n)] = [_long_run(mine, [9.0, 9.0], [18.0, 18.0]),
                                                                 _long_run(mine, [15.0], [21.0])]
    return {"raw": raw, "skipped": {"peft plain 4096": "needs ~9.9 GiB, 3.0 GiB available"}, "cli": None,
            "tokens": [1024, 2048, 4096], "rounds": 2, "reps": 2}


def test_long_section_ratios_targets_and_skipped_points(run):
    long_seq = run.long_seq
    section = _long_section(long_seq)
    # peak: 300 / 2000 without checkpointing, 300 / 1000 with; wall medians 9 / 12 over all steps of both rounds
    assert long_seq.ratio(section, False, 2048, "peak") == pytest.approx(0.15)
    assert long_seq.ratio(section, True, 2048, "peak") == pytest.approx(0.3)
    assert long_seq.ratio(section, False, 2048, "wall") == pytest.approx(9.0 / 12.0)
    # per round: round 1 medians 9 / 11, round 2 15 / 14
    assert long_seq.round_ratios(section, False, 2048, "wall") == pytest.approx([9 / 11, 15 / 14])
    rows = {name: (value, limit) for name, value, limit in long_seq.targets(section)}
    assert rows["peak memory at 2048 tokens / peft's, with checkpointing"] == (pytest.approx(0.3), 0.33)
    text = "\n".join(run.targets({"sections": {"long": section}}))
    assert "## Targets (issue 14)" in text and "missed" not in text
    over = _long_section(long_seq, peftcore_peak_2048=700.0)
    assert "| peak memory at 2048 tokens / peft's, with checkpointing | 0.700x | <= 0.33x | missed |" in "\n".join(
        run.targets({"sections": {"long": over}})
    )
    page = "\n".join(long_seq.markdown(section))
    assert "| 4096 | skipped | skipped |" in page and "peft plain 4096: skipped" in page
    assert "Growth per 1,000 tokens without checkpointing (least squares): peft 977 MiB, peftcore 98 MiB" in page


def test_long_section_skips_what_would_not_fit(run, monkeypatch):
    long_seq = run.long_seq
    calls = []

    def worker(workload, lib, *args, memory, timeout):
        calls.append((workload, lib, args))
        tokens = int(args[args.index("--tokens") + 1])
        return _long_run(tokens * (1.0 if lib == "peft" else 0.5), [1.0], [1.0], loaded=600.0)

    monkeypatch.setattr(long_seq, "available_mib", lambda: 2048 + 5000.0)
    section = long_seq.measure(worker, rounds=1, reps=1, tokens=(1024, 2048, 4096), log=lambda msg: None)
    # peft at 4096 would need 600 + 2048 * 2 * 1.15 MiB > 5000 MiB: skipped; everything else ran
    assert set(section["skipped"]) == {"peft plain 4096", "peft checkpointed 4096"}
    assert ("long", "peftcore", ("--tokens", "4096", "--reps", "1")) in calls
    assert calls[-1][0] == "apply_cli" and section["cli"]["values"]["tokens"] == 4096
