"""The chunked LM loss and the activation recomputation on quantized bases: the same loss and gradients."""

from __future__ import annotations

import pytest
import torch

from peftcore import LoraConfig, get_peft_model
from peftcore.activation_savings import ENV_SWITCH
from peftcore.testing import perturb


def lora_step(model, tokens, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=tokens, labels=tokens, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_chunked_loss_and_recomputed_activations_equal_the_models_own(kind, load_quantized, tokens, monkeypatch):
    model = get_peft_model(load_quantized(kind), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    perturb(model, scale=0.1)
    model.train()
    monkeypatch.setenv(ENV_SWITCH, "0")
    reference, reference_grads = lora_step(model, tokens, skip_logits=False)  # full logits, everything kept
    assert reference.logits is not None
    monkeypatch.setenv(ENV_SWITCH, "1")
    chunked, grads = lora_step(model, tokens)
    assert chunked.logits is None  # the chunked path ran
    torch.testing.assert_close(chunked.loss, reference.loss, atol=1e-5, rtol=0)
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)
