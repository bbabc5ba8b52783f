"""PEFT's files both ways: saved by peft -> loaded by peftcore, and the reverse, with equal outputs."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from peftcore import PeftModel, PromptTuningConfig, get_peft_model
from peftcore.testing import PROMPT_TASKS as TASKS
from peftcore.testing import batch, outputs, perturb
from peftcore.testing import tiny_generation_model as tiny_model

ARCHS = list(TASKS)


def trained_peft(arch):
    model = peft.get_peft_model(tiny_model(arch), peft.PromptTuningConfig(task_type=TASKS[arch], num_virtual_tokens=3))
    perturb(model)  # prompt and, for BERT, the classifier copy
    return model.eval()


def trained_peftcore(arch):
    model = get_peft_model(tiny_model(arch), PromptTuningConfig(task_type=TASKS[arch], num_virtual_tokens=3))
    perturb(model)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_saved_adapter_loads_in_peftcore(arch, tmp_path):
    reference = trained_peft(arch)
    reference.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    kwargs = batch(arch)
    torch.testing.assert_close(outputs(loaded, kwargs), outputs(reference, kwargs), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode, as PEFT


@pytest.mark.parametrize("arch", ARCHS)
def test_peftcore_saved_adapter_loads_in_peft(arch, tmp_path):
    model = trained_peftcore(arch)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    kwargs = batch(arch)
    torch.testing.assert_close(outputs(loaded, kwargs), outputs(model, kwargs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_files_match_peft_layout(arch, tmp_path):
    peft_dir, ours_dir = tmp_path / "peft", tmp_path / "ours"
    trained_peft(arch).save_pretrained(peft_dir)
    trained_peftcore(arch).save_pretrained(ours_dir)
    theirs, ours = load_file(peft_dir / "adapter_model.safetensors"), load_file(ours_dir / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    # seq2seq: PEFT stores both virtual-token blocks (encoder and decoder)
    assert ours["prompt_embeddings"].shape == ((6, 32) if arch == "t5" else (3, 32))
    config_theirs = json.loads((peft_dir / "adapter_config.json").read_text())
    config_ours = json.loads((ours_dir / "adapter_config.json").read_text())
    assert set(config_ours) == set(config_theirs)
    for key in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                "num_transformer_submodules", "prompt_tuning_init", "inference_mode"):
        assert config_ours[key] == config_theirs[key], key


def test_trainable_load_continues_training_from_the_file(tmp_path):
    trained_peftcore("llama").save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {"prompt_encoder.default.embedding.weight"}
    loaded(**batch("llama")).loss.backward()
    assert loaded.prompt_encoder["default"].embedding.weight.grad is not None


def test_load_adapter_adds_a_second_prompt_and_a_bad_file_leaves_nothing_behind(tmp_path):
    trained_peft("bert").save_pretrained(tmp_path / "good")
    model = get_peft_model(tiny_model("bert"), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    model.load_adapter(tmp_path / "good", adapter_name="loaded")
    model.set_adapter("loaded")
    reference = peft.PeftModel.from_pretrained(tiny_model("bert"), tmp_path / "good")
    torch.testing.assert_close(outputs(model, batch("bert")), outputs(reference, batch("bert")), atol=1e-6, rtol=0)
    # a 5-token prompt file whose config claims 3 tokens
    wrong = get_peft_model(tiny_model("bert"), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))
    wrong.save_pretrained(tmp_path / "wrong")
    config_file = tmp_path / "wrong" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "num_virtual_tokens": 3}))
    with pytest.raises(ValueError, match=r"prompt_embeddings.*shape \(5, 32\).*\(3, 32\)"):
        model.load_adapter(tmp_path / "wrong", adapter_name="bad")
    assert sorted(model.peft_config) == ["default", "loaded"]
    assert sorted(model.base_model.classifier.modules_to_save) == ["default", "loaded"]
