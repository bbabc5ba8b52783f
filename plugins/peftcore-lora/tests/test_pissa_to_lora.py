"""save_pretrained(path_initial_model_for_weight_conversion=...): a PiSSA/OLoRA adapter written as the plain LoRA
adapter that gives the same model on the original base weights, as PEFT writes it."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftcore
from peftcore.testing import tiny_model


def _pissa_run(lib, tmp_path, init="pissa", **kw):
    torch.manual_seed(0)
    base, inputs = tiny_model("llama")
    original = copy.deepcopy(base)
    model = lib.get_peft_model(base, lib.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, **kw))
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter applies as it is
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = init
    with torch.no_grad():  # stands for training
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    return model.eval(), original, inputs


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_converted_adapter_on_the_original_base_equals_the_trained_model(tmp_path, init):
    trained, original, inputs = _pissa_run(peftcore, tmp_path / "ours", init)
    expected = trained(**inputs).logits
    written = json.loads((tmp_path / "ours" / "converted" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (8, 16, True)
    for lib in (peftcore, peft):
        loaded = lib.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "ours" / "converted").eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-4, rtol=1e-4)


def test_the_converted_files_equal_peft_s(tmp_path):
    _pissa_run(peftcore, tmp_path / "ours")
    _pissa_run(peft, tmp_path / "theirs")
    ours = load_file(tmp_path / "ours" / "converted" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "converted" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in ours:  # same seed, same SVD, same perturbation: the same numbers up to float rounding
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=1e-3)
    assert all(ours[k].shape[0 if ".lora_A." in k else 1] == 8 for k in ours)


def test_rslora_with_patterns_warns_and_cannot_be_converted(tmp_path):
    with pytest.warns(UserWarning, match="Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern"):
        config = peftcore.LoraConfig(init_lora_weights="pissa", use_rslora=True, rank_pattern={"q_proj": 2})
    model = peftcore.get_peft_model(tiny_model("llama")[0], config)
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="not supported when using `rank_pattern` or `alpha_pattern`"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))


def test_loading_an_adapter_beside_pissa_warns_like_peft(tmp_path):
    message = "PiSSA changes the base weights of the model and should thus not be used with other adapters"
    peftcore.get_peft_model(tiny_model("llama")[0], peftcore.LoraConfig()).save_pretrained(tmp_path / "plain")
    for lib in (peftcore, peft):
        model = lib.get_peft_model(tiny_model("llama")[0], lib.LoraConfig(init_lora_weights="pissa"))
        with pytest.warns(UserWarning, match=message):
            model.load_adapter(tmp_path / "plain", adapter_name="other")
    model = peftcore.get_peft_model(tiny_model("llama")[0], peftcore.LoraConfig(init_lora_weights="pissa"))
    with pytest.warns(UserWarning, match=message):  # peftcore warns however the second adapter arrives
        model.add_adapter("other", peftcore.LoraConfig())
