"""Prefix tuning through transformers 5's Cache classes: Llama (GQA), GPT-2, Gemma, BERT (classifier), T5."""

import copy
import dataclasses

import peft
import pytest
import torch
import transformers

import peftcore
from peftcore import PrefixTuningConfig, get_peft_model
from peftcore.testing import DECODERS, batch, greedy_reference, outputs, perturb
from peftcore.testing import PROMPT_TASKS as TASKS
from peftcore.testing import tiny_generation_model as tiny_model

PEFT_RUNS = ["llama", "gpt2", "t5"]  # peft 0.21.2 cannot run prefix tuning on BERT with transformers 5
PROJECTIONS = {"plain": {}, "projection": dict(prefix_projection=True, encoder_hidden_size=16)}


def tiny_gemma():
    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        initializer_range=0.2,
    )
    return transformers.GemmaForCausalLM(config).eval()


def build(make_model, task, projection="plain", library=peftcore, seed=11):
    torch.manual_seed(seed)
    config = library.PrefixTuningConfig(task_type=task, num_virtual_tokens=3, **PROJECTIONS[projection])
    return library.get_peft_model(make_model(), config).eval()


@pytest.mark.parametrize("projection", list(PROJECTIONS))
@pytest.mark.parametrize("arch", PEFT_RUNS)
def test_forward_matches_peft_and_backward_touches_only_the_prefix(arch, projection):
    theirs = build(lambda: tiny_model(arch), TASKS[arch], projection, library=peft)
    ours = build(lambda: tiny_model(arch), TASKS[arch], projection)
    assert {n: p.shape for n, p in ours.named_parameters() if p.requires_grad} == {
        n: p.shape for n, p in theirs.named_parameters() if p.requires_grad
    }
    kwargs = batch(arch)
    out = ours(**kwargs)
    expected = theirs(**kwargs)
    # with a projection PEFT runs the MLP once per batch row, peftcore once per batch: the matmul
    # shapes differ, so float32 rounding may too (~1e-6); the stored tables of both load exactly
    atol = 1e-5 if projection == "projection" else 1e-6
    torch.testing.assert_close(out.logits, expected.logits, atol=atol, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=atol, rtol=0)
    out.loss.backward()
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert (
                name.startswith("prompt_encoder.default.") and param.grad is not None and param.grad.abs().sum() > 0
            ), name
        else:
            assert param.grad is None, name


def test_grouped_query_attention_prefixes_have_key_value_head_shapes():
    """Llama: 4 query heads, 2 key/value heads of 8; Gemma: 4 query heads, 1 key/value head of 16.

    (Gemma's head_dim is not hidden / heads.)
    """
    llama = build(lambda: tiny_model("llama"), "CAUSAL_LM")
    config = llama.peft_config["default"]
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (16, 2, 2)
    assert llama.prompt_encoder["default"].embedding.weight.shape == (3, 2 * 2 * 16)
    theirs = build(tiny_gemma, "CAUSAL_LM", library=peft)
    ours = build(tiny_gemma, "CAUSAL_LM")
    assert ours.peft_config["default"].token_dim == theirs.peft_config["default"].token_dim == 16
    kwargs = batch("llama")
    torch.testing.assert_close(outputs(ours, kwargs), outputs(theirs, kwargs), atol=1e-6, rtol=0)
    cache = ours.prompt_encoder["default"].build_cache(ours.get_base_model(), 2)
    assert cache.layers[0].keys.shape == (2, 1, 3, 16)


def bert_float64_reference(model, prefix_table, input_ids, attention_mask, num_virtual):
    """BERT written out by hand in float64, with per-layer key/value prefixes in PEFT's layout:
    table row block ``2i`` holds layer i's keys, ``2i + 1`` its values; positions continue after the prefix."""
    m = copy.deepcopy(model).double()
    heads = m.config.num_attention_heads
    head_dim = m.config.hidden_size // heads
    kv = prefix_table.double().view(num_virtual, m.config.num_hidden_layers * 2, heads, head_dim).permute(1, 2, 0, 3)
    batch_size, length = input_ids.shape
    emb = m.bert.embeddings
    positions = torch.arange(num_virtual, num_virtual + length)
    hidden = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions)
                           + emb.token_type_embeddings(torch.zeros_like(input_ids)))
    visible = torch.cat([torch.ones(batch_size, num_virtual, dtype=torch.bool), attention_mask.bool()], 1)

    def split(x):
        return x.view(batch_size, -1, heads, head_dim).transpose(1, 2)

    for i, layer in enumerate(m.bert.encoder.layer):
        att = layer.attention.self
        keys = torch.cat([kv[2 * i].expand(batch_size, -1, -1, -1), split(att.key(hidden))], 2)
        values = torch.cat([kv[2 * i + 1].expand(batch_size, -1, -1, -1), split(att.value(hidden))], 2)
        scores = split(att.query(hidden)) @ keys.transpose(-1, -2) / head_dim ** 0.5
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        context = (scores.softmax(-1) @ values).transpose(1, 2).reshape(batch_size, length, -1)
        attended = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + hidden)
        hidden = layer.output.LayerNorm(layer.output.dense(layer.intermediate(attended)) + attended)
    return m.classifier(m.bert.pooler(hidden))


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_bert_classifier_matches_a_float64_reference(projection):
    """peft 0.21.2 raises "Model does not support past key values" here (BERT's forward now says `cache`)."""
    with pytest.raises(ValueError, match="does not support past key values"):
        build(lambda: tiny_model("bert"), "SEQ_CLS", projection, library=peft)(**batch("bert"))
    model = build(lambda: tiny_model("bert"), "SEQ_CLS", projection)
    perturb(model.prompt_encoder, scale=0.5)
    kwargs = batch("bert")
    out = model(**kwargs)
    table = model.prompt_encoder["default"].prompt_embeddings_to_save()
    expected = bert_float64_reference(tiny_model("bert"), table, kwargs["input_ids"], kwargs["attention_mask"], 3)
    torch.testing.assert_close(out.logits.double(), expected, atol=1e-5, rtol=0)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("prompt_encoder.") or ".modules_to_save.default." in n for n in grads)
    # no attention_mask given: the prefix is still visible to every token
    no_mask = model(input_ids=kwargs["input_ids"][:1]).logits
    expected = bert_float64_reference(tiny_model("bert"), table, kwargs["input_ids"][:1], torch.ones(1, 6), 3)
    torch.testing.assert_close(no_mask.double(), expected, atol=1e-5, rtol=0)


