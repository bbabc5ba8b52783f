"""``peftcore apply --nproc-per-node 2``: the quick start on 2 CPU processes matches the 1-process run."""

from __future__ import annotations

import json
import sys

import pytest
from launch import check, run_job


def apply(out, *extra):
    result = run_job([sys.executable, "-m", "peftcore.cli", "apply", "lora", "--out", str(out), "--json", *extra],
                     timeout=900)
    check(result)
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.mark.slow
def test_quickstart_on_two_processes_reaches_the_one_process_accuracy(tmp_path):
    two = apply(tmp_path / "two", "--nproc-per-node", "2")
    one = apply(tmp_path / "one")
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["accuracy"]["after"] >= 0.9
    # different dropout masks per rank and a split last batch: equal within noise, not bit for bit
    assert abs(two["accuracy"]["after"] - one["accuracy"]["after"]) <= 0.03
    assert two["reload_max_abs_diff"] <= 1e-5
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]  # one adapter, written once
