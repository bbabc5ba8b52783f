"""Activation outputs of SwiGLU/GeGLU blocks are redone in backward instead of kept, with the same gradients."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import transformers as t

from peftcore import IA3Config, LoraConfig, get_peft_model
from peftcore.activation_savings import ENV_SWITCH
from peftcore.testing import perturb

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64)


def llama():
    return t.LlamaForCausalLM(t.LlamaConfig(**SIZES))  # SiLU


def gemma():
    return t.GemmaForCausalLM(t.GemmaConfig(head_dim=8, hidden_activation="gelu_pytorch_tanh", **SIZES))


def adapted(build, config, fast: bool, monkeypatch):
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1" if fast else "0")
    torch.manual_seed(0)
    model = get_peft_model(build(), config)
    perturb(model, scale=0.1)
    return model.train()


def one_step(model):
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def kept_activation_outputs(model) -> int:
    """How many activation outputs are still alive after forward (before backward)."""
    refs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: refs.append(weakref.ref(out)))
             for name, m in model.named_modules() if name.endswith("mlp.act_fn")]
    assert hooks, "the model has no mlp.act_fn modules"
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    loss.backward()
    for hook in hooks:
        hook.remove()
    return alive


CONFIGS = {
    "lora": lambda: LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    "ia3": lambda: IA3Config(target_modules=["down_proj", "v_proj"], feedforward_modules=["down_proj"],
                             task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("fast", [True, False], ids=["fused-lora", "plain-lora"])
@pytest.mark.parametrize("build", [llama, gemma], ids=["silu", "gelu-tanh"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_same_loss_and_gradients_and_activation_outputs_not_kept(method, build, fast, monkeypatch):
    model = adapted(build, CONFIGS[method](), fast, monkeypatch)
    monkeypatch.setenv(ENV_SWITCH, "0")
    reference = one_step(model)
    assert kept_activation_outputs(model) == SIZES["num_hidden_layers"]
    monkeypatch.setenv(ENV_SWITCH, "1")
    loss, grads = one_step(model)
    assert kept_activation_outputs(model) == 0
    # the same ops on the same inputs: the same bits, not just close
    assert torch.equal(loss, reference[0])
    assert grads.keys() == reference[1].keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert torch.equal(grad, reference[1][name]), name


def test_someone_elses_saved_tensor_hooks_take_precedence(monkeypatch):
    model = adapted(llama, CONFIGS["lora"](), True, monkeypatch)
    packed = []

    def pack(tensor):
        packed.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        assert kept_activation_outputs(model) == SIZES["num_hidden_layers"]
    assert any(tensor.grad_fn is not None and tensor.grad_fn.name() == "SiluBackward0" for tensor in packed)


def test_no_effect_without_gradients(monkeypatch):
    model = adapted(llama, CONFIGS["lora"](), True, monkeypatch)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model(input_ids=ids).logits.grad_fn is None
