"""LoRA training on 4-bit bases through peftcore-lora's fused function: the plain path's numbers, less work.

The fused path dequantises the 4-bit weight in forward and again in backward (as bitsandbytes'
``MatMul4Bit`` does) and accumulates the LoRA product into the base output; these tests hold it
to the plain path (``PEFTCORE_LORA_FAST=0``: bitsandbytes' layer, then ``s * B(A(dropout(x)))``
added) and to peft on the same quantised base.
"""

from __future__ import annotations

import pytest
import torch

import peftcore

from peftcore_lora import fast

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _counting(monkeypatch) -> dict:
    calls = {"n": 0}
    forward = fast.FusedLoraLinear.forward

    def counted(ctx, *args):
        calls["n"] += 1
        return forward(ctx, *args)

    monkeypatch.setattr(fast.FusedLoraLinear, "forward", staticmethod(counted))
    return calls


def _trained_step(load_quantized, tokens, *, dropout=0.0, bias="none", lib=peftcore, steps=2):
    """Loss, adapter gradients and embedding-output gradient of ``steps`` AdamW steps on the 4-bit tiny Llama."""
    model = lib.prepare_model_for_kbit_training(load_quantized("4bit"), use_gradient_checkpointing=False)
    model.enable_input_require_grads()
    torch.manual_seed(0)
    config = lib.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, bias=bias, target_modules=TARGETS,
                            init_lora_weights=False)
    model = lib.get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    embeds = {}
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: embeds.update(out=out) or out.retain_grad())
    losses = []
    torch.manual_seed(1)  # the dropout masks
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.item())
        grads = {n.replace(".default", ""): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
    return losses, grads, embeds["out"].grad


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_4bit_training_equals_the_plain_path(load_quantized, tokens, monkeypatch, dropout):
    calls = _counting(monkeypatch)
    fused = _trained_step(load_quantized, tokens, dropout=dropout)
    assert calls["n"] == 2 * 2 * len(TARGETS)  # every 4-bit LoRA layer of both blocks, both steps
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "0")
    plain = _trained_step(load_quantized, tokens, dropout=dropout)
    assert calls["n"] == 2 * 2 * len(TARGETS)  # the plain run did not take it
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-5)
    assert fused[1].keys() == plain[1].keys()
    for name in fused[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(fused[2], plain[2], rtol=1e-4, atol=1e-6)


def test_fused_4bit_training_equals_peft(load_quantized, tokens):
    import peft

    ours, theirs = _trained_step(load_quantized, tokens), _trained_step(load_quantized, tokens, lib=peft)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-5)
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_bias_takes_the_fused_path_and_matches(load_quantized, tokens, monkeypatch):
    calls = _counting(monkeypatch)
    fused = _trained_step(load_quantized, tokens, bias="lora_only", steps=1)
    assert calls["n"] == 2 * len(TARGETS)
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "0")
    plain = _trained_step(load_quantized, tokens, bias="lora_only", steps=1)
    for name in fused[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_inference_keeps_bitsandbytes_own_forward(load_quantized, tokens, monkeypatch):
    """No gradient: bitsandbytes' layer runs (and may repack for its CPU kernel); training afterwards is fused again."""
    calls = _counting(monkeypatch)
    model = peftcore.get_peft_model(load_quantized("4bit"), peftcore.LoraConfig(r=4, target_modules=TARGETS,
                                                                                  init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        before = model(tokens).logits
    assert calls["n"] == 0
    model.train()
    model(tokens).logits.pow(2).mean().backward()
    assert calls["n"] == 2 * len(TARGETS)
    first = model.base_model.model.model.layers[0].self_attn.q_proj
    assert first.lora_A["default"].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=1e-5, atol=1e-5)


def test_dora_and_8bit_keep_the_plain_path(load_quantized, tokens, monkeypatch):
    calls = _counting(monkeypatch)
    for kind, kw in (("4bit", {"use_dora": True}), ("8bit", {})):
        model = peftcore.get_peft_model(load_quantized(kind), peftcore.LoraConfig(r=4, target_modules=TARGETS, **kw))
        model.train()
        model(tokens).logits.sum().backward()
    assert calls["n"] == 0


def test_fused_function_keeps_no_dequantized_weight(load_quantized, tokens):
    """Backward forms the weight again: nothing of the weight's size is saved for it."""
    model = peftcore.get_peft_model(load_quantized("4bit"), peftcore.LoraConfig(r=4, target_modules=["up_proj"]))
    model.train()
    base = model.base_model.model.model.layers[0].mlp.up_proj.get_base_layer()
    shape = tuple(base.weight.quant_state.shape)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(tokens).logits.sum()
    assert shape not in saved and (shape[1], shape[0]) not in saved
    loss.backward()
