"""convert_to_lora / save_as_lora: PEFT's conversion of additive adapters to plain LoRA, checked against an SVD
reference in float64 and against peft itself."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import peftcore
from peftcore.testing import tiny_model


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _trained(lib, config, build=MLP):
    torch.manual_seed(0)
    model = lib.get_peft_model(build(), config).eval()
    with torch.no_grad():  # a weight change that is not a tiny-rank product
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0, 0.3)
    return model


def test_truncated_conversion_is_the_closest_low_rank_change():
    adalora = peftcore.AdaLoraConfig(target_modules=["lin0", "lin1"], init_r=6, target_r=6, total_step=10)
    model = _trained(peftcore, adalora)
    assert model.supports_lora_conversion()
    config, state = peftcore.convert_to_lora(model, rank=4)  # AdaLoRA's change has rank <= 6: keep 4 of it
    layer = model.base_model.model.lin0
    delta = layer.delta_weight("default").double()
    u, s, vh = torch.linalg.svd(delta)
    best = (u[:, :4] * s[:4]) @ vh[:4]  # Eckart-Young: the closest rank-4 matrix
    got = state["base_model.model.lin0.lora_B.weight"].double() @ state["base_model.model.lin0.lora_A.weight"].double()
    torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-5)
    assert config.r == config.lora_alpha == 4 and config.target_modules == {"lin0", "lin1"}
    converted = peftcore.get_peft_model(MLP(), config)
    result = peftcore.set_peft_model_state_dict(converted, state)
    assert not result.unexpected_keys and not result.missing_keys
    torch.testing.assert_close(converted.base_model.model.lin0.delta_weight("default").double(), best,
                               atol=1e-5, rtol=1e-5)


def test_dora_is_converted_with_its_magnitude():
    model = _trained(peftcore, peftcore.LoraConfig(target_modules=["lin0"], use_dora=True, r=4))
    with pytest.warns(UserWarning, match="already a LoRA adapter"):
        config, state = peftcore.convert_to_lora(model, rank=10)  # full rank of lin0 (12 x 10): exact
    base = MLP()
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items()
                          if "lora_" not in k})
    converted = peftcore.get_peft_model(base, config).eval()
    peftcore.set_peft_model_state_dict(converted, state)
    x = torch.randn(6, 10)
    torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-4)


def test_peft_loads_the_converted_adapter_with_equal_outputs_to_its_own_conversion(tmp_path):
    models = {lib: _trained(lib, lib.LoraConfig(target_modules=["lin0", "lin1"], r=3)) for lib in (peftcore, peft)}
    x = torch.randn(4, 10)
    with pytest.warns(UserWarning):
        peftcore.save_as_lora(tmp_path / "ours", models[peftcore], rank=3)
    with pytest.warns(UserWarning):
        peft.save_as_lora(tmp_path / "theirs", models[peft], rank=3)
    torch.manual_seed(0)
    ours = peft.PeftModel.from_pretrained(MLP(), tmp_path / "ours").eval()
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(MLP(), tmp_path / "theirs").eval()
    torch.testing.assert_close(ours(x), models[peftcore](x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs(x), models[peft](x), atol=1e-5, rtol=1e-4)


def test_energy_threshold_gives_per_layer_ranks_and_bad_ranks_are_refused():
    model = _trained(peftcore, peftcore.LoraConfig(target_modules=["lin0", "lin1"], r=4))
    with pytest.warns(UserWarning):
        config, state = peftcore.convert_to_lora(model, rank=0.5)
    assert config.rank_pattern and set(config.rank_pattern) <= {"lin0", "lin1"}
    for name, k in config.rank_pattern.items():
        assert state[f"base_model.model.{name}.lora_A.weight"].shape[0] == k
    with pytest.raises(ValueError, match="between 0 and 1"):
        peftcore.convert_to_lora(model, rank=1.5)
    with pytest.raises(ValueError, match="rank of 0"):
        peftcore.convert_to_lora(model, rank=0)
    with pytest.raises(ValueError, match="larger than the weight shape"), pytest.warns(UserWarning):
        peftcore.convert_to_lora(model, rank=50)


def test_methods_that_cannot_be_converted_say_so_like_peft():
    for lib in (peftcore, peft):
        ia3 = lib.get_peft_model(MLP(), lib.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
        assert not ia3.supports_lora_conversion()
        with pytest.raises(TypeError, match="do not support LoRA conversion"):
            lib.convert_to_lora(ia3, rank=2)
        prompt = lib.get_peft_model(tiny_model("llama")[0], lib.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                  num_virtual_tokens=2))
        assert not prompt.supports_lora_conversion()
