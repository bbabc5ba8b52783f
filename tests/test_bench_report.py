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
