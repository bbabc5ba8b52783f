"""The chunked LM loss in peftcore causal-LM models: the loss and gradients of the model's own, or a clear fallback.

The reference in every test is the transformers model computing its own loss on
the full logits (``skip_logits=False``), on the same peftcore model and the same
inputs, with the same random state (dropout).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as t

from peftcore import LoraConfig, PeftModelForCausalLM, get_peft_model
from peftcore.chunked_loss import ENV_SWITCH
from peftcore.testing import perturb

VOCAB = 96
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, max_position_embeddings=64)


def build(arch: str, **extra):
    """A tiny model of ``arch``; ``extra`` overrides config fields."""
    torch.manual_seed(0)
    sizes = {**DECODER, **{k: extra.pop(k) for k in list(extra) if k in DECODER}}
    builders = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**sizes, **extra)),
        "llama-tied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**sizes, tie_word_embeddings=True, **extra)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**sizes, **extra)),
        # GPT-2 keeps its dropout (0.1): the runs compared draw the same masks
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                       vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, **extra)),
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**sizes, head_dim=8, final_logit_softcapping=2.0,
                                                             **extra)),
        "cohere": lambda: t.CohereForCausalLM(t.CohereConfig(**sizes, logit_scale=0.25, **extra)),
        "granite": lambda: t.GraniteForCausalLM(t.GraniteConfig(**sizes, logits_scaling=3.0, **extra)),
    }
    return builders[arch]()


def batch(rows: int = 2, seq: int = 12, seed: int = 0) -> dict:
    """Right-padded rows with a masked prompt: labels -100 where there is no loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq - 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def lora(model, **config) -> PeftModelForCausalLM:
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **config}
    peft_model = get_peft_model(model, LoraConfig(**config))
    perturb(peft_model, scale=0.1)  # B != 0: the adapters change the loss
    return peft_model


