"""PEFT's files both ways for p-tuning: one ``prompt_embeddings`` tensor, the encoder baked in."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from peftcore import PeftModel, PromptEncoderConfig, get_peft_model
from peftcore.testing import PROMPT_TASKS as TASKS
from peftcore.testing import batch, outputs, perturb
from peftcore.testing import tiny_generation_model as tiny_model

ARCHS = list(TASKS)


def config_kwargs(encoder):
    return dict(num_virtual_tokens=3, encoder_hidden_size=16, encoder_reparameterization_type=encoder)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_saved_adapter_loads_in_peftcore(arch, encoder, tmp_path):
    reference = peft.get_peft_model(
        tiny_model(arch), peft.PromptEncoderConfig(task_type=TASKS[arch], **config_kwargs(encoder))
    )
    perturb(reference, scale=0.3)
    reference.eval().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    # inference mode keeps only the table, as PEFT does
    assert [n for n, _ in loaded.prompt_encoder.named_parameters()] == ["default.embedding.weight"]
    reloaded_by_peft = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(outputs(loaded, batch(arch)), outputs(reloaded_by_peft, batch(arch)), atol=1e-6, rtol=0)
    # PEFT saves the LSTM output computed with autograd on, which differs from its no-grad output by ~1e-6
    torch.testing.assert_close(
        outputs(loaded, batch(arch)), outputs(reference, batch(arch)), atol=1e-5 if encoder == "LSTM" else 1e-6, rtol=0
    )


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peftcore_saved_adapter_loads_in_peft(arch, encoder, tmp_path):
    model = get_peft_model(tiny_model(arch), PromptEncoderConfig(task_type=TASKS[arch], **config_kwargs(encoder)))
    perturb(model, scale=0.3)
    model.eval().save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(outputs(loaded, batch(arch)), outputs(model, batch(arch)), atol=1e-6, rtol=0)


def test_saved_tensor_is_the_encoder_output_and_config_keys_match_peft(tmp_path):
    model = get_peft_model(tiny_model("t5"), PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", **config_kwargs("LSTM")))
    perturb(model, scale=0.3)
    model.save_pretrained(tmp_path / "ours")
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():  # the encoder run on all 2 x 3 virtual tokens (encoder and decoder blocks)
        expected = encoder.mlp_head(encoder.lstm_head(encoder.embedding.weight.unsqueeze(0))[0])[0]
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    torch.testing.assert_close(saved["prompt_embeddings"], expected, atol=0, rtol=0)
    assert torch.equal(model.get_prompt_embedding_to_save("default"), saved["prompt_embeddings"])  # PEFT's accessor
    peft.get_peft_model(
        tiny_model("t5"), peft.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", **config_kwargs("LSTM"))
    ).save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    assert {
        k: ours[k]
        for k in ("encoder_hidden_size", "encoder_reparameterization_type", "num_transformer_submodules", "token_dim")
    } == {
        k: theirs[k]
        for k in ("encoder_hidden_size", "encoder_reparameterization_type", "num_transformer_submodules", "token_dim")
    }


def test_trainable_load_trains_the_stored_table(tmp_path):
    """PEFT refuses is_trainable=True for prompt learning; peftcore continues from the stored encoder output."""
    model = get_peft_model(tiny_model("gpt2"), PromptEncoderConfig(task_type="CAUSAL_LM", **config_kwargs("MLP")))
    perturb(model, scale=0.3)
    model.eval().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="reparameterisation cannot be recovered"):
        loaded = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path, is_trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {"prompt_encoder.default.embedding.weight"}
    torch.testing.assert_close(outputs(loaded.eval(), batch("gpt2")), outputs(model, batch("gpt2")), atol=1e-6, rtol=0)
    loaded(**batch("gpt2")).loss.backward()
    assert loaded.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
