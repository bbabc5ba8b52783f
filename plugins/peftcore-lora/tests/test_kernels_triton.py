"""The Triton kernels, run on CPU through the interpreter (TRITON_INTERPRET=1), on small shapes.

References are float64 matrix products and the PyTorch fast path; the interpreter is
slow (a 256x256 product takes ~0.5 s), so shapes stay in the tens. bf16 inputs are
upcast inside the kernels under the interpreter (its bf16 arithmetic is wrong).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from peftcore_lora import kernels  # noqa: E402
from peftcore_lora.fast import _Adapter, _grouped_delta  # noqa: E402

# against float64: fp32 sums of a few dozen terms drift by ~1e-5 relative
TOLS = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=8e-2, rtol=5e-2),
}
# the kernels sum in tiles of 16 where BLAS uses its own blocking: both fp32, different order
SAME_PATH = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PEFTCORE_LORA_TRITON", "1")
    monkeypatch.setattr(kernels, "_broken", None)
    from peftcore_lora.kernels import triton_lora

    triton_lora.build.cache_clear()
    yield
    triton_lora.build.cache_clear()


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_fused_forward_and_backward_match_float64(dtype, fan_in_fan_out):
    n, d_in, d_out, r, s = 37, 24, 40, 5, 1.75
    x = _rand(n, d_in, dtype=dtype, seed=1).requires_grad_()
    weight = _rand(*((d_in, d_out) if fan_in_fan_out else (d_out, d_in)), dtype=dtype, seed=2, scale=0.2)
    bias = _rand(d_out, dtype=dtype, seed=3)
    A = _rand(r, d_in, dtype=dtype, seed=4, scale=0.3).requires_grad_()
    B = _rand(d_out, r, dtype=dtype, seed=5, scale=0.3).requires_grad_()
    lbias = _rand(d_out, dtype=dtype, seed=6).requires_grad_()
    y = kernels.fused_lora_linear(x, weight, bias, fan_in_fan_out, [_Adapter(A, B, lbias, s, 0.0)])
    assert y is not None, kernels._broken
    dy = _rand(n, d_out, dtype=dtype, seed=7)
    y.backward(dy)

    x64, A64, B64, lb64 = (t.detach().double().requires_grad_() for t in (x, A, B, lbias))
    w64 = weight.double()
    w_eff = w64 if fan_in_fan_out else w64.T
    y64 = x64 @ w_eff + bias.double() + s * ((x64 @ A64.T) @ B64.T + lb64)
    y64.backward(dy.double())
    tol = TOLS[dtype]
    torch.testing.assert_close(y.double(), y64.detach(), **tol)
    for got, want in ((x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad), (lbias.grad, lb64.grad)):
        torch.testing.assert_close(got.double(), want, **tol)


def test_dropout_keeps_the_torch_mask_and_gradients():
    n, d_in, d_out, r, p = 20, 16, 18, 4, 0.3
    x = _rand(n, d_in, seed=1).requires_grad_()
    weight = _rand(d_out, d_in, seed=2, scale=0.2)
    A = _rand(r, d_in, seed=4, scale=0.3).requires_grad_()
    B = _rand(d_out, r, seed=5, scale=0.3).requires_grad_()
    torch.manual_seed(3)
    y = kernels.fused_lora_linear(x, weight, None, False, [_Adapter(A, B, None, 2.0, p)])
    y.square().sum().backward()
    grads = [x.grad, A.grad, B.grad]

    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    torch.manual_seed(3)
    ref = x2 @ weight.T + 2.0 * (torch.nn.functional.dropout(x2, p, True) @ A2.T) @ B2.T
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, **SAME_PATH)
    for got, want in zip(grads, (x2.grad, A2.grad, B2.grad)):
        torch.testing.assert_close(got, want, **SAME_PATH)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_segmented_mixed_batch_matches_grouped_torch_path(dtype):
    rows, T, d_in, d_out = 5, 9, 20, 24
    ranks, scalings = [2, 5, 3], [1.0, 0.5, 2.0]
    x3 = _rand(rows, T, d_in, dtype=dtype, seed=1)
    As = [_rand(r, d_in, dtype=dtype, seed=10 + i, scale=0.3) for i, r in enumerate(ranks)]
    Bs = [_rand(d_out, r, dtype=dtype, seed=20 + i, scale=0.3) for i, r in enumerate(ranks)]
    biases = [None, _rand(d_out, dtype=dtype, seed=30), None]
    picks = [2, 0, 1, 1, 2]
    got = kernels.segmented_lora(x3, As, Bs, biases, scalings, picks)
    assert got is not None, kernels._broken
    want = torch.stack(
        [
            scalings[k]
            * (
                (x3[b].double() @ As[k].double().T) @ Bs[k].double().T
                + (0 if biases[k] is None else biases[k].double())
            )
            for b, k in enumerate(picks)
        ]
    )
    torch.testing.assert_close(got.double(), want, **TOLS[dtype])
    if dtype == torch.float32:
        torch.testing.assert_close(got, _grouped_delta(x3, As, Bs, biases, scalings, picks), **SAME_PATH)


def test_layer_forward_takes_the_triton_path_under_the_interpreter(monkeypatch):
    """A LoRA model routes through the kernels when they are usable, with the plain path's numbers."""
    from torch import nn

    from peftcore import LoraConfig, get_peft_model

    calls = {"n": 0}
    original = kernels.TritonLoraLinear.apply

    def counted(*args):
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(kernels.TritonLoraLinear, "apply", counted)
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)), LoraConfig(r=4, target_modules=["0", "2"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    x = torch.randn(3, 5, 12, requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert calls["n"] == 2
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    dx = x.grad.clone()

    monkeypatch.setenv("PEFTCORE_LORA_FAST", "0")
    model.zero_grad()
    x.grad = None
    plain = model(x)
    plain.sum().backward()
    torch.testing.assert_close(out, plain, **SAME_PATH)
    torch.testing.assert_close(dx, x.grad, **SAME_PATH)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, **SAME_PATH)


def test_usable_only_where_it_should_be(monkeypatch):
    x = torch.zeros(2, 2)
    assert kernels.usable(x)  # CPU + interpreter + PEFTCORE_LORA_TRITON=1 (this module's fixture)
    monkeypatch.setenv("PEFTCORE_LORA_TRITON", "auto")
    assert not kernels.usable(x)  # CPU tensors use PyTorch unless asked
    monkeypatch.setenv("PEFTCORE_LORA_TRITON", "1")
    assert not kernels.usable(x.double())
    monkeypatch.setattr(kernels, "_broken", "RuntimeError: boom")
    assert not kernels.usable(x)


def test_a_failing_kernel_falls_back_for_good(monkeypatch):
    from peftcore_lora.kernels import triton_lora

    def boom(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(triton_lora, "shrink", boom)
    x = _rand(4, 6)
    ad = _Adapter(_rand(2, 6), _rand(5, 2), None, 1.0, 0.0)
    with pytest.warns(UserWarning, match="Triton LoRA kernels failed"):
        assert kernels.fused_lora_linear(x, _rand(5, 6), None, False, [ad]) is None
    assert not kernels.usable(x)


def test_lora_works_without_triton_installed(tmp_path):
    """A subprocess where ``import triton`` fails: LoRA trains and runs mixed batches on CPU."""
    script = tmp_path / "no_triton.py"
    script.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from torch import nn\n"
        "from peftcore import LoraConfig, get_peft_model\n"
        "from peftcore_lora import kernels\n"
        "assert not kernels.triton_installed()\n"
        "m = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=['0']), adapter_name='a')\n"
        "m.add_adapter('b', LoraConfig(r=2, target_modules=['0']))\n"
        "m(torch.randn(3, 4)).sum().backward()\n"
        "m.eval()\n"
        "with torch.no_grad():\n"
        "    m(torch.randn(3, 4), adapter_names=['a', 'b', '__base__'])\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PEFTCORE_LORA_TRITON": "1", "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_compiled_kernels_are_autotuned_over_their_own_arguments(monkeypatch):
    """No GPU here: build the compiled (not interpreted) kernels and check what the autotuner sees."""
    from peftcore_lora.kernels import triton_lora

    monkeypatch.delenv("TRITON_INTERPRET")
    shrink, expand = triton_lora.build(False)
    for tuned, keys in ((shrink, ["K", "R", "T_BUCKET"]), (expand, ["N", "K", "R", "T_BUCKET"])):
        assert tuned.keys == keys and set(keys) <= set(tuned.arg_names)
        assert len(tuned.configs) >= 4
        for config in tuned.configs:
            assert set(config.kwargs) <= set(tuned.arg_names)
            assert all(v >= 16 for v in config.kwargs.values())  # tl.dot needs tiles of at least 16


def test_ranks_above_one_tile_use_the_pytorch_path():
    from peftcore_lora.kernels.triton_lora import MAX_RANK

    r = MAX_RANK + 1
    ad = _Adapter(_rand(r, 8), _rand(6, r), None, 1.0, 0.0)
    assert kernels.fused_lora_linear(_rand(4, 8), _rand(6, 8), None, False, [ad]) is None
    assert kernels.segmented_lora(_rand(2, 3, 8), [ad.A], [ad.B], [None], [1.0], [0, 0]) is None
