"""Adapter names are checked when an adapter is created, and ``save_pretrained`` never writes outside its folder."""

from __future__ import annotations

import os

import pytest
import torch

from peftcore import LoraConfig, PeftModel, get_peft_model
from peftcore.testing import tiny_model

HOSTILE = [
    "/some/dir",  # made save_pretrained("out") write into /some/dir
    "a/b",
    "..",
    "sub\\dir",
    "C:adapters",
    "x\x00y",
    "tab\there",
    "\x1b[31mred",
    "right\u202eleft",  # a bidi override, shown reversed
    "a" * 129,
    "é" * 128 + "é",
    "",
    "default.v2",
    "__base__",
    "forward",
    "training",
    7,
    None,
]


def _config():
    return LoraConfig(r=2, target_modules=["q_proj"])


@pytest.mark.parametrize("name", HOSTILE, ids=lambda n: repr(n)[:20])
def test_hostile_names_are_refused_when_the_adapter_is_created(tmp_path, name):
    base, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="Invalid adapter name"):
        get_peft_model(base, _config(), adapter_name=name)
    assert not any("lora" in n for n, _ in base.named_modules())
    model = get_peft_model(base, _config())
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.add_adapter(name, _config())
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.load_adapter(tmp_path / "does-not-exist", adapter_name=name)  # refused before any file is read
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.add_weighted_adapter(["default"], [1.0], adapter_name=name, combination_type="linear")
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("name", ["v2", "sql-adapter_2024", "é" * 100, "a" * 128, "with space"])
def test_ordinary_names_work_and_save_into_their_sub_folder(tmp_path, name):
    base, _ = tiny_model("llama")
    model = get_peft_model(base, _config())
    model.add_adapter(name, _config())
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / name / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_sub_folder_that_links_outside_is_refused_before_anything_is_written(tmp_path):
    base, _ = tiny_model("llama")
    model = get_peft_model(base, _config())
    model.add_adapter("other", _config())
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "other").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="outside"):
        model.save_pretrained(out)
    assert os.listdir(elsewhere) == [] and sorted(os.listdir(out)) == ["other"]  # not even the default was written


def test_a_link_to_a_folder_inside_is_followed(tmp_path):
    base, inputs = tiny_model("llama")
    model = get_peft_model(base, _config())
    model.add_adapter("other", _config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".other." in name:
                param.normal_()
    out = tmp_path / "out"
    (out / "real").mkdir(parents=True)
    (out / "other").symlink_to(out / "real")
    model.save_pretrained(out)
    loaded = PeftModel.from_pretrained(tiny_model("llama")[0], out / "real")
    model.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
