"""Prompt tuning on a decoder (Llama, GPT-2), an encoder classifier (BERT) and an encoder-decoder (T5)."""

import dataclasses

import peft
import pytest
import torch

import peftcore
from peftcore import PromptTuningConfig, get_peft_model
from peftcore.testing import DECODERS, batch, greedy_reference, outputs, perturb
from peftcore.testing import PROMPT_TASKS as TASKS
from peftcore.testing import tiny_generation_model as tiny_model

ARCHS = list(TASKS)


def make(arch, **kwargs):
    return get_peft_model(tiny_model(arch), PromptTuningConfig(task_type=TASKS[arch], num_virtual_tokens=3, **kwargs))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_peft_and_backward_touches_only_the_prompt(arch):
    torch.manual_seed(11)
    reference = peft.get_peft_model(
        tiny_model(arch), peft.PromptTuningConfig(task_type=TASKS[arch], num_virtual_tokens=3)
    )
    torch.manual_seed(11)
    model = make(arch)
    # same seed, same draws: PEFT's init order is kept
    assert torch.equal(
        model.prompt_encoder["default"].embedding.weight, reference.prompt_encoder["default"].embedding.weight
    )
    kwargs = batch(arch)
    out = model(**kwargs)  # eval mode: dropout off on both sides
    with torch.no_grad():
        expected = reference.eval()(**kwargs)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-6, rtol=0)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_causal_lm_inputs_are_extended_as_documented():
    """Prepending n tokens: embeddings in front, mask ones, labels -100; checked against the base model by hand."""
    model = make("llama")
    perturb(model.prompt_encoder)
    kwargs = batch("llama")
    base = tiny_model("llama")
    prompt = model.prompt_encoder["default"].embedding.weight.detach()
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(kwargs["input_ids"])], 1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), kwargs["attention_mask"]], 1)
    labels = torch.cat([torch.full((2, 3), -100), kwargs["labels"]], 1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        got = model(**kwargs)
    assert got.logits.shape == (2, 3 + 6, 64)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=0)


def test_token_type_ids_and_position_ids_are_padded_for_the_virtual_tokens():
    model = make("bert")
    perturb(model.prompt_encoder)
    kwargs = batch("bert")
    token_types = torch.ones_like(kwargs["input_ids"])
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        with_ids = model(**kwargs, token_type_ids=token_types, position_ids=positions).logits
        base = tiny_model("bert")
        base.classifier = model.base_model.classifier.modules_to_save["default"]
        prompt = model.prompt_encoder["default"].embedding.weight
        embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(kwargs["input_ids"])], 1)
        expected = base(
            inputs_embeds=embeds,
            attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), kwargs["attention_mask"]], 1),
            token_type_ids=torch.cat([torch.zeros(2, 3, dtype=torch.long), token_types], 1),
            position_ids=torch.arange(9).expand(2, 9),
        ).logits
    torch.testing.assert_close(with_ids, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_generate_returns_the_requested_tokens_and_equals_uncached_greedy_decoding(arch):
    model = make(arch)
    perturb(model.prompt_encoder, scale=5.0)  # a prompt strong enough to change the continuation
    kwargs = {k: v for k, v in batch(arch).items() if k != "labels"}
    generated = model.generate(**kwargs, max_new_tokens=5, do_sample=False)
    expected_len = (6 if arch in DECODERS else 1) + 5
    assert generated.shape == (2, expected_len)
    # the reference prepends the prompt by hand and runs the base model without any cache
    base = model.get_base_model()
    prompt = model.prompt_encoder["default"].embedding.weight[:3]

    def forward(input_ids, attention_mask, position_ids=None, **extra):
        embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(input_ids)], 1)
        mask = torch.cat([torch.ones(2, 3, dtype=torch.long), attention_mask], 1)
        if position_ids is not None:  # the virtual tokens take positions 0..2
            position_ids = torch.cat([torch.arange(3).expand(2, 3), position_ids + 3], 1)
        return base(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, **extra)

    assert torch.equal(generated, greedy_reference(forward, arch, kwargs, 5))
    with model.disable_adapter():
        plain = model.generate(**kwargs, max_new_tokens=5, do_sample=False)
    assert torch.equal(plain, tiny_model(arch).generate(**kwargs, max_new_tokens=5, do_sample=False))
    assert not torch.equal(plain, generated)


