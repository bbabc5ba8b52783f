"""The fused LoRA linear (peftcore_lora.fast) against the plain path, peft and float64 maths.

The plain path is the module-by-module computation ``base(x) + B(A(dropout(x))) * s``
(switched on with PEFTCORE_LORA_FAST=0); it is itself checked against peft in the
interop tests, and here once more directly against peft and a float64 formula.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftcore import LoraConfig, get_peft_model
from peftcore.testing import tiny_model

from peftcore_lora import fast, rebuild
from peftcore_lora.layer import Linear as LoraLinear

TOL = dict(atol=1e-5, rtol=1e-5)


class Net(nn.Module):
    """Linear layers of odd sizes, a shared input (like q/k/v) and optionally GPT-2's Conv1D."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, conv1d: bool):
        super().__init__()
        self.q = nn.Linear(d_in, d_hidden)
        self.k = nn.Linear(d_in, d_hidden, bias=False)
        self.c = Conv1D(d_out, d_hidden) if conv1d else nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.c(torch.tanh(self.q(x) * self.k(x)))


def _randomize(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _build(config_kwargs: dict, shapes, conv1d: bool, adapters: int = 1):
    torch.manual_seed(0)
    base = Net(*shapes, conv1d=conv1d)
    config = dict(r=3, lora_alpha=6, target_modules=["q", "k", "c"], fan_in_fan_out=conv1d)
    config.update(config_kwargs)
    model = get_peft_model(base, LoraConfig(**config))
    for i in range(1, adapters):
        model.add_adapter(f"extra{i}", LoraConfig(**{**config, "r": 2 + i}))
    _randomize(model)
    if adapters > 1:
        model.base_model.set_adapter(["default"] + [f"extra{i}" for i in range(1, adapters)])
    return model


def _run(model, x, seed: int, monkeypatch, fast_on: bool, mode: str = "train"):
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1" if fast_on else "0")
    model.train(mode == "train")
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), (x.grad.clone() if x.grad is not None else None), grads


def _compare(model, x, monkeypatch, seed=0, mode="train", exact_forward=False):
    fast_out, fast_dx, fast_grads = _run(model, x, seed, monkeypatch, True, mode)
    plain_out, plain_dx, plain_grads = _run(model, x, seed, monkeypatch, False, mode)
    if exact_forward:
        assert torch.equal(fast_out, plain_out)
    torch.testing.assert_close(fast_out, plain_out, **TOL)
    assert (fast_dx is None) == (plain_dx is None)
    if plain_dx is not None:
        torch.testing.assert_close(fast_dx, plain_dx, **TOL)
    assert sorted(fast_grads) == sorted(plain_grads)
    assert fast_grads, "nothing was trained"
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], **TOL, msg=name)


@pytest.fixture
def counting(monkeypatch):
    """Counts the fused calls so a test knows the fast path ran (or did not)."""
    calls = {"fused": 0}
    original = fast.linear_forward

    def wrapper(layer, x):
        out = original(layer, x)
        calls["fused"] += out is not None
        return out

    monkeypatch.setattr(fast, "linear_forward", wrapper)
    return calls


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("conv1d", [False, True])
def test_random_shapes_forward_and_gradients_match_plain_path(seed, dropout, conv1d, monkeypatch, counting):
    gen = torch.Generator().manual_seed(seed)
    shapes = [int(v) for v in torch.randint(3, 40, (3,), generator=gen)]
    lead = [int(v) for v in torch.randint(1, 5, (int(torch.randint(1, 3, (1,), generator=gen)),), generator=gen)]
    model = _build(dict(lora_dropout=dropout), shapes, conv1d)
    x = torch.randn(*lead, shapes[0], generator=gen, requires_grad=bool(seed % 2))
    _compare(model, x, monkeypatch, seed=seed)
    assert counting["fused"] == 3


