"""Weighted merging of IA3 (vectors) and AdaLoRA (triplets) adapters, through the same contract as LoRA's."""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import float64_delta

from peftcore import AdaLoraConfig, IA3Config, PeftModel, get_peft_model
from peftcore.layer import ScalingAdapterLayer
from peftcore.testing import perturb, tiny_model


def _ia3(arch="llama"):
    base, inputs = tiny_model(arch)
    model = get_peft_model(base, IA3Config(task_type="CAUSAL_LM"))
    model.add_adapter("other", IA3Config(task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if ".ia3_l." in key:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    return model, inputs


def test_ia3_linear_is_peft_weighted_sum_of_the_vectors():
    model, _ = _ia3()
    model.add_weighted_adapter(["default", "other"], [0.3, 0.7], "mix")  # IA3's only type in PEFT: the default
    params = dict(model.named_parameters())
    mixed = [n for n in params if n.endswith(".ia3_l.mix")]
    assert len(mixed) == 6
    for name in mixed:
        expected = 0.3 * params[name.replace(".mix", ".default")] + 0.7 * params[name.replace(".mix", ".other")]
        torch.testing.assert_close(params[name], expected)
        assert not params[name].requires_grad


def test_ia3_task_arithmetic_adds_the_weight_changes_exactly():
    """ΔWᵢ = W ⊙ vᵢ - W, so the merged weights must be W + Σ wᵢ·ΔWᵢ (checked on the merged layers, in float64)."""
    model, _ = _ia3()
    weights = [0.6, -0.8]
    model.add_weighted_adapter(["default", "other"], weights, "ta", combination_type="task_arithmetic")
    for key, layer in model.base_model.adapter_layers():
        assert isinstance(layer, ScalingAdapterLayer)
        base = layer.get_base_layer().weight.detach().double()
        scaled = {n: layer.merged_params(base, None, [n])[0] for n in ("default", "other", "ta")}
        expected = base + sum(w * (scaled[n] - base) for n, w in zip(("default", "other"), weights))
        torch.testing.assert_close(scaled["ta"], expected, rtol=0, atol=1e-6, msg=key)


def _adalora():
    base, inputs = tiny_model("bert")
    model = get_peft_model(base, AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_r=4, total_step=10))
    model.add_adapter("frozen", AdaLoraConfig(init_r=6, target_r=6, total_step=10, inference_mode=True, lora_alpha=16))
    perturb(model.base_model.model)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if ".lora_" in key:
                param.normal_(0, 0.5)
    return model, inputs


@pytest.mark.parametrize(("combination_type", "options", "rank"), [
    ("task_arithmetic", {}, 10), ("cat", {}, 10), ("svd", {"svd_rank": 10}, 10),
])
def test_adalora_adapters_combine_exactly(combination_type, options, rank, tmp_path):
    model, inputs = _adalora()
    weights = [0.5, 1.5]
    model.add_weighted_adapter(["default", "frozen"], weights, "mix", combination_type=combination_type, **options)
    assert model.peft_config["mix"].init_r == rank and model.peft_config["mix"].inference_mode
    layers = dict(model.base_model.adapter_layers())
    for key, layer in layers.items():
        expected = sum(w * float64_delta(layer, n) for n, w in zip(("default", "frozen"), weights))
        torch.testing.assert_close(float64_delta(layer, "mix"), expected, rtol=0, atol=1e-5, msg=key)
    model.set_adapter("mix")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    base, _ = tiny_model("bert")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)
