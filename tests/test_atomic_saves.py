"""An adapter folder is saved all-or-nothing: killed at any file operation, it loads as the old or the new adapter.

The kill is simulated deterministically: the k-th file operation of a save (every
``os`` call that creates, writes, syncs, renames or deletes, and the safetensors /
torch writers) fails, half-done for writes, and so does every operation after it,
as if the process had died there; this runs for every k. One test kills a real
process with SIGKILL between the two renames.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from torch import nn

from peftcore import AdapterFileError, LoraConfig, PeftModel, get_peft_model
from peftcore.files import COMMIT_RECORD_NAME

INPUTS = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
EXPECTED_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def adapted(alpha: int, seed: int, names: tuple[str, ...] = ("default",)) -> PeftModel:
    """LoRA on both layers; every adapter in ``names`` gets the same config and the same weights."""
    model = get_peft_model(base_model(), LoraConfig(r=2, lora_alpha=alpha, target_modules=["0", "2"]))
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(r=2, lora_alpha=alpha, target_modules=["0", "2"]))
    with torch.no_grad():
        for name in names:
            generator = torch.Generator().manual_seed(seed)
            for key, param in model.named_parameters():
                if "lora_" in key and f".{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUTS)


OLD, NEW = adapted(alpha=8, seed=1), adapted(alpha=32, seed=2)  # new weights with the old alpha match neither


class Killed(BaseException):
    """The simulated process died at this file operation (not an Exception: no handler may recover from it)."""


class DieAt:
    """Patch the file operations a save uses; the ``kill_at``-th fails half-done, and so does every later one."""

    def __init__(self, monkeypatch, kill_at: int | None):
        self.kill_at, self.calls, self.dead = kill_at, 0, False
        for owner, name in ((os, "open"), (os, "write"), (os, "fsync"), (os, "replace"), (os, "rename"),
                            (os, "unlink"), (os, "remove"), (safetensors.torch, "save_file"), (torch, "save")):
            monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _wrap(self, name, real):
        def operation(*args, **kwargs):
            self.calls += 1
            if self.dead or self.calls == self.kill_at:
                if not self.dead:
                    self._half_done(name, real, args, kwargs)
                self.dead = True
                raise Killed(f"killed at {name} (file operation {self.calls})")
            return real(*args, **kwargs)

        return operation

    @staticmethod
    def _half_done(name, real, args, kwargs):
        """A kill in the middle of a write leaves part of it on disk."""
        if name == "write":
            real(args[0], bytes(args[1][: max(1, len(args[1]) // 2)]))
        elif name in ("save_file", "save"):
            path = args[1]
            real(*args, **kwargs)
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)


def load(folder, **kwargs):
    return PeftModel.from_pretrained(base_model(), folder, **kwargs)


def loads_as_old_or_new(folder, **kwargs) -> str:
    model = load(folder, **kwargs)
    got = outputs(model)
    alpha = model.peft_config["default"].lora_alpha
    if torch.equal(got, outputs(OLD)) and alpha == 8:
        return "old"
    if torch.equal(got, outputs(NEW)) and alpha == 32:
        return "new"
    raise AssertionError(f"{folder} loads as neither the old nor the new adapter (lora_alpha={alpha})")


def count_operations(tmp_path, monkeypatch, save, old=OLD) -> int:
    folder = tmp_path / "count"
    old.save_pretrained(folder)
    with monkeypatch.context() as patch:
        counter = DieAt(patch, kill_at=None)
        save(folder)
    return counter.calls


@pytest.mark.parametrize("new_format", ["safetensors", "pickle"])
def test_a_save_killed_at_any_file_operation_leaves_old_or_new(tmp_path, monkeypatch, new_format):
    safe = new_format == "safetensors"

    def save(folder):
        NEW.save_pretrained(folder, safe_serialization=safe)

    total = count_operations(tmp_path, monkeypatch, save)
    assert total > 10
    seen = set()
    for k in range(1, total + 1):
        folder = tmp_path / f"k{k}"
        OLD.save_pretrained(folder)
        with monkeypatch.context() as patch:
            DieAt(patch, kill_at=k)
            with pytest.raises(Killed):
                save(folder)
        seen.add(loads_as_old_or_new(folder, allow_pickle=True))
        save(folder)  # the next save finishes or clears what the killed one left
        expected = EXPECTED_FILES if safe else EXPECTED_FILES - {"adapter_model.safetensors"} | {"adapter_model.bin"}
        assert set(os.listdir(folder)) == expected, f"k={k}: {sorted(os.listdir(folder))}"
        assert loads_as_old_or_new(folder, allow_pickle=True) == "new"
    assert seen == {"old", "new"}  # kills before and after the commit point were both exercised


def test_each_adapter_folder_of_a_two_adapter_save_is_a_unit(tmp_path, monkeypatch):
    old, new = adapted(8, seed=1, names=("default", "other")), adapted(32, seed=2, names=("default", "other"))
    total = count_operations(tmp_path, monkeypatch, new.save_pretrained, old=old)
    for k in range(1, total + 1, 2):
        folder = tmp_path / f"k{k}"
        old.save_pretrained(folder)
        with monkeypatch.context() as patch:
            DieAt(patch, kill_at=k)
            with pytest.raises(Killed):
                new.save_pretrained(folder)
        loads_as_old_or_new(folder)  # "other" is read as a default adapter: its outputs are the same as default's
        loads_as_old_or_new(folder / "other")


def test_leftovers_of_interrupted_saves_are_removed_and_nothing_else(tmp_path):
    folder = tmp_path / "a"
    OLD.save_pretrained(folder)
    leftovers = [".adapter_model.safetensors.k3j4l5.tmp", ".adapter_config.json.x1y2z3.tmp",
                 ".peftcore-staged-0123456789abcdef-adapter_model.safetensors", ".peftcore-commit-0123456789abcdef"]
    kept = ["notes.txt", ".adapter_model.safetensors.bak", "tokenizer.json"]
    for name in leftovers + kept:
        (folder / name).write_bytes(b"x" * 1000)
    NEW.save_pretrained(folder)
    assert set(os.listdir(folder)) == EXPECTED_FILES | set(kept)
    assert loads_as_old_or_new(folder) == "new"


def test_a_folder_read_between_commit_and_renames_is_the_new_save(tmp_path, monkeypatch):
    folder = tmp_path / "a"
    OLD.save_pretrained(folder)
    replaced = []
    real_replace = os.replace

    def replace_only_the_commit(src, dst):
        replaced.append(os.path.basename(dst))
        if len(replaced) > 1:
            raise Killed("after the commit")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace_only_the_commit)
        with pytest.raises(Killed):
            NEW.save_pretrained(folder)
    assert replaced[0] == COMMIT_RECORD_NAME
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 8  # the old file, on disk
    assert loads_as_old_or_new(folder) == "new"  # but the folder reads as the committed save


def test_a_damaged_commit_record_is_named_when_loading(tmp_path):
    folder = tmp_path / "a"
    OLD.save_pretrained(folder)
    (folder / COMMIT_RECORD_NAME).write_text('{"format": "something else"')
    with pytest.raises(AdapterFileError, match=f"{COMMIT_RECORD_NAME}: damaged record of an interrupted save"):
        load(folder)
    (folder / COMMIT_RECORD_NAME).write_text(json.dumps({"format": "peftcore-folder-commit/1", "token": "t",
                                                         "files": {"adapter_config.json": "../../etc/passwd"},
                                                         "remove": []}))
    with pytest.raises(AdapterFileError, match="damaged record"):
        load(folder)
    NEW.save_pretrained(folder)
    assert set(os.listdir(folder)) == EXPECTED_FILES and loads_as_old_or_new(folder) == "new"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_have_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        NEW.save_pretrained(tmp_path / "a")
    finally:
        os.umask(old)
    for name in EXPECTED_FILES:
        assert os.stat(tmp_path / "a" / name).st_mode & 0o777 == 0o666 & ~umask, name


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_atomic_saves import NEW

    folder, kill_at = sys.argv[1], int(sys.argv[2])
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    os.replace = replace
    NEW.save_pretrained(folder)
""")


def test_a_real_kill_between_the_weights_and_the_config_rename(tmp_path):
    """Renames in a save: the commit record, the weights, the config, then README's record and README."""
    folder = tmp_path / "a"
    OLD.save_pretrained(folder)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(tests=os.path.dirname(__file__)))
    done = subprocess.run([sys.executable, str(script), str(folder), "3"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == -signal.SIGKILL, done.stderr
    on_disk = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    new_a = NEW.state_dict()["base_model.model.0.lora_A.default.weight"]
    assert torch.equal(on_disk["base_model.model.0.lora_A.weight"], new_a)
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 8  # torn, file by file ...
    assert loads_as_old_or_new(folder) == "new"  # ... but the folder loads as the new adapter
    NEW.save_pretrained(folder)
    assert set(os.listdir(folder)) == EXPECTED_FILES
