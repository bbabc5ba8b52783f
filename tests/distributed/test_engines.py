"""2 CPU ranks (gloo) on DDP, FSDP2, FSDP1 and DeepSpeed: the adapter trained equals one process's, and is whole.

Each test starts one 2-rank job of ``train_worker.py`` (torchrun or accelerate launch with a
config from ``configs/accelerate/``) and compares its files with the 1-process reference
trained in the test process over the same global batches (fp32, atol 1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch
from launch import accelerate_launch, check, torchrun
from safetensors.torch import load_file

from peftcore import PeftModel
from peftcore.testing import tiny_model

ATOL = 1e-5
WEIGHTS = "adapter_model.safetensors"


def adapter_files(out):
    """What the job saved: rank 0's folder; rank 1 called save_pretrained too and must have written nothing."""
    assert not (out / "adapter_rank1").exists(), "rank 1 wrote files"
    folder = out / "adapter_rank0"
    assert {"adapter_config.json", WEIGHTS} <= {p.name for p in folder.iterdir()}
    return folder


def assert_same_adapter(folder, reference):
    ours, theirs = load_file(folder / WEIGHTS), load_file(reference / WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape, key
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    # the reference moved away from its init, so equality means the runs trained alike
    assert any(theirs[k].abs().max() > 0.01 for k in theirs)


def assert_loads_like(folder, reference):
    """PEFT-format folder: from_pretrained on a fresh base gives the reference adapter's outputs."""
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(9))
    outputs = []
    for path in (folder, reference):
        model = PeftModel.from_pretrained(tiny_model("llama")[0], str(path)).eval()
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=0)


def facts(out, rank):
    return json.loads((out / f"rank{rank}.json").read_text())


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning"])
def test_ddp_torchrun_trains_the_one_process_adapter(tmp_path, references, method):
    check(torchrun("train_worker.py", "--engine", "ddp", "--method", method, "--out", str(tmp_path)))
    assert facts(tmp_path, 0)["world"] == 2 and facts(tmp_path, 0)["losses"] != facts(tmp_path, 1)["losses"]
    folder = adapter_files(tmp_path)
    assert_same_adapter(folder, references(method))
    assert_loads_like(folder, references(method))


def test_ddp_adalora_ranks_allocate_alike_and_save_the_one_process_adapter(tmp_path, references):
    check(torchrun("train_worker.py", "--engine", "ddp", "--method", "adalora", "--out", str(tmp_path)))
    folder = adapter_files(tmp_path)
    assert_same_adapter(folder, references("adalora"))
    assert_loads_like(folder, references("adalora"))
    patterns = [facts(tmp_path, rank)["rank_pattern"] for rank in (0, 1)]
    assert patterns[0] == patterns[1]  # the masks every rank applied
    masks = [m for mask in patterns[0].values() for m in mask]
    assert 0 < masks.count(False) < len(masks)  # some ranks were pruned, not all
    saved = json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    expected = json.loads((references("adalora") / "adapter_config.json").read_text())["rank_pattern"]
    assert saved == expected


def test_accelerate_ddp_trains_the_one_process_adapter(tmp_path, references):
    check(accelerate_launch("ddp.yaml", "train_worker.py", "--engine", "accelerate", "--method", "lora",
                            "--out", str(tmp_path)))
    assert facts(tmp_path, 1)["world"] == 2
    assert_same_adapter(adapter_files(tmp_path), references("lora"))


def test_fsdp2_saves_the_whole_adapter_and_loads_back_into_shards(tmp_path, references):
    check(torchrun("train_worker.py", "--engine", "fsdp2", "--method", "lora", "--out", str(tmp_path)))
    assert facts(tmp_path, 0)["sharded_adapter_tensors"] > 0  # the adapter really was split across ranks
    folder = adapter_files(tmp_path)
    assert_same_adapter(folder, references("lora"))
    # a fresh model, sharded first, then loaded: it holds the file's tensors and computes the reference's logits
    saved, held = load_file(folder / WEIGHTS), load_file(tmp_path / "reloaded_adapter.safetensors")
    assert sorted(saved) == sorted(held) and all(torch.equal(saved[k], held[k]) for k in saved)
    import train_worker

    reference = PeftModel.from_pretrained(tiny_model("llama")[0], str(references("lora"))).eval()
    batch = train_worker.global_batches()[0]
    for rank in (0, 1):
        with torch.no_grad():
            expected = reference(input_ids=train_worker.local_rows(batch, rank, 2)).logits
        got = load_file(tmp_path / f"reloaded_logits_rank{rank}.safetensors")["logits"]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_saves_the_complete_trained_adapter(tmp_path, references, stage, deepspeed_ops):
    pytest.importorskip("deepspeed")
    check(accelerate_launch(f"deepspeed_zero{stage}.yaml", "train_worker.py", "--engine", "accelerate",
                            "--method", "lora", "--out", str(tmp_path), timeout=150))
    if stage == 3:  # partitioned: without gathering the file held empty tensors (peft #2500)
        assert facts(tmp_path, 0)["sharded_adapter_tensors"] > 0
    assert_same_adapter(adapter_files(tmp_path), references("lora"))


def test_a_killed_rank_ends_the_job_with_an_error_instead_of_a_hang(tmp_path):
    result = torchrun("crash_worker.py", str(tmp_path), timeout=90)
    assert not result.timed_out, "the surviving rank hung"
    assert result.returncode != 0
    assert not (tmp_path / "rank0-finished").exists()
    for rank in (0, 1):
        pid = int((tmp_path / f"pid{rank}").read_text())
        assert not _alive(pid), f"rank {rank} (pid {pid}) outlived the job"


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead, only not yet reaped by its (killed) parent
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
