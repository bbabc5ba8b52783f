"""Under gradient checkpointing the fast path recomputes each layer exactly as often as peft does (issue 14).

A checkpointed step once took 2.4x peft's time on a loaded machine; the suspicion was
that rebuilding LoRA inputs in backward (peftcore_lora.rebuild) adds a recomputation
under checkpointing. Counted here, against peft on the same model: it does not.
"""

from __future__ import annotations

import peft
import pytest
import torch
import transformers as t

from peftcore import LoraConfig, get_peft_model

from peftcore_lora import fast, rebuild

LAYERS = 2


def _llama():
    torch.manual_seed(0)
    config = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64)
    return t.LlamaForCausalLM(config)


def _step(model, use_reentrant: bool):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


def _peft_lora_forwards(use_reentrant: bool, monkeypatch) -> int:
    calls = []
    real = peft.tuners.lora.layer.Linear.forward
    monkeypatch.setattr(peft.tuners.lora.layer.Linear, "forward", lambda self, *a, **k: calls.append(1) or real(
        self, *a, **k))
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    _step(model, use_reentrant)
    return len(calls)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # peft calls it
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_layers_run_as_often_as_in_peft_and_no_input_is_recomputed(use_reentrant, monkeypatch):
    peft_forwards = _peft_lora_forwards(use_reentrant, monkeypatch)
    counts = {"forward": 0, "with_rebuild": 0, "grad_forward": 0, "products": 0}
    real_forward, real_rebuild = fast.FusedLoraLinear.forward, rebuild._rebuild

    def forward(ctx, *args):
        counts["forward"] += 1
        counts["with_rebuild"] += args[6] is not None
        return real_forward(ctx, *args)

    def products(structure, tensors):
        counts["products"] += 1
        return real_rebuild(structure, tensors)

    monkeypatch.setattr(fast.FusedLoraLinear, "forward", staticmethod(forward))
    monkeypatch.setattr(rebuild, "_rebuild", products)
    real_plain = fast._lora_forward_into
    monkeypatch.setattr(fast, "_lora_forward_into", lambda y, x, ads, keep: (
        counts.__setitem__("grad_forward", counts["grad_forward"] + (not keep)) or real_plain(y, x, ads, keep)))
    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    _step(model, use_reentrant)
    adapted = 7 * LAYERS  # q, k, v, o, gate, up, down
    if use_reentrant:
        # reentrant: the forward runs without grad (fused maths, no autograd), the recompute with it
        assert counts["grad_forward"] == adapted and counts["forward"] == adapted
    else:
        # non-reentrant: forward and the checkpoint's one recompute; no rebuilding under its saved-tensor hooks
        assert counts["forward"] == 2 * adapted and counts["with_rebuild"] == 0 and counts["products"] == 0
    assert counts["forward"] + counts["grad_forward"] == peft_forwards == 2 * adapted