@pytest.mark.parametrize(
    "options",
    [dict(lora_bias=True), dict(use_rslora=True), dict(bias="all"), dict(bias="lora_only"),
     dict(rank_pattern={"k": 5}, alpha_pattern={"c": 3})],
    ids=["lora_bias", "rslora", "bias_all", "bias_lora_only", "patterns"],
)
def test_options_match_plain_path(options, monkeypatch, counting):
    model = _build(dict(lora_dropout=0.1, **options), (7, 9, 5), conv1d=False)
    x = torch.randn(2, 4, 7, requires_grad=True)
    _compare(model, x, monkeypatch)
    assert counting["fused"] == 3


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_several_active_adapters_match_plain_path(dropout, monkeypatch, counting):
    model = _build(dict(lora_dropout=dropout), (6, 10, 4), conv1d=True, adapters=3)
    assert len(model.base_model.model.q.active_adapters) == 3
    _compare(model, torch.randn(3, 5, 6, requires_grad=True), monkeypatch, seed=3)
    assert counting["fused"] == 3


def test_eval_and_no_grad_match_plain_path(monkeypatch, counting):
    model = _build(dict(lora_dropout=0.5), (8, 12, 3), conv1d=False)
    x = torch.randn(4, 8)
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
    model.eval()
    with torch.no_grad():
        fused = model(x)
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "0")
    with torch.no_grad():
        plain = model(x)
    torch.testing.assert_close(fused, plain, **TOL)
    assert counting["fused"] == 3
    _compare(model, x, monkeypatch, mode="eval")  # eval with autograd: dropout off, gradients still right


def test_dropout_uses_the_same_mask_as_the_plain_path(monkeypatch):
    """Same seed, same Bernoulli draws: the outputs agree bit for bit, and gradients follow the mask."""
    model = _build(dict(lora_dropout=0.5), (16, 16, 16), conv1d=False)
    x = torch.randn(8, 16, requires_grad=True)
    _compare(model, x, monkeypatch, seed=11, exact_forward=True)
    fast_out, _, _ = _run(model, x, 11, monkeypatch, True)
    other_seed, _, _ = _run(model, x, 12, monkeypatch, True)
    assert not torch.allclose(fast_out, other_seed)  # the mask is random, not a fixed pattern