def step(model, inputs: dict, **call):
    """Loss, output and the gradient of every trainable parameter of one training forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    out = model(**inputs, **call)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), out, grads


def head_positions(model) -> list[int]:
    """Positions the output head computes, per call (a hook would turn the chunked loss off: see below)."""
    seen = []
    head = model.get_base_model().get_output_embeddings()
    real_forward = head.forward

    def forward(x, *args, **kwargs):
        seen.append(x.shape[-2])
        return real_forward(x, *args, **kwargs)

    head.forward = forward
    return seen


def assert_same_step(model, inputs: dict, chunk_tokens: int = 5, **call):
    model.set_chunked_loss(chunk_tokens=chunk_tokens)
    positions = head_positions(model)
    loss, out, grads = step(model, inputs, **call)
    assert out.logits is None, "the chunked path did not run"
    assert positions == [1]  # the head saw the last position only: no full logits
    ref_loss, ref_out, ref_grads = step(model, inputs, skip_logits=False, **call)
    assert positions[1] == ref_out.logits.shape[-2] > 1
    assert ref_out.logits is not None
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=0, msg=name)
    return loss


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2", "gpt2"])
def test_same_loss_and_gradients_as_the_model_own_loss(arch):
    model = lora(build(arch)).train()
    if arch == "llama-tied":
        base = model.get_base_model()
        assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    assert_same_step(model, batch())


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite"])
def test_models_that_transform_their_logits(arch):
    """Soft-capping (Gemma2), logit_scale (Cohere), logits_scaling (Granite): applied per chunk, differentiated."""
    assert_same_step(lora(build(arch)).train(), batch())


def test_a_trained_head_in_modules_to_save_gets_the_same_gradient():
    model = lora(build("llama"), modules_to_save=["lm_head"]).train()
    assert_same_step(model, batch())
    head_copy = model.get_base_model().lm_head.modules_to_save["default"]
    assert head_copy.weight.grad is not None


def test_trainer_loss_kwargs_num_items_in_batch_and_shift_labels():
    model = lora(build("llama")).train()
    inputs = batch()
    assert_same_step(model, inputs, num_items_in_batch=torch.tensor(37))
    shift = torch.roll(inputs["labels"], -1, dims=1)  # given with the labels, used instead of shifting them
    assert_same_step(model, inputs, shift_labels=shift)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_with_the_chunked_loss(use_reentrant):
    model = lora(build("llama")).train()
    inputs = batch()
    model.set_chunked_loss(enabled=False)
    _, _, plain_grads = step(model, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    loss = assert_same_step(model, inputs)
    model.set_chunked_loss(enabled=False)
    no_checkpoint_loss, _, _ = step(model, inputs)
    _, _, grads = step(model, inputs)
    torch.testing.assert_close(loss, no_checkpoint_loss, atol=1e-5, rtol=0)
    for name, grad in plain_grads.items():  # checkpointing itself changes nothing either
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=0)


def test_prompt_tuning_and_prefix_tuning_change_the_length_and_keep_the_loss():
    from peftcore import PrefixTuningConfig, PromptTuningConfig

    for config in (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                   PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)):
        model = get_peft_model(build("llama"), config).train()
        perturb(model, scale=0.1)
        assert_same_step(model, batch())


def test_mixed_adapter_batches_give_the_same_loss():
    model = lora(build("llama"), init_lora_weights=False)
    model.add_adapter("other", LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM",
                                          init_lora_weights=False))
    model.eval()
    inputs = batch(rows=3)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        chunked = model(**inputs, adapter_names=names, skip_logits=True)
        full = model(**inputs, adapter_names=names, skip_logits=False)
    assert chunked.logits is None and full.logits is not None
    torch.testing.assert_close(chunked.loss, full.loss, atol=1e-5, rtol=0)


def test_adalora_adds_its_orthogonality_term_to_the_chunked_loss():
    from peftcore import AdaLoraConfig

    config = AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10, target_modules=["q_proj"],
                           orth_reg_weight=0.5)
    model = get_peft_model(build("llama"), config).train()
    perturb(model, scale=0.1)
    assert_same_step(model, batch())
    model.set_chunked_loss(enabled=False)
    with_term = model(**batch()).loss
    model.base_model.peft_config["default"].orth_reg_weight = 0.0
    assert not torch.allclose(with_term, model(**batch()).loss)  # the term is there, and so counted in both


def test_logits_when_asked_for():
    model = lora(build("llama"))
    inputs = batch()
    model.eval()  # evaluation (Trainer.evaluate, compute_metrics) keeps its logits by default
    assert model(**inputs).logits.shape == (2, 12, VOCAB)
    assert model(**inputs, skip_logits=True).logits is None
    model.train()
    assert model(**inputs).logits is None
    assert model(**inputs, skip_logits=False).logits.shape == (2, 12, VOCAB)
    assert model(input_ids=inputs["input_ids"]).logits.shape == (2, 12, VOCAB)  # no labels: logits as always
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        model(input_ids=inputs["input_ids"], skip_logits=True)
    fresh = lora(build("llama").eval())  # the wrapper is new (training flag set), the model it wraps is in eval
    assert fresh.training and fresh(**inputs).logits is not None


def test_switched_off_per_model_and_per_process(monkeypatch):
    model = lora(build("llama")).train()
    model.set_chunked_loss(enabled=False)
    assert model(**batch()).logits is not None
    model.set_chunked_loss()
    assert model(**batch()).logits is None
    monkeypatch.setenv(ENV_SWITCH, "0")
    with pytest.warns(UserWarning, match=f"{ENV_SWITCH}=0"):
        assert model(**batch()).logits is not None
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        model.set_chunked_loss(chunk_tokens=-1)


def test_a_hooked_head_falls_back():
    """Hooks on the head may expect the full logits (or move its weights in and out, as accelerate's do)."""
    model = lora(build("llama")).train()
    seen = []
    model.get_base_model().lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with pytest.warns(UserWarning, match="the head has forward hooks"):
        assert model(**batch()).logits is not None
    assert seen == [(2, 12, VOCAB)]


def test_a_head_with_an_adapter_falls_back_clearly_once():
    model = lora(build("llama"), target_modules=["q_proj", "lm_head"]).train()
    inputs = batch()
    with pytest.warns(UserWarning, match="the head carries a LORA adapter"):
        out = model(**inputs)
    assert out.logits is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # told once, not on every step
        again = model(**inputs)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.loss, model(**inputs).loss, atol=0, rtol=0)