def test_generate_takes_input_ids_positionally_and_with_beams():
    model = make("llama")
    kwargs = batch("llama", padded=False)
    by_keyword = model.generate(input_ids=kwargs["input_ids"], max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(kwargs["input_ids"], max_new_tokens=3, do_sample=False), by_keyword)
    beams = model.generate(
        input_ids=kwargs["input_ids"], max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False
    )
    assert beams.shape == (4, 9)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_disable_adapter_gives_the_base_model(arch):
    """PEFT 0.21.2 raises UnboundLocalError here for classifiers."""
    model = make(arch)
    perturb(model.prompt_encoder)
    perturb(model.base_model)  # the classifier copy (modules_to_save) trains too
    kwargs = batch(arch)
    with model.disable_adapter():
        disabled = outputs(model, kwargs)
        assert model.active_adapter == "default"
    torch.testing.assert_close(disabled, outputs(tiny_model(arch), kwargs), atol=1e-6, rtol=0)
    assert not torch.allclose(outputs(model, kwargs)[:, -1], disabled[:, -1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.default.embedding.weight"} | (
        {"base_model.classifier.modules_to_save.default.weight", "base_model.classifier.modules_to_save.default.bias"}
        if arch == "bert"
        else set()
    )


def test_several_adapters_switch_and_delete():
    model = make("bert")
    model.add_adapter("other", PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))
    perturb(model.prompt_encoder)
    perturb(model.base_model)
    kwargs = batch("bert")
    first = outputs(model, kwargs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".default." in n for n in trainable)
    model.set_adapter("other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n.replace(".default.", ".other.") for n in trainable
    }
    second = outputs(model, kwargs)
    assert not torch.allclose(first, second)
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.prompt_encoder) == ["default"]
    assert "other" not in model.base_model.classifier.modules_to_save
    torch.testing.assert_close(outputs(model, kwargs), first)
    model.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.delete_adapter("default")
    assert model.active_adapter is None
    assert isinstance(model.base_model.classifier, torch.nn.Linear)  # the head is put back


def test_text_init_uses_the_tokenized_text_repeated_to_fill(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from peftcore.cli.assets import minilm_dir

    base = AutoModel.from_pretrained(minilm_dir())
    text = "Is this message spam?"
    config = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=11, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text=text, tokenizer_name_or_path=str(minilm_dir()))
    model = get_peft_model(base, config)
    token_ids = AutoTokenizer.from_pretrained(minilm_dir())(text)["input_ids"]  # [CLS] ... [SEP]
    assert len(token_ids) < 11
    wanted = (token_ids * 3)[:11]
    expected = base.embeddings.word_embeddings.weight[wanted]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, expected, atol=0, rtol=0)
    cut = get_peft_model(AutoModel.from_pretrained(minilm_dir()), dataclasses.replace(config, num_virtual_tokens=2))
    torch.testing.assert_close(cut.prompt_encoder["default"].embedding.weight, expected[:2], atol=0, rtol=0)


def test_sample_vocab_init_takes_vocabulary_rows():
    torch.manual_seed(5)
    model = make("gpt2", prompt_tuning_init="SAMPLE_VOCAB")
    vocab = model.get_base_model().get_input_embeddings().weight
    for row in model.prompt_encoder["default"].embedding.weight:
        assert (vocab == row).all(dim=1).any()


def test_seq2seq_keeps_peft_layout_of_two_prompt_blocks():
    model = make("t5")
    assert model.peft_config["default"].num_transformer_submodules == 2
    assert model.prompt_encoder["default"].embedding.weight.shape == (6, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"), "tokenizer_name_or_path"),
        (dict(prompt_tuning_init="TEXT", tokenizer_name_or_path="x"), "prompt_tuning_init_text"),
        (dict(prompt_tuning_init="WORDS"), "prompt_tuning_init must be one of"),
        (dict(tokenizer_kwargs={"a": 1}), "tokenizer_kwargs"),
        (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
        (dict(num_transformer_submodules=3), "num_transformer_submodules"),
        (dict(task_type="CLASSIFY"), "Invalid task type: .CLASSIFY.. Must be one of"),
    ],
)
def test_bad_config_values_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTuningConfig(**{"num_virtual_tokens": 3, **kwargs})


def test_config_has_peft_fields_and_help_for_the_cli():
    ours = PromptTuningConfig(num_virtual_tokens=3).to_dict()
    theirs = peft.PromptTuningConfig(num_virtual_tokens=3).to_dict()
    assert set(ours) == set(theirs)
    own_fields = {f.name for f in dataclasses.fields(PromptTuningConfig)} - {
        f.name for f in dataclasses.fields(peftcore.PeftConfig)
    }
    for f in dataclasses.fields(PromptTuningConfig):
        if f.name in own_fields:
            assert f.metadata.get("help"), f.name


def test_cannot_mix_with_lora():
    lora = get_peft_model(tiny_model("llama"), peftcore.LoraConfig(task_type="CAUSAL_LM", r=2))
    with pytest.raises(ValueError, match="already has adapter layers"):
        get_peft_model(lora.get_base_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="one model holds adapters of one method"):
        get_peft_model(make("llama"), peftcore.LoraConfig(task_type="CAUSAL_LM", r=2))
    prompt = make("llama")
    with pytest.raises(ValueError, match="Cannot add a LORA adapter"):
        prompt.add_adapter("lora", peftcore.LoraConfig(task_type="CAUSAL_LM", r=2))
    assert list(prompt.peft_config) == ["default"]


def test_works_with_gradient_checkpointing():
    """The prompt carries the gradient into the checkpointed layers: same gradient as without."""
    grads = []
    for checkpointing in (False, True):
        base = tiny_model("llama")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        torch.manual_seed(2)
        model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        model.train()
        for module in model.modules():  # checkpointing is active in training mode; dropout stays off
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model(**batch("llama")).loss.backward()
        grads.append(model.prompt_encoder["default"].embedding.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_mixed_batches_are_refused_clearly():
    model = make("llama")
    with pytest.raises(ValueError, match="adapter_names"):
        model(**batch("llama"), adapter_names=["default", "default"])
