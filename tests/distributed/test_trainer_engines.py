"""PeftTrainer on 2 CPU ranks: adapter-only saves that hold the whole trained adapter, and exact resumes."""

from __future__ import annotations

import pytest
import torch
from launch import REPO, check, torchrun
from safetensors.torch import load_file

WEIGHTS = "adapter_model.safetensors"


def disk_name(param_name: str) -> str:
    return param_name.replace(".default.", ".")


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_peft_trainer_saves_whole_adapters_and_resumes_identically(tmp_path, engine, request):
    args = ["--out", str(tmp_path)]
    if engine != "ddp":
        pytest.importorskip("deepspeed")
        request.getfixturevalue("deepspeed_ops")
        args += ["--deepspeed", str(REPO / "configs" / "deepspeed" / f"{engine}.json")]
    check(torchrun("trainer_worker.py", *args, timeout=180))

    trained = {disk_name(k): v for k, v in load_file(tmp_path / "trained.safetensors").items()}
    final = load_file(tmp_path / "final" / WEIGHTS)
    assert sorted(final) == sorted(trained)  # complete: every trained tensor, nothing else
    for key, tensor in trained.items():
        assert final[key].shape == tensor.shape, key
        torch.testing.assert_close(final[key], tensor, atol=0, rtol=0, msg=key)
    assert any(v.abs().max() > 0.01 for k, v in final.items() if "lora_B" in k)  # B left zero: it trained

    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert (checkpoint / WEIGHTS).is_file() and not (checkpoint / "model.safetensors").exists()
    last = load_file(tmp_path / "run" / "checkpoint-4" / WEIGHTS)
    assert all(torch.equal(last[k], final[k]) for k in final)

    resumed = load_file(tmp_path / "resumed" / WEIGHTS)
    for key in final:  # steps 3-4 replayed from checkpoint 2 (weights, optimizer, schedule, data order)
        torch.testing.assert_close(resumed[key], final[key], atol=1e-5, rtol=0, msg=key)
