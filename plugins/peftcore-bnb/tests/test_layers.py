"""LoRA (rsLoRA, DoRA), IA3 and AdaLoRA on bnb Linear4bit / Linear8bitLt, checked against independent maths and peft."""

from __future__ import annotations

import copy
import pathlib

import bitsandbytes as bnb
import pytest
import torch

import peftcore
from peftcore import get_peft_model

KINDS = ["4bit", "8bit"]
REPO = pathlib.Path(__file__).resolve().parents[3]


def dequant(layer) -> torch.Tensor:
    """The base weight in float32, straight from bitsandbytes (not through the plugin)."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bnb's in-place CPU repacking (inference mode)
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        return bnb.functional.dequantize_4bit(data, state).float()
    scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
    return w.data.float() * scb.float().view(-1, 1) / 127


def lora_config(**kw):
    kw.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    return peftcore.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)


def test_method_packages_never_import_bitsandbytes():
    for method in ("lora", "ia3", "adalora"):
        for source in (REPO / "plugins" / f"peftcore-{method}" / "src").rglob("*.py"):
            assert "bitsandbytes" not in source.read_text(), source


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make_config, class_name", [
    (lambda: lora_config(), "Linear"),
    (lambda: peftcore.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "Linear"),
    (lambda: peftcore.AdaLoraConfig(target_modules=["q_proj", "v_proj"], total_step=10, init_r=4, target_r=2),
     "SVDLinear"),
])
def test_each_method_wraps_quantized_layers(load_quantized, tokens, kind, make_config, class_name):
    model = get_peft_model(load_quantized(kind), make_config())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    suffix = "4bit" if kind == "4bit" else "8bitLt"
    assert type(layer).__name__ == class_name + suffix
    assert type(layer.get_base_layer()) is (bnb.nn.Linear4bit if kind == "4bit" else bnb.nn.Linear8bitLt)
    out = model(tokens).logits
    out.sum().backward()  # trains: adapter gets gradients, the quantized base does not
    trained = [p for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}])
def test_lora_output_is_base_plus_low_rank_term(load_quantized, kind, extra):
    model = get_peft_model(load_quantized(kind), lora_config(**extra))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = 8 / 2 if extra else 8 / 4  # alpha/sqrt(r) for rsLoRA, alpha/r otherwise
    with torch.no_grad():
        expected = layer.get_base_layer()(x) + x @ a.T @ b.T * scale
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_equal_peft_on_the_same_quantized_base(load_quantized, tokens, kind, tmp_path):
    import peft

    ours = get_peft_model(load_quantized(kind), lora_config())
    theirs = peft.get_peft_model(load_quantized(kind), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    ours.save_pretrained(tmp_path / "ours")
    theirs.load_adapter(str(tmp_path / "ours"), adapter_name="from_ours")
    theirs.set_adapter("from_ours")
    ours.eval(), theirs.eval()  # bnb's CPU 4-bit kernel differs between training and inference mode
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, rtol=1e-4, atol=1e-4)
    # and the reverse: an adapter peft trained (fresh model, its own init) loads in peftcore with peft's outputs
    torch.manual_seed(3)
    theirs = peft.get_peft_model(load_quantized(kind), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = peftcore.PeftModel.from_pretrained(load_quantized(kind), str(tmp_path / "theirs")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, theirs(tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_dora_on_quantized_base_equals_peft(load_quantized, tokens, kind, tmp_path):
    import peft

    ours = get_peft_model(load_quantized(kind), lora_config(use_dora=True))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_quantized(kind), str(tmp_path), is_trainable=True)
    # training mode (no dropout configured): bitsandbytes keeps its standard 4-bit layout; in inference mode
    # on AVX512-BF16 CPUs it repacks the weight, which peft 0.21's DoRA does not unpack before dequantizing
    ours.train(), theirs.train()
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, rtol=1e-4, atol=1e-4)
        ours.eval(), theirs.eval()
        reference = ours.train()(tokens).logits
        # ours reads the repacked weight correctly: inference equals training mode up to the bf16 kernel
        torch.testing.assert_close(ours.eval()(tokens).logits, reference, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_and_disable_equal_each_adapter_alone(load_quantized, tokens, kind):
    model = get_peft_model(load_quantized(kind), lora_config())
    model.add_adapter("other", lora_config())
    model.eval()
    with torch.no_grad():
        alone = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            alone[name] = model(tokens).logits
        with model.disable_adapter():
            alone["__base__"] = model(tokens).logits
        names = ["default", "__base__", "other"]
        mixed = model(tokens, adapter_names=names).logits
    assert not torch.allclose(alone["default"], alone["other"])
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_model_for_kbit_training_matches_peft(load_quantized, kind):
    import peft

    ours = peftcore.prepare_model_for_kbit_training(load_quantized(kind))
    theirs = peft.prepare_model_for_kbit_training(load_quantized(kind))
    mine = {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()}
    assert mine == {n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert ours.is_gradient_checkpointing and theirs.is_gradient_checkpointing


def test_training_after_an_evaluation_still_reaches_every_adapter(load_quantized, tokens):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel (AVX512-BF16), which does not back-propagate."""
    model = get_peft_model(load_quantized("4bit"), lora_config(target_modules=["q_proj"]))
    model.eval()
    with torch.no_grad():
        model(tokens)
    model.train()
    model(tokens).logits.pow(2).mean().backward()
    first = model.base_model.model.model.layers[0].self_attn.q_proj
    assert first.lora_B["default"].weight.grad is not None
    assert first.lora_B["default"].weight.grad.abs().sum() > 0


def test_state_dict_after_an_evaluation_leaves_the_outputs_unchanged(load_quantized, tokens):
    model = get_peft_model(load_quantized("4bit"), lora_config()).eval()
    with torch.no_grad():
        before = model(tokens).logits
        model.state_dict()
        assert torch.equal(model(tokens).logits, before)