def test_dropout_matches_float64_reference_with_the_plain_paths_mask(monkeypatch):
    """Rebuild the mask from the RNG and check y = xW.T + b + s*B(A(mask*x/(1-p))) in float64."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 6)
    model = get_peft_model(
        nn.Sequential(copy.deepcopy(layer)), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.4, target_modules=["0"])
    )
    _randomize(model)
    model.train()
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
    x = torch.randn(5, 10)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    keep = torch.empty_like(x).bernoulli_(1 - 0.4)  # the draws nn.Dropout makes on CPU
    wrapped = model.base_model.model[0]
    a, b = wrapped.lora_A["default"].weight.double(), wrapped.lora_B["default"].weight.double()
    dropped = x.double() * keep.double() / (1 - 0.4)
    expected = x.double() @ layer.weight.double().T + layer.bias.double() + 2.0 * (dropped @ a.T) @ b.T
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_saves_the_input_and_small_tensors_only():
    """Autograd keeps x (shared), x@A.T and a bool mask -- no dropout copy, no (N, out) product."""
    torch.manual_seed(0)
    n, d_in, d_out, r = 64, 32, 48, 4
    model = get_peft_model(
        nn.Sequential(nn.Linear(d_in, d_out)), LoraConfig(r=r, lora_dropout=0.2, target_modules=["0"])
    )
    model.train()
    x = torch.randn(n, d_in, requires_grad=True)

    def saved_bytes(fast_on: str, monkeypatch_env):
        monkeypatch_env("PEFTCORE_LORA_FAST", fast_on)
        seen = []

        def pack(t):
            seen.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        x_ptr = x.untyped_storage().data_ptr()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        extra = {}
        for t in seen:
            ptr = t.untyped_storage().data_ptr()
            if ptr != x_ptr and ptr not in params:
                extra[ptr] = t.untyped_storage().nbytes()
        return sum(extra.values()), seen

    import os

    old = os.environ.get("PEFTCORE_LORA_FAST")
    try:
        fused_extra, fused_seen = saved_bytes("1", os.environ.__setitem__)
        plain_extra, _ = saved_bytes("0", os.environ.__setitem__)
    finally:
        if old is None:
            os.environ.pop("PEFTCORE_LORA_FAST", None)
        else:
            os.environ["PEFTCORE_LORA_FAST"] = old
    # x@A.T (fp32) + the bool mask; the plain path also keeps the dropped copy of x (fp32)
    assert fused_extra == n * r * 4 + n * d_in
    assert plain_extra >= n * d_in * 4
    assert any(t.dtype == torch.bool for t in fused_seen)


def test_matches_peft_on_a_tiny_llama(monkeypatch, counting):
    """Loss and adapter gradients of a training step equal peft's (independent implementation)."""
    peft = pytest.importorskip("peft")
    base, inputs = tiny_model("llama")
    base_copy = copy.deepcopy(base)
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    ours = get_peft_model(base, LoraConfig(**config))
    theirs = peft.get_peft_model(base_copy, peft.LoraConfig(**config))
    _randomize(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
    losses, grads = [], []
    for model in (ours, theirs):
        model.train()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert counting["fused"] > 0
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) == 2 * 7 * 2
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], **TOL, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch, counting):
    base, inputs = tiny_model("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.2)
    plain = get_peft_model(copy.deepcopy(base), config)
    _randomize(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(5)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert counting["fused"] > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **TOL, msg=name)


def test_merged_disabled_and_dora_take_the_plain_path(monkeypatch, counting):
    base, inputs = tiny_model("llama")
    reference = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    _randomize(model)
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
    with torch.no_grad():
        unmerged = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
        expected_base = reference(**inputs).logits
        fused_calls = counting["fused"]
        model.merge_adapter()
        merged = model(**inputs).logits
        assert counting["fused"] == fused_calls  # merged layers only run the base layer
    torch.testing.assert_close(merged, unmerged, **TOL)
    assert torch.equal(disabled, expected_base)

    dora = get_peft_model(copy.deepcopy(reference), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    _randomize(dora)
    before = counting["fused"]
    with torch.no_grad():
        with_fast = dora(**inputs).logits
        monkeypatch.setenv("PEFTCORE_LORA_FAST", "0")
        without = dora(**inputs).logits
    assert counting["fused"] == before
    assert torch.equal(with_fast, without)


def test_hooks_quantised_like_subclasses_and_dtype_mismatch_fall_back(monkeypatch, counting):
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
    torch.manual_seed(0)

    class MyLinear(nn.Linear):  # e.g. bitsandbytes' Linear4bit subclasses nn.Linear with its own forward
        def forward(self, x):
            return super().forward(x) * 2

    model = get_peft_model(nn.Sequential(MyLinear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    _randomize(model)
    x = torch.randn(3, 4)
    wrapped = model.base_model.model[0]
    expected = (
        wrapped.base_layer(x) + wrapped.lora_B["default"](wrapped.lora_A["default"](x)) * wrapped.scaling["default"]
    )
    torch.testing.assert_close(model(x), expected, **TOL)
    assert counting["fused"] == 0

    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    seen = []
    model.base_model.model[0].base_layer.register_forward_hook(lambda *a: seen.append(1))
    model(x)
    assert seen == [1] and counting["fused"] == 0

    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    model.base_model.model[0].lora_A["default"].double()
    model.base_model.model[0].lora_B["default"].double()
    model(x)  # the plain path casts; the fused one would not
    assert counting["fused"] == 0


def test_bfloat16_model_uses_the_fast_path(monkeypatch, counting):
    model = _build({}, (12, 16, 8), conv1d=False).to(torch.bfloat16)
    x = torch.randn(4, 12, dtype=torch.bfloat16, requires_grad=True)
    fast_out, fast_dx, fast_grads = _run(model, x, 0, monkeypatch, True)
    plain_out, plain_dx, plain_grads = _run(model, x, 0, monkeypatch, False)
    assert counting["fused"] == 3
    torch.testing.assert_close(fast_out, plain_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(fast_dx, plain_dx, atol=5e-2, rtol=5e-2)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-1, rtol=5e-2, msg=name)


def test_applies_only_to_lora_linear_maths():
    class Custom(LoraLinear):
        def adapter_output(self, name, x, base_result):
            return super().adapter_output(name, x, base_result) * 0

    layer = nn.Linear(3, 3)
    own, custom = (cls(copy.deepcopy(layer), "default", LoraConfig(r=1)) for cls in (LoraLinear, Custom))
    assert own.fast_path_applies and not custom.fast_path_applies
    for wrapper in (own, custom):
        nn.init.ones_(wrapper.lora_B["default"].weight)
    x = torch.randn(2, 3)
    with torch.no_grad():
        assert not torch.allclose(own(x), layer(x))
        torch.testing.assert_close(custom(x), layer(x))  # the subclass's own maths ran, not the fused path


def test_double_backward_is_refused_clearly(monkeypatch):
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
    model = _build({}, (5, 6, 4), conv1d=False)
    x = torch.randn(2, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable|twice|double"):
        grad.sum().backward()


def test_autocast_takes_the_plain_path(monkeypatch, counting):
    model = _build({}, (8, 16, 4), conv1d=False)
    x = torch.randn(3, 8)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PEFTCORE_LORA_FAST", flag)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model(x))
    assert counting["fused"] == 0
    assert outs[0].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])


class GatedBlock(nn.Module):
    """An RMSNorm feeding two projections and a SwiGLU product feeding a third (LLaMA's MLP)."""

    def __init__(self, d: int = 12, hidden: int = 20):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.rand(d) + 0.5)
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.norm_weight * h
        return self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def _gated_model(dropout: float = 0.0):
    torch.manual_seed(0)
    model = get_peft_model(
        GatedBlock(), LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, target_modules=["gate", "up", "down"])
    )
    model.base_model.model.norm_weight.requires_grad_(False)
    _randomize(model)
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_inputs_rebuilt_from_product_factors_give_identical_gradients(dropout, monkeypatch, counting):
    """The rebuilt input is the same bits as the kept one, so every gradient is equal, not just close."""
    model = _gated_model(dropout)
    x = torch.randn(3, 5, 12, requires_grad=True)
    rebuilds = []
    original = rebuild.input_rebuild
    monkeypatch.setattr(rebuild, "input_rebuild", lambda t, n: rebuilds.append(original(t, n)) or rebuilds[-1])
    rebuilt = _run(model, x, 4, monkeypatch, True)
    assert counting["fused"] == 3
    gate, up, down = rebuilds  # gate/up: the norm's product, one rebuild for both; down: act(gate) * up
    assert gate is up and down is not None and down is not gate
    assert gate.pending == down.pending == 0 and gate.value is None  # nothing held after backward
    monkeypatch.setattr(rebuild, "input_rebuild", lambda t, n: None)
    kept = _run(model, x, 4, monkeypatch, True)
    assert torch.equal(rebuilt[0], kept[0]) and torch.equal(rebuilt[1], kept[1])
    assert sorted(rebuilt[2]) == sorted(kept[2]) and len(kept[2]) == 6
    for name in kept[2]:
        assert torch.equal(rebuilt[2][name], kept[2][name]), name
    _compare(model, x, monkeypatch, seed=4)  # and both agree with the plain path


def test_rebuilt_input_is_not_kept_alive(monkeypatch):
    """After forward nothing holds down's input: autograd keeps only the factors it kept anyway."""
    import weakref

    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
    model = _gated_model()
    model.train()
    seen = []
    model.base_model.model.down.register_forward_pre_hook(lambda module, args: seen.append(weakref.ref(args[0])))
    x = torch.randn(4, 12, requires_grad=True)

    out = model(x)
    assert seen[-1]() is None
    out.sum().backward()

    monkeypatch.setattr(rebuild, "input_rebuild", lambda t, n: None)
    out = model(x)
    assert seen[-1]() is not None  # kept when it cannot be rebuilt
    out.sum().backward()


def test_inputs_are_kept_when_they_cannot_be_rebuilt():
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)
    product = a * b
    assert rebuild.input_recipe(product) is not None
    assert rebuild.input_recipe(torch.tanh(product)) is None  # not a product
    assert rebuild.input_recipe(product * 2.0) is None  # a scalar factor autograd does not keep as a tensor
    assert rebuild.input_recipe(product[:2]) is None  # a view
    assert rebuild.input_recipe(a) is None  # a leaf
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        hooked = a * b
        assert rebuild.input_recipe(hooked) is None  # reading the factors would run the unpack hook
    changed = a * b
    with torch.no_grad():
        b.mul_(1.0)  # bumps b's version: autograd's copy of the factor is stale
    assert rebuild.input_recipe(changed) is None


