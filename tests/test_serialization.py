"""PEFT's files: atomic saves, Hub-cache loading, and clear errors for bad folders and files."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

from peftcore import AdapterFileError, LoraConfig, PeftModel, get_peft_model
from peftcore.testing import tiny_model


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def saved(tmp_path):
    """A LoRA adapter with non-zero weights saved at tmp_path/adapter, plus a pristine base and inputs."""
    base, inputs = tiny_model("llama")
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder, model, pristine, inputs


def test_interrupted_save_leaves_previous_adapter_intact(saved, monkeypatch):
    folder, model, pristine, inputs = saved
    expected = _out(model, inputs)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert after == before, "no leftover temporary files, and the old files unchanged"
    reloaded = PeftModel.from_pretrained(pristine, folder)
    torch.testing.assert_close(_out(reloaded, inputs), expected, atol=1e-6, rtol=0)


def _hub_cache(tmp_path, folder, repo_id="someone/tiny-lora", revision_sha="0123456789abcdef0123456789abcdef01234567"):
    """Lay out ``folder`` as huggingface_hub's cache does after a download (refs + snapshots)."""
    cache = tmp_path / "hub"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision_sha
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision_sha)
    return cache


def test_from_pretrained_reads_a_hub_repo_id_from_the_local_cache(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder, model, pristine, inputs = saved
    cache = _hub_cache(tmp_path, folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = PeftModel.from_pretrained(pristine, "someone/tiny-lora", cache_dir=str(cache))
    torch.testing.assert_close(_out(loaded, inputs), _out(model, inputs), atol=1e-6, rtol=0)
    with pytest.raises(AdapterFileError, match="someone/missing: not a local folder"):
        PeftModel.from_pretrained(copy.deepcopy(pristine), "someone/missing", cache_dir=str(cache))


def test_folder_with_config_but_no_weights_is_reported_as_such(saved):
    folder, _, pristine, _ = saved
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="has adapter_config.json but no adapter_model.safetensors"):
        PeftModel.from_pretrained(pristine, folder)


def test_missing_local_folder_does_not_fall_through_to_the_hub(tmp_path):
    base, _ = tiny_model("llama")
    with pytest.raises(AdapterFileError, match="no such adapter folder"):
        PeftModel.from_pretrained(base, str(tmp_path / "nope" / "adapter"))


def test_corrupt_weights_name_the_file(saved):
    folder, _, pristine, _ = saved
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors: cannot read safetensors file"):
        PeftModel.from_pretrained(pristine, folder)


def test_invalid_config_json_is_reported(saved):
    folder, _, pristine, _ = saved
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="adapter_config.json: not valid JSON"):
        PeftModel.from_pretrained(pristine, folder)


def test_unknown_peft_type_lists_installed_methods(saved):
    folder, _, pristine, _ = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config["peft_type"] = "MYSTERY"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="Unknown PEFT method 'MYSTERY'; installed methods: .*lora \\(LORA\\)"):
        PeftModel.from_pretrained(pristine, folder)


def test_unknown_config_keys_warn_and_still_load(saved):
    folder, model, pristine, inputs = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config["a_field_from_the_future"] = 1
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="a_field_from_the_future"):
        loaded = PeftModel.from_pretrained(pristine, folder)
    torch.testing.assert_close(_out(loaded, inputs), _out(model, inputs), atol=1e-6, rtol=0)


def test_pickle_weights_need_an_explicit_opt_in(saved, tmp_path):
    _, model, pristine, inputs = saved
    folder = tmp_path / "pickled"
    model.save_pretrained(folder, safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    with pytest.raises(AdapterFileError, match="allow_pickle=True"):
        PeftModel.from_pretrained(copy.deepcopy(pristine), folder)
    loaded = PeftModel.from_pretrained(pristine, folder, allow_pickle=True)
    torch.testing.assert_close(_out(loaded, inputs), _out(model, inputs), atol=1e-6, rtol=0)


def test_failed_load_adapter_leaves_nothing_behind(saved, tmp_path):
    folder, model, pristine, inputs = saved
    wrong = tmp_path / "wrong_rank"
    other = get_peft_model(copy.deepcopy(pristine), LoraConfig(r=2))
    other.save_pretrained(wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["r"] = 4  # the file's tensors have rank 2
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    names_before = [n for n, _ in model.named_parameters()]
    expected = _out(model, inputs)
    with pytest.raises(
        AdapterFileError,
        match=r"lora_A.weight' has shape \(2, 16\) but .*lora_A.second.weight in the model has \(4, 16\)",
    ):
        model.load_adapter(wrong, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert [n for n, _ in model.named_parameters()] == names_before
    torch.testing.assert_close(_out(model, inputs), expected, atol=0, rtol=0)


def test_save_into_a_file_path_is_refused(saved, tmp_path):
    _, model, _, _ = saved
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(target)


def test_saved_config_is_peft_shaped(saved):
    folder, _, _, _ = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["peft_version"].split("@")[0].count(".") == 2
    readme = (folder / "README.md").read_text()
    assert readme.startswith("---\n") and "\nlibrary_name: peft\n" in readme.split("\n---\n")[0]
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]