def test_disable_adapter_on_a_classifier_gives_the_base_model():
    model = build(lambda: tiny_model("bert"), "SEQ_CLS")
    perturb(model)
    with model.disable_adapter():
        disabled = outputs(model, batch("bert"))
    torch.testing.assert_close(disabled, outputs(tiny_model("bert"), batch("bert")), atol=1e-6, rtol=0)
    assert not torch.allclose(outputs(model, batch("bert")), disabled)


@pytest.mark.parametrize("arch", PEFT_RUNS)
def test_generate_uses_the_kv_cache_and_equals_uncached_greedy_decoding(arch):
    """The reference decodes with full forward passes of the *peft* model (no incremental cache)."""
    theirs = build(lambda: tiny_model(arch), TASKS[arch], library=peft)
    ours = build(lambda: tiny_model(arch), TASKS[arch])
    perturb(theirs.prompt_encoder, scale=2.0)
    perturb(ours.prompt_encoder, scale=2.0)
    kwargs = {k: v for k, v in batch(arch).items() if k != "labels"}
    generated = ours.generate(**kwargs, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, (6 if arch in DECODERS else 1) + 5)
    assert torch.equal(generated, greedy_reference(theirs, arch, kwargs, 5))
    assert not torch.equal(generated, tiny_model(arch).generate(**kwargs, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_generate_with_beams_and_several_sequences(arch):
    model = build(lambda: tiny_model(arch), TASKS[arch])
    kwargs = {k: v for k, v in batch(arch).items() if k != "labels"}
    length = (6 if arch in DECODERS else 1) + 4
    beams = model.generate(**kwargs, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, length)
    sampled = model.generate(**kwargs, max_new_tokens=4, num_return_sequences=3, do_sample=True)
    assert sampled.shape == (6, length)
    one_beam = model.generate(**kwargs, max_new_tokens=4, num_beams=1, do_sample=False)
    assert torch.equal(one_beam, model.generate(**kwargs, max_new_tokens=4, do_sample=False))


def test_gradient_checkpointing_is_refused_with_the_reason():
    base = tiny_model("llama")
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing.*drops the cache"):
        get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model = build(lambda: tiny_model("llama"), "CAUSAL_LM")
    model.gradient_checkpointing_enable()  # what Trainer(gradient_checkpointing=True) calls
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**batch("llama"))
    with torch.no_grad():  # nothing is checkpointed without gradients
        model(**batch("llama"))


def test_a_cache_given_by_the_caller_is_refused():
    model = build(lambda: tiny_model("llama"), "CAUSAL_LM")
    with pytest.raises(ValueError, match="supplies the KV cache itself"):
        model(**batch("llama"), past_key_values=transformers.DynamicCache())


def test_zero_init_starts_as_a_zero_prefix():
    for projection in PROJECTIONS:
        model = get_peft_model(
            tiny_model("gpt2"),
            PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero", **PROJECTIONS[projection]
            ),
        )
        assert model.prompt_encoder["default"].prompt_embeddings_to_save().abs().max() == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(init_weights="ones"), "init_weights"),
        (dict(encoder_hidden_size=0), "encoder_hidden_size"),
        (dict(num_layers=-1), "num_layers"),
    ],
)
def test_bad_config_values_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixTuningConfig(**{"num_virtual_tokens": 3, **kwargs})


def test_config_has_peft_fields_and_help_for_the_cli():
    assert set(PrefixTuningConfig(num_virtual_tokens=3).to_dict()) == set(
        peft.PrefixTuningConfig(num_virtual_tokens=3).to_dict()
    )
    base_fields = {f.name for f in dataclasses.fields(peftcore.PeftConfig)}
    for f in dataclasses.fields(PrefixTuningConfig):
        if f.name not in base_fields:
            assert f.metadata.get("help"), f.name


def test_cannot_mix_with_lora():
    lora = get_peft_model(tiny_model("llama"), peftcore.LoraConfig(task_type="CAUSAL_LM", r=2))
    with pytest.raises(ValueError, match="already has adapter layers"):
        get_peft_model(lora.get_base_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model = build(lambda: tiny_model("llama"), "CAUSAL_LM")
    with pytest.raises(ValueError, match="Cannot add a LORA adapter"):
        model.add_adapter("lora", peftcore.LoraConfig(task_type="CAUSAL_LM", r=2))
