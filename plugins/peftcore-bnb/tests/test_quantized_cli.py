"""``peftcore apply --quantize`` and ``peftcore info`` on quantized bases."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from peftcore import LoraConfig, get_peft_model
from peftcore.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("kind, summary", [("4bit", "4-bit nf4, double quantization, compute float32"),
                                           ("8bit", "8-bit (LLM.int8)")])
def test_info_shows_the_bases_quantization(kind, summary, load_quantized, tmp_path):
    model = get_peft_model(load_quantized(kind), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    shown = run("info", str(tmp_path))
    assert shown.exit_code == 0, shown.output
    assert f"base quantization  {summary}" in shown.output
    report = json.loads(run("info", str(tmp_path), "--json").output)
    assert report["quantization"]["bnb_4bit_quant_type" if kind == "4bit" else "_load_in_8bit"] in ("nf4", "True")


def test_info_on_a_full_precision_base_says_none(tmp_path):
    from peftcore.testing import tiny_model

    base, _ = tiny_model("llama")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert "base quantization  none" in run("info", str(tmp_path)).output


def test_quantize_without_the_plugin_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peftcore_bnb" else real(name, *a))
    result = CliRunner().invoke(main, ["apply", "lora", "--quantize", "4bit", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "--quantize 4bit needs peftcore_bnb" in result.output and "plugins/peftcore-bnb" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_apply_quantized_smollm2_trains_saves_and_reloads(kind, tmp_path):
    out = tmp_path / "adapter"
    result = run("apply", "lora", "--model", "smollm2", "--quantize", kind, "--n-train", "8", "--n-test", "4",
                 "--epochs", "1", "--max-length", "48", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output[result.output.index("{"):])
    assert facts["quantize"] == kind
    assert facts["eval_loss"]["after"] < facts["eval_loss"]["before"]
    assert facts["reload_max_abs_diff"] == 0
    assert "quantization config was used during training" in (out / "README.md").read_text()
