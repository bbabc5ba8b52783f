"""Mixed-adapter batches through the grouped (gathered + bmm) path.

References: each row run alone with its adapter active (``set_adapter``) or with the
adapters disabled for ``__base__`` rows -- no mixed-batch code involved -- and the
plain per-adapter loop (PEFTCORE_LORA_FAST=0).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftcore import LoraConfig, get_peft_model
from peftcore.testing import tiny_model

from peftcore_lora import fast

TOL = dict(atol=1e-5, rtol=1e-5)


def _randomize(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


@pytest.fixture
def grouped_calls(monkeypatch):
    calls = {"n": 0}
    original = fast.mixed_batch_delta

    def wrapper(layer, x, adapter_names, result):
        out = original(layer, x, adapter_names, result)
        calls["n"] += out is not None
        return out

    monkeypatch.setattr(fast, "mixed_batch_delta", wrapper)
    return calls


def _adapters(k: int, arch: str = "llama", **options):
    base, inputs = tiny_model(arch)
    ids = torch.randint(3, 60, (6, 5), generator=torch.Generator().manual_seed(1))
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", **options), adapter_name="a0"
    )
    for i in range(1, k):
        # different ranks and scalings per adapter: the grouped path pads ranks with zeros
        model.add_adapter(f"a{i}", LoraConfig(r=2 + i, lora_alpha=3 + i, target_modules="all-linear", **options))
    _randomize(model)
    model.eval()
    return model, ids


def _row_by_row(model, ids, names):
    rows = []
    with torch.no_grad():
        for row, name in zip(ids, names):
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model(input_ids=row[None]).logits)
            else:
                model.set_adapter(name)
                rows.append(model(input_ids=row[None]).logits)
    return torch.cat(rows)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("with_base_rows", [False, True])
def test_grouped_mixed_batch_equals_each_row_alone(k, with_base_rows, monkeypatch, grouped_calls):
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
    model, ids = _adapters(k)
    names = [f"a{row % k}" for row in range(ids.shape[0])]
    if with_base_rows:
        names[1] = names[4] = "__base__"
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    assert grouped_calls["n"] > 0
    expected = _row_by_row(model, ids, names)
    torch.testing.assert_close(mixed, expected, **TOL)


def test_grouped_equals_the_plain_loop_with_lora_bias_and_gpt2(monkeypatch, grouped_calls):
    model, ids = _adapters(3, arch="gpt2", lora_bias=True)
    names = ["a2", "a0", "__base__", "a2", "a1", "a0"]
    with torch.no_grad():
        monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
        grouped = model(input_ids=ids, adapter_names=names).logits
        calls = grouped_calls["n"]
        monkeypatch.setenv("PEFTCORE_LORA_FAST", "0")
        plain = model(input_ids=ids, adapter_names=names).logits
    assert calls > 0 and grouped_calls["n"] == calls
    torch.testing.assert_close(grouped, plain, **TOL)


@pytest.mark.parametrize("names", [["y", "x", "__base__", "z", "y"], ["y", "x", "y", "z", "y"], ["y"] * 5],
                         ids=["with_base_row", "all_rows_in_place", "one_adapter_in_place"])
def test_layer_level_against_float64_formula(names):
    """One Linear, three adapters of different rank (one with lora_bias), rows of 2-D and 3-D inputs."""
    torch.manual_seed(0)
    layer = nn.Linear(7, 5)
    model = get_peft_model(
        nn.Sequential(copy.deepcopy(layer)), LoraConfig(r=2, lora_alpha=5, target_modules=["0"]), adapter_name="x"
    )
    model.add_adapter("y", LoraConfig(r=4, lora_alpha=3, target_modules=["0"], lora_bias=True))
    model.add_adapter("z", LoraConfig(r=1, lora_alpha=1, use_rslora=True, target_modules=["0"]))
    _randomize(model)
    model.eval()
    wrapped = model.base_model.model[0]
    for shape in [(5, 7), (5, 3, 7)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            out = wrapped(x, adapter_names=names)
        for row, name in enumerate(names):
            expected = x[row].double() @ layer.weight.double().T + layer.bias.double()
            if name != "__base__":
                a = wrapped.lora_A[name].weight.double()
                b = wrapped.lora_B[name].weight.double()
                lora = (x[row].double() @ a.T) @ b.T
                if wrapped.lora_B[name].bias is not None:
                    lora = lora + wrapped.lora_B[name].bias.double()
                expected = expected + wrapped.scaling[name] * lora
            torch.testing.assert_close(out[row].double(), expected, atol=1e-5, rtol=0)


def test_grouped_path_keeps_autograd_working(monkeypatch, grouped_calls):
    """eval() without no_grad: out-of-place ops, gradients equal the plain loop's."""
    model, ids = _adapters(2)
    names = ["a1", "a0", "__base__", "a1", "a0", "a0"]
    grads = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PEFTCORE_LORA_FAST", flag)
        for p in model.parameters():
            p.grad = None
        for name in ("a0", "a1"):
            for layer in model.base_model.model.modules():
                if hasattr(layer, "lora_A") and name in layer.lora_A:
                    layer.lora_A[name].requires_grad_(True)
                    layer.lora_B[name].requires_grad_(True)
        model(input_ids=ids, adapter_names=names).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grouped_calls["n"] > 0
    assert sorted(grads[0]) == sorted(grads[1]) and grads[0]
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], **TOL, msg=name)


def test_dora_embedding_and_conv_keep_their_behaviour(monkeypatch, grouped_calls):
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
    base, _ = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model.eval()
    with pytest.raises(ValueError, match="DoRA"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long), adapter_names=["default", "__base__"])

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "1"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=3, target_modules=["0", "1"]))
    _randomize(model)
    model.eval()
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        grouped = model(ids, adapter_names=names)
        monkeypatch.setenv("PEFTCORE_LORA_FAST", "0")
        plain = model(ids, adapter_names=names)
    assert grouped_calls["n"] == 1  # the Linear; the Embedding keeps its own loop
    torch.testing.assert_close(grouped, plain, **TOL)


def test_k1_to_k16_does_the_same_work():
    """The grouped path gathers per row, so its op count does not depend on the number of adapters."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16))
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["0"]), adapter_name="a0")
    for i in range(1, 16):
        model.add_adapter(f"a{i}", LoraConfig(r=4, target_modules=["0"]))
    model.eval()
    x = torch.randn(16, 3, 16)
    counts = []
    for k in (2, 16):
        names = [f"a{row % k}" for row in range(16)]
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x, adapter_names=names)
        counts.append(sum(e.count for e in prof.key_averages() if e.key in ("aten::bmm", "aten::mm", "aten::addmm")))
    assert counts[0] == counts[1]