@pytest.mark.parametrize(
    "a, b", [((3, 1, 5), (4, 5)), ((), (2,)), ((2, 3), (3, 2)), ((1,), (7, 1)), ((2, 1), (1, 2, 3))]
)
def test_recipe_shape_rule_is_torchs_broadcasting(a, b):
    try:
        expected = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        expected = None
    assert rebuild._broadcast(a, b) == expected


# -- non-finite values: the fused path gives what the plain path (and peft) gives ----------------------------------


def _forward(model, x, monkeypatch, fast_on: bool, adapter_names=None):
    monkeypatch.setenv("PEFTCORE_LORA_FAST", "1" if fast_on else "0")
    with torch.no_grad():
        return model(x) if adapter_names is None else model(x, adapter_names=adapter_names)


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("grad", [False, True])
def test_a_non_finite_scaling_gives_the_plain_paths_outputs(monkeypatch, scaling, grad):
    """BLAS drops a NaN ``alpha`` in ``addmm_`` at these sizes (the product is added unscaled): the fused
    path used to return finite outputs where the plain path returns NaN."""
    model = _build({}, (64, 64, 64), conv1d=False).eval()
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.scaling["default"] = scaling  # e.g. set_scale(nan), or a config from before validation
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1), requires_grad=grad)
    with torch.set_grad_enabled(grad):
        monkeypatch.setenv("PEFTCORE_LORA_FAST", "1")
        fused = model(x).detach()
        monkeypatch.setenv("PEFTCORE_LORA_FAST", "0")
        plain = model(x).detach()
    assert not torch.isfinite(plain).all()
    torch.testing.assert_close(fused, plain, rtol=0, atol=0, equal_nan=True)
    mixed = {fast_on: _forward(model, x[:4], monkeypatch, fast_on, ["default", "__base__"] * 2) for fast_on in (1, 0)}
    torch.testing.assert_close(mixed[1], mixed[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("where", ["input", "lora_A", "lora_B", "base weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_and_weights_give_the_plain_paths_outputs(monkeypatch, where, value):
    model = _build({}, (64, 64, 64), conv1d=False).eval()
    layer = model.base_model.model.c  # the last layer, so nothing squashes the non-finite values
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if where == "input":
            x[3, 5] = value
        else:
            tensor = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
                      "base weight": layer.base_layer.weight}[where]
            tensor[1, 2] = value
    fused, plain = (_forward(layer, x, monkeypatch, fast_on) for fast_on in (True, False))
    assert not torch.isfinite(plain).all()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("where", ["input", "lora_A", "lora_B"])
def test_non_finite_values_give_the_plain_paths_gradients(monkeypatch, where):
    model = _build({}, (64, 64, 64), conv1d=False)
    layer = model.base_model.model.c
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.no_grad():
        if where == "input":
            x[3, 5] = float("inf")
        else:
            {"lora_A": layer.lora_A, "lora_B": layer.lora_B}[where]["default"].weight[1, 2] = float("nan")
    results = {}
    for fast_on in (True, False):
        monkeypatch.setenv("PEFTCORE_LORA_FAST", "1" if fast_on else "0")
        layer.zero_grad()
        x.grad = None
        out = layer(x)
        out.sum().backward()
        results[fast_on] = (out.detach(), x.grad.clone(), layer.lora_A["default"].weight.grad.clone(),
                            layer.lora_B["default"].weight.grad.clone())
    for fused, plain in zip(results[True], results[False]):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5, equal_nan=True)
