"""PEFT's files both ways for prefix tuning: ``prompt_embeddings`` = the per-layer key/value table.

BERT is checked one way only: peft 0.21.2 loads the file but cannot run prefix tuning on BERT under
transformers 5 ("Model does not support past key values"), so its outputs cannot be compared.
"""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from peftcore import PeftModel, PrefixTuningConfig, get_peft_model
from peftcore.testing import PROMPT_TASKS as TASKS
from peftcore.testing import batch, outputs, perturb
from peftcore.testing import tiny_generation_model as tiny_model

PEFT_RUNS = ["llama", "gpt2", "t5"]
PROJECTIONS = {"plain": {}, "projection": dict(prefix_projection=True, encoder_hidden_size=16)}


@pytest.mark.parametrize("projection", list(PROJECTIONS))
@pytest.mark.parametrize("arch", PEFT_RUNS)
def test_peft_saved_adapter_loads_in_peftcore(arch, projection, tmp_path):
    reference = peft.get_peft_model(
        tiny_model(arch),
        peft.PrefixTuningConfig(task_type=TASKS[arch], num_virtual_tokens=3, **PROJECTIONS[projection]),
    )
    perturb(reference, scale=0.5)
    reference.eval().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    by_peft = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(outputs(loaded, batch(arch)), outputs(by_peft, batch(arch)), atol=1e-6, rtol=0)
    # the table PEFT stored is the projection's output for one row; its live model runs it per row
    torch.testing.assert_close(outputs(loaded, batch(arch)), outputs(reference, batch(arch)),
                               atol=1e-5 if projection == "projection" else 1e-6, rtol=0)


@pytest.mark.parametrize("projection", list(PROJECTIONS))
@pytest.mark.parametrize("arch", PEFT_RUNS)
def test_peftcore_saved_adapter_loads_in_peft(arch, projection, tmp_path):
    model = get_peft_model(
        tiny_model(arch), PrefixTuningConfig(task_type=TASKS[arch], num_virtual_tokens=3, **PROJECTIONS[projection])
    )
    perturb(model, scale=0.5)
    model.eval().save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(outputs(loaded, batch(arch)), outputs(model, batch(arch)), atol=1e-6, rtol=0)


def test_bert_round_trip_and_peft_reads_the_same_table(tmp_path):
    model = get_peft_model(
        tiny_model("bert"), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3, prefix_projection=True)
    )
    perturb(model, scale=0.5)
    model.eval().save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "prompt_embeddings": (3, 2 * 2 * 32),
        "base_model.classifier.weight": (2, 32),
        "base_model.classifier.bias": (2,),
    }
    loaded = PeftModel.from_pretrained(tiny_model("bert"), tmp_path)
    torch.testing.assert_close(outputs(loaded, batch("bert")), outputs(model, batch("bert")), atol=1e-6, rtol=0)
    by_peft = peft.PeftModel.from_pretrained(tiny_model("bert"), tmp_path)
    assert torch.equal(by_peft.prompt_encoder["default"].embedding.weight, saved["prompt_embeddings"])
    assert torch.equal(
        by_peft.base_model.classifier.modules_to_save["default"].weight, saved["base_model.classifier.weight"]
    )


def test_config_file_matches_peft_including_the_key_value_head_sizes(tmp_path):
    get_peft_model(
        tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(
        tiny_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ).save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    for key in (
        "token_dim",
        "num_attention_heads",
        "num_layers",
        "encoder_hidden_size",
        "num_transformer_submodules",
        "prefix_projection",
    ):
        assert ours[key] == theirs[key], key


def test_trainable_load_of_a_projected_prefix_trains_the_stored_table(tmp_path):
    """PEFT refuses is_trainable=True for prompt learning; peftcore bakes the projection's output and trains that."""
    model = get_peft_model(
        tiny_model("gpt2"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True)
    )
    perturb(model, scale=0.5)
    model.eval().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="reparameterisation cannot be recovered"):
        loaded = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path, is_trainable=True)
    assert {n: tuple(p.shape) for n, p in loaded.named_parameters() if p.requires_grad} == {
        "prompt_encoder.default.embedding.weight": (3, 128)
    }
    torch.testing.assert_close(outputs(loaded.eval(), batch("gpt2")), outputs(model, batch("gpt2")), atol=1e-6, rtol=0)
    loaded(**batch("gpt2")).loss.backward()
    assert loaded.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
