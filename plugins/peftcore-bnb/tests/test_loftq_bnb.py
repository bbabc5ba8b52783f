"""``replace_lora_weights_loftq`` on a tiny Llama loaded in 4 bits by transformers, as a user would.

References: the full-precision model saved next to it, Eckart–Young for the SVD step (float64), and ``peft``'s
own function (run on the CPU: it moves weights to "cuda", redirected by ``AcceleratorCallsOnCpu``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftcore
from peftcore import LoftQConfig, LoraConfig, get_peft_model
from peftcore.testing import AcceleratorCallsOnCpu

from peftcore_bnb import quant

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _lora_layers(model):
    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if hasattr(module, "lora_A") and quant.is_4bit(module.get_base_layer())}


@pytest.fixture
def fp_weights(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return model, {name: p.detach().clone() for name, p in model.named_parameters()}


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.double()


def test_factors_are_the_best_rank_r_fit_of_the_real_quantization_error(load_quantized, tiny_llama_dir,
                                                                        fp_weights, tokens):
    fp_model, original = fp_weights
    model = get_peft_model(load_quantized("4bit"), LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    before = _logits(model, tokens)
    peftcore.replace_lora_weights_loftq(model, model_path=str(tiny_llama_dir))
    layers = _lora_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    for name, layer in layers.items():
        w = original[name + ".weight"].double()
        q = quant.dequantized_weight(layer.get_base_layer(), name).double()
        delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double()
        singular = torch.linalg.svdvals(w - q)
        assert (w - q - delta).norm().item() == pytest.approx(singular[4:].square().sum().sqrt().item(), rel=1e-4)
        assert (w - q - delta).norm() < (w - q).norm(), name
    reference = _logits(fp_model, tokens)
    assert (_logits(model, tokens) - reference).norm() < (before - reference).norm()  # before: B = 0


def test_same_factors_as_peft(load_quantized, tiny_llama_dir):
    peft = pytest.importorskip("peft")
    config = dict(r=4, lora_alpha=4, target_modules=TARGETS)
    theirs = peft.get_peft_model(load_quantized("4bit"), peft.LoraConfig(**config))
    with AcceleratorCallsOnCpu():
        peft.replace_lora_weights_loftq(theirs, model_path=str(tiny_llama_dir))
    ours = get_peft_model(load_quantized("4bit"), LoraConfig(**config))
    peftcore.replace_lora_weights_loftq(ours, model_path=str(tiny_llama_dir))
    their_params = dict(theirs.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, their_params[name], atol=1e-6, rtol=1e-5)
            compared += 1
    assert compared == 2 * 2 * len(TARGETS)


def test_callback_decides_per_module_and_a_refusal_rolls_back(load_quantized, tiny_llama_dir):
    model = get_peft_model(load_quantized("4bit"), LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS))
    layers = _lora_layers(model)
    initial = {name: layer.lora_A["default"].weight.detach().clone() for name, layer in layers.items()}
    seen = []

    def keep_only_attention(peft_model, module_name):
        assert peft_model is model
        seen.append(module_name)
        return "self_attn" in module_name

    peftcore.replace_lora_weights_loftq(model, model_path=str(tiny_llama_dir), callback=keep_only_attention)
    assert sorted(seen) == sorted(layers)
    for name, layer in layers.items():
        b_zero = bool((layer.lora_B["default"].weight == 0).all())
        if "self_attn" in name:
            assert not b_zero and not torch.equal(layer.lora_A["default"].weight, initial[name]), name
        else:
            assert b_zero and torch.equal(layer.lora_A["default"].weight, initial[name]), name


def test_sharded_files_and_the_models_own_folder_are_found(load_quantized, fp_weights, tmp_path):
    fp_model, _ = fp_weights
    fp_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    model = get_peft_model(load_quantized("4bit"), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    peftcore.replace_lora_weights_loftq(model, model_path=str(tmp_path))
    sharded = {n: layer.lora_B["default"].weight.clone() for n, layer in _lora_layers(model).items()}
    model = get_peft_model(load_quantized("4bit"), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    peftcore.replace_lora_weights_loftq(model)  # config._name_or_path: the folder it was loaded from
    for name, layer in _lora_layers(model).items():
        torch.testing.assert_close(layer.lora_B["default"].weight, sharded[name], atol=0, rtol=0)


def test_errors_say_what_is_wrong(load_quantized, fp_weights, tmp_path):
    fp_model, _ = fp_weights
    plain = get_peft_model(fp_model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="No bnb LoRA module found on the model"):
        peftcore.replace_lora_weights_loftq(plain, model_path=str(tmp_path))  # checked before any file is read
    model = get_peft_model(load_quantized("4bit"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(FileNotFoundError, match="ensure that there is a \\(sharded\\) safetensors file"):
        peftcore.replace_lora_weights_loftq(model, model_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="No bnb LoRA module found.*'other'"):
        peftcore.replace_lora_weights_loftq(model, adapter_name="other", model_path=str(tmp_path))
    with pytest.raises(TypeError, match="does not appear to be a valid PeftModel"):
        peftcore.replace_lora_weights_loftq(torch.nn.Linear(2, 2), model_path=str(tmp_path))


def test_loftq_init_on_a_4bit_base_points_to_replace_lora_weights_loftq(load_quantized):
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=LoftQConfig())
    with pytest.raises(ValueError, match=r"already quantized \(Linear4bit.*replace_lora_weights_loftq"):
        get_peft_model(load_quantized("4bit"), config)
