"""``fsdp_auto_wrap_policy`` decides FSDP1's units as PEFT's does, and every unit can be flattened.

FSDP1 itself needs an accelerator device in torch 2.13 ("FSDP needs a non-CPU accelerator
device"), so on CPU the policy is checked without wrapping: FSDP1 asks it, module by module,
whether to make a unit; a unit flattens the parameters it holds outside its sub-units, which
must share one ``requires_grad`` (peft #1702).
"""

from __future__ import annotations

import peft
import pytest
import torch

from peftcore import LoraConfig, PromptTuningConfig, fsdp_auto_wrap_policy, get_peft_model
from peftcore.testing import tiny_model


def units(model, policy) -> list[str]:
    """Names of the modules the policy wraps, asked as FSDP1 asks (children before their parent)."""
    chosen = []

    def visit(name, module):
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)
        if name and policy(module=module, recurse=False, nonwrapped_numel=sum(p.numel() for p in module.parameters())):
            chosen.append(name)

    visit("", model)
    return sorted(chosen)


def mixed_units(model, wrapped: list[str]) -> list[str]:
    """Units (and the root) whose own parameters, outside deeper units, mix frozen and trainable."""
    owners = {}
    for name, param in model.named_parameters():
        owner = max((u for u in wrapped if name.startswith(u + ".")), key=len, default="<root>")
        owners.setdefault(owner, set()).add(param.requires_grad)
    return sorted(owner for owner, flags in owners.items() if len(flags) > 1)


def lora(factory, config_class):
    base, _ = tiny_model("llama")
    return factory(base, config_class(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))


def test_lora_units_are_peft_units_and_none_mixes_requires_grad():
    ours = lora(get_peft_model, LoraConfig)
    theirs = lora(peft.get_peft_model, peft.LoraConfig)
    our_units = units(ours, fsdp_auto_wrap_policy(ours))
    assert our_units == units(theirs, peft.utils.other.fsdp_auto_wrap_policy(theirs))
    assert any(u.endswith("layers.0") for u in our_units) and any(u.endswith("lora_A.default") for u in our_units)
    assert mixed_units(ours, our_units) == []
    # decoder blocks alone (what a transformer-based policy gives) mix the frozen base with the adapters
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    blocks_only = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    assert mixed_units(ours, units(ours, blocks_only)) != []


def test_prompt_encoder_is_a_unit_of_its_own():
    base, _ = tiny_model("llama")
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    wrapped = units(model, fsdp_auto_wrap_policy(model))
    assert "prompt_encoder.default" in wrapped
    assert mixed_units(model, wrapped) == []


def test_unknown_block_class_is_named(monkeypatch):
    model = lora(get_peft_model, LoraConfig)
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "NoSuchLayer")
    with pytest.raises(TypeError, match="NoSuchLayer.*FSDP_TRANSFORMER_CLS_TO_WRAP"):
        fsdp_auto_wrap_policy(model)


def test_fsdp1_refuses_the_cpu_here():
    """Why the FSDP1 run itself is a GPU check (see docs/distributed.md)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="accelerator device"):
            FullyShardedDataParallel(torch.nn.Linear(2, 2))
    finally:
        dist.destroy_process_group()