class _DoublingLlama(t.LlamaForCausalLM):
    """A model whose forward changes its logits in a way no config field announces."""

    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        labels = kwargs.pop("labels", None)
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out


def test_logits_changed_in_an_unknown_way_fall_back_to_the_model_own_loss():
    torch.manual_seed(0)
    model = lora(_DoublingLlama(t.LlamaConfig(**DECODER))).train()
    inputs = batch()
    _DoublingLlama.calls = 0
    with pytest.warns(UserWarning, match="changes its logits in a way peftcore does not reproduce"):
        out = model(**inputs)
    assert _DoublingLlama.calls == 2  # the chunked attempt, then the model's own path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = model(**inputs)
    assert _DoublingLlama.calls == 3  # decided once: later calls go straight to the model's path
    assert out.logits is not None
    torch.testing.assert_close(out.loss, again.loss, atol=0, rtol=0)


def test_trainer_with_gradient_accumulation_trains_the_same_adapter(tmp_path, monkeypatch):
    """The stock Trainer passes num_items_in_batch; chunked and full losses train identical weights."""
    import peftcore.peft_model as peft_model_module

    chunked_calls = []
    real_run = peft_model_module.run_chunked
    monkeypatch.setattr(peft_model_module, "run_chunked", lambda *a, **k: chunked_calls.append(1) or real_run(*a, **k))
    rows = [{k: v[0] for k, v in batch(rows=1, seq=12, seed=i).items()} for i in range(8)]
    trained = []
    for enabled in (True, False):
        model = lora(build("llama"))
        model.set_chunked_loss(enabled=enabled, chunk_tokens=4)
        args = t.TrainingArguments(output_dir=str(tmp_path / str(enabled)), per_device_train_batch_size=2,
                                   gradient_accumulation_steps=2, learning_rate=1e-2, max_steps=2, report_to=[],
                                   logging_strategy="no", save_strategy="no", use_cpu=True, seed=0, data_seed=0,
                                   disable_tqdm=True)
        t.Trainer(model=model, args=args, train_dataset=rows).train()
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(chunked_calls) == 4  # 2 steps x 2 micro-batches, all in the first run
    for name, value in trained[0].items():
        torch.testing.assert_close(value, trained[1][name], atol=1e-5, rtol=0, msg=name)


def _nll_from_full_logits(model, inputs):
    """Per-position NLL from the model's full logits, written out here (the reference for token_nll)."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    labels = inputs["labels"]
    labels = torch.cat([torch.full((labels.shape[0], logits.shape[1] - labels.shape[1]), -100), labels], dim=1)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll.masked_fill(targets == -100, 0.0)


@pytest.mark.parametrize("kind", ["lora", "prompt", "lora-on-head"])
def test_token_nll_per_position_without_full_logits(kind):
    from peftcore import PromptTuningConfig

    if kind == "prompt":
        model = get_peft_model(build("gemma2"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        perturb(model, scale=0.1)
    else:
        model = lora(build("gemma2"), target_modules=["q_proj", "lm_head"] if kind == "lora-on-head" else "all-linear")
    model.eval()
    inputs = batch()
    with torch.no_grad():
        want = _nll_from_full_logits(model, inputs)
    if kind == "lora-on-head":
        with pytest.warns(UserWarning, match="the head carries a LORA adapter"):
            got = model.token_nll(**inputs)
    else:
        positions = head_positions(model)
        got = model.token_nll(**inputs)
        assert positions == [1]
    assert got.shape == want.shape == (2, 12 + (3 if kind == "prompt" else 0))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_a_4bit_quantized_base_trains_with_the_chunked_loss(tmp_path):
    """Only the head (which transformers keeps unquantised) and the hidden states matter to the chunked loss."""
    pytest.importorskip("bitsandbytes")
    build("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "llama")
    quantized = t.AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama", quantization_config=t.BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    )
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert_same_step(lora(quantized).train(), batch())
