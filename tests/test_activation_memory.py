"""Gradient checkpointing on a frozen base with adapters, and keeping the checkpointed inputs in host memory."""

from __future__ import annotations

import pytest
import torch
import transformers as t

from peftcore import LoraConfig, get_peft_model
from peftcore.preparation import HostOffload, offload_checkpointed_inputs
from peftcore.testing import perturb

LAYERS = 3


def lora_llama():
    torch.manual_seed(0)
    base = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    perturb(model, scale=0.1)
    return model.train()


def grads_of_one_step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert a[1][name].abs().max() > 0, name  # every adapter inside the checkpointed blocks gets a gradient
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-5, rtol=0, msg=name)


def test_non_reentrant_by_default_and_every_adapter_trains():
    model = lora_llama()
    reference = grads_of_one_step(model)
    used = []
    model.gradient_checkpointing_enable()
    layer = model.get_base_model().model.layers[0]
    real = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: used.append(real.keywords) or real(*a, **k)
    assert_same(grads_of_one_step(model), reference)
    assert used == [{"use_reentrant": False}]


def test_offload_on_the_cpu_is_a_no_op_that_says_so():
    model = lora_llama()
    reference = grads_of_one_step(model)
    with pytest.warns(UserWarning, match="offload=True does nothing for a model on the CPU"):
        model.gradient_checkpointing_enable(offload=True)
    assert_same(grads_of_one_step(model), reference)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_offloaded_inputs_go_to_the_host_and_come_back(use_reentrant):
    """The mechanism, on the CPU: every checkpointed layer's input is copied out once, gradients are unchanged."""
    model = lora_llama()
    reference = grads_of_one_step(model)
    kwargs = {"use_reentrant": use_reentrant}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    offload = HostOffload(pin_memory=False, moves=lambda tensor: True)  # "host" copies of CPU tensors
    assert offload_checkpointed_inputs(model.get_base_model(), kwargs, offload=offload) >= LAYERS
    assert_same(grads_of_one_step(model), reference)
    assert offload.packed == LAYERS  # one hidden-states tensor per decoder layer, nothing else


def test_offload_needs_checkpointing():
    model = lora_llama()
    with pytest.raises(ValueError, match="has no checkpointed layers to offload"):
        offload_checkpointed_inputs(model.get_base_model(), {}, offload=HostOffload(pin_memory=False))


def test_prepare_model_for_gradient_checkpointing_as_peft():
    """Embedding outputs require grad afterwards, for peft and peftcore alike."""
    import copy

    import peft

    base = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    for lib in (peft, __import__("peftcore")):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        inner = model.get_base_model()
        assert not inner.get_input_embeddings()(ids).requires_grad, lib.__name__
        model.prepare_model_for_gradient_checkpointing(inner)  # peft returns None, peftcore the model
        assert inner.get_input_embeddings()(ids).requires_grad, lib.__name__
