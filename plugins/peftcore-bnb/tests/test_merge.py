"""Merging into quantized layers: re-quantized, rounding reported per layer, safe_merge, dequantized export."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from test_layers import KINDS, dequant, lora_config
from torch import nn

import peftcore
from peftcore import get_peft_model


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("kind", KINDS)
def test_merge_reports_rounding_against_the_exact_sum(load_quantized, tokens, kind):
    model = get_peft_model(load_quantized(kind), lora_config())
    layer = q_proj(model)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    exact = dequant(layer.get_base_layer()) + b @ a * 2.0  # alpha / r = 8 / 4
    with torch.no_grad():
        before = model(tokens).logits
    with pytest.warns(UserWarning, match="Merging into quantized weights is inexact") as caught:
        report = model.merge_adapter()
    assert len([w for w in caught if "inexact" in str(w.message)]) == 1  # one summary, not one per layer
    assert len(report.layers) == 6  # q, v, down in 2 decoder layers
    mine = next(r for r in report.layers if r.module == "model.layers.0.self_attn.q_proj")
    error = (dequant(layer.get_base_layer()) - exact).abs()
    # rel 1e-3: ``exact`` was read before the first inference forward, the plugin reads after it, when
    # bitsandbytes has repacked the weight for its CPU kernel (absmax kept in bfloat16)
    assert mine.max_abs_error == pytest.approx(error.max().item(), rel=1e-3)
    assert mine.mean_abs_error == pytest.approx(error.mean().item(), rel=1e-3)
    assert 0 < mine.max_abs_error < 0.1
    with torch.no_grad():
        merged = model(tokens).logits
    assert (merged - before).abs().max() < 0.5  # close, but inexact: the sum was rounded to the grid
    model.unmerge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before, rtol=0, atol=0)  # exact: storage kept from before


@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_after_training_rounds_and_reports(load_quantized, kind):
    model = get_peft_model(load_quantized(kind), lora_config())
    model.merge_adapter()
    with torch.no_grad():
        q_proj(model).lora_B["default"].weight.mul_(2)  # changed while merged: the kept storage no longer fits
    with pytest.warns(UserWarning, match="unmerge re-quantized"):
        report = model.unmerge_adapter()
    assert report is not None and all(r.operation == "unmerge" for r in report.layers)


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_non_finite_and_changes_nothing(load_quantized, tokens, kind):
    model = get_peft_model(load_quantized(kind), lora_config())
    first = q_proj(model)
    last = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        before = model(tokens).logits
    stored = [(layer, layer.get_base_layer().weight, layer.get_base_layer().weight.data.clone())
              for layer in (first, last)]
    with torch.no_grad():
        kept = last.lora_B["default"].weight[0, 0].item()
        last.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs.*model.layers.1.mlp.down_proj"):
        model.merge_adapter(safe_merge=True)
    for layer, param, data in stored:
        assert not layer.merged and layer.get_base_layer().weight is param and torch.equal(param.data, data)
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = kept
        assert torch.equal(model(tokens).logits, before)
        model.merge_adapter(safe_merge=True)
    assert first.merged and last.merged


@pytest.mark.parametrize("kind", KINDS)
def test_dora_merge_and_unmerge(load_quantized, tokens, kind):
    model = get_peft_model(load_quantized(kind), lora_config(use_dora=True))
    with torch.no_grad():
        before = model(tokens).logits
        model.merge_adapter()
        assert (model(tokens).logits - before).abs().max() < 0.5
        model.unmerge_adapter()
        torch.testing.assert_close(model(tokens).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_dequantize_gives_a_plain_model(load_quantized, tokens, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(load_quantized(kind), lora_config())
    # the reference, built here from bitsandbytes' dequantization and the adapter's factors
    expected = {}
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            owner = name.removesuffix(".base_layer")
            w = dequant(layer)
            if owner != name:
                wrapper = model.base_model.model.get_submodule(owner)
                a, b = wrapper.lora_A["default"].weight.detach(), wrapper.lora_B["default"].weight.detach()
                w = w + b @ a * 2.0
            expected[owner] = w
    plain = model.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in plain.modules())
    assert getattr(plain.config, "quantization_config", None) is None and not getattr(plain, "is_loaded_in_4bit", False)
    for name, weight in expected.items():
        module = plain.get_submodule(name)
        assert type(module) is nn.Linear
        torch.testing.assert_close(module.weight.float(), weight, rtol=1e-6, atol=1e-6)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, plain(tokens).logits)


def test_float64_adapter_cannot_be_merged_into_4bit(load_quantized):
    model = get_peft_model(load_quantized("4bit"), lora_config())
    q_proj(model).lora_A["default"].double()
    with pytest.raises(ValueError, match=r"q_proj.*4-bit nf4.*torch.float64.*cannot quantize"):
        model.merge_adapter()
    assert not q_proj(model).merged


def test_a_failure_inside_bitsandbytes_names_the_module(load_quantized, monkeypatch):
    from peftcore_bnb import QuantizedLayerError

    model = get_peft_model(load_quantized("4bit"), lora_config())

    def refuse(*args, **kwargs):
        raise NotImplementedError("no kernel for this on cpu")

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", refuse)
    with pytest.raises(QuantizedLayerError, match=r"model.layers.0.self_attn.q_proj: bitsandbytes .* could not "
                                                   r"dequantize the weight on CPU .*no kernel"):
        model.merge_adapter()


def test_quantized_layer_without_the_plugin_is_refused_by_name(load_quantized):
    import peftcore_bnb.plugin as plugin

    peftcore.unregister_plugin(plugin)
    try:
        with pytest.raises(TypeError, match=r"model.layers.0.self_attn.q_proj: bitsandbytes.*Linear4bit.*peftcore-bnb"):
            get_peft_model(load_quantized("4bit"), lora_config())
    finally:
        peftcore.register_plugin(plugin, name="bnb")
