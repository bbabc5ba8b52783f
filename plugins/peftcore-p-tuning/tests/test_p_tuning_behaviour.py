"""P-tuning (MLP and LSTM prompt encoders) on Llama, GPT-2, BERT (classifier) and T5."""

import dataclasses

import peft
import pytest
import torch

import peftcore
from peftcore import PromptEncoderConfig, get_peft_model
from peftcore.testing import DECODERS, batch, greedy_reference, outputs, perturb
from peftcore.testing import PROMPT_TASKS as TASKS
from peftcore.testing import tiny_generation_model as tiny_model

ARCHS = list(TASKS)
ENCODERS = {
    "MLP": dict(encoder_hidden_size=16),
    "LSTM": dict(encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
}


def pair(arch, encoder, seed=11):
    """The same p-tuning adapter built by peft and by peftcore (same seed, same draws)."""
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(
        tiny_model(arch), peft.PromptEncoderConfig(task_type=TASKS[arch], num_virtual_tokens=3, **ENCODERS[encoder])
    )
    torch.manual_seed(seed)
    ours = get_peft_model(
        tiny_model(arch), PromptEncoderConfig(task_type=TASKS[arch], num_virtual_tokens=3, **ENCODERS[encoder])
    )
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_peft_and_backward_touches_only_the_encoder(arch, encoder):
    theirs, ours = pair(arch, encoder)
    assert {n: p.shape for n, p in ours.named_parameters() if p.requires_grad} == {
        n: p.shape for n, p in theirs.named_parameters() if p.requires_grad
    }
    kwargs = batch(arch)
    out = ours(**kwargs)
    expected = theirs(**kwargs)  # with autograd on both sides: an LSTM's kernels differ by ~1e-6 without it
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-6, rtol=0)
    out.loss.backward()
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            assert name.startswith("prompt_encoder.default.") or ".modules_to_save.default." in name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_generate_returns_the_requested_tokens_and_equals_uncached_greedy_decoding(arch):
    theirs, ours = pair(arch, "LSTM")
    perturb(theirs.prompt_encoder, scale=0.5)
    perturb(ours.prompt_encoder, scale=0.5)
    kwargs = {k: v for k, v in batch(arch).items() if k != "labels"}
    generated = ours.generate(**kwargs, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, (6 if arch in DECODERS else 1) + 5)
    # the encoder output as PEFT computes it, prepended by hand; the base model runs without a cache
    prompt = theirs.get_prompt_embedding_to_save("default")[:3]
    base = tiny_model(arch)

    def forward(input_ids, attention_mask, position_ids=None, **extra):
        embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(input_ids)], 1)
        mask = torch.cat([torch.ones(2, 3, dtype=torch.long), attention_mask], 1)
        if position_ids is not None:
            position_ids = torch.cat([torch.arange(3).expand(2, 3), position_ids + 3], 1)
        return base(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, **extra)

    assert torch.equal(generated, greedy_reference(forward, arch, kwargs, 5))
    assert not torch.equal(generated, base.generate(**kwargs, max_new_tokens=5, do_sample=False))


def test_disable_adapter_on_a_classifier_gives_the_base_model():
    _, model = pair("bert", "MLP")
    perturb(model)
    with model.disable_adapter():
        disabled = outputs(model, batch("bert"))
    torch.testing.assert_close(disabled, outputs(tiny_model("bert"), batch("bert")), atol=1e-6, rtol=0)
    assert not torch.allclose(outputs(model, batch("bert")), disabled)


def test_lstm_encoder_layers_and_dropout_reach_the_lstm():
    model = get_peft_model(
        tiny_model("gpt2"),
        PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=4,
            encoder_hidden_size=8,
            encoder_reparameterization_type="LSTM",
            encoder_num_layers=3,
            encoder_dropout=0.25,
        ),
    )
    lstm = model.prompt_encoder["default"].lstm_head
    assert (lstm.num_layers, lstm.dropout, lstm.hidden_size, lstm.bidirectional) == (3, 0.25, 8, True)
    # prompt table: 4 tokens x 32, produced by the LSTM then the 2-layer head
    assert model.prompt_encoder["default"].prompt_table().shape == (4, 32)


def test_mlp_ignores_encoder_num_layers_with_a_warning():
    with pytest.warns(UserWarning, match="for MLP, the argument `encoder_num_layers` is ignored"):
        model = get_peft_model(
            tiny_model("gpt2"), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_num_layers=5)
        )
    head = model.prompt_encoder["default"].mlp_head
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert head[0].out_features == 32  # encoder_hidden_size defaults to token_dim


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(encoder_reparameterization_type="GRU"), "MLP or LSTM"),
        (dict(encoder_num_layers=0), "encoder_num_layers"),
        (dict(encoder_dropout=1.0), "encoder_dropout"),
        (dict(encoder_hidden_size=-2), "encoder_hidden_size"),
    ],
)
def test_bad_config_values_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptEncoderConfig(**{"num_virtual_tokens": 3, **kwargs})


def test_config_has_peft_fields_and_help_for_the_cli():
    assert set(PromptEncoderConfig(num_virtual_tokens=3).to_dict()) == set(
        peft.PromptEncoderConfig(num_virtual_tokens=3).to_dict()
    )
    base_fields = {f.name for f in dataclasses.fields(peftcore.PeftConfig)}
    for f in dataclasses.fields(PromptEncoderConfig):
        if f.name not in base_fields:
            assert f.metadata.get("help"), f.name


def test_cannot_mix_with_lora():
    lora = get_peft_model(tiny_model("gpt2"), peftcore.LoraConfig(task_type="CAUSAL_LM", r=2))
    with pytest.raises(ValueError, match="already has adapter layers"):
        get_peft_model(lora.get_base_model(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    _, model = pair("gpt2", "MLP")
    with pytest.raises(ValueError, match="Cannot add a LORA adapter"):
        model.add_adapter("lora", peftcore.LoraConfig(task_type="CAUSAL_LM", r=2))
