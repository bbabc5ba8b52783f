"""autocast_adapter_dtype: on a half-precision base, adapters are float32 unless told otherwise (as in PEFT)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import peftcore
from peftcore.testing import tiny_model

CONFIGS = {
    "lora": lambda lib, **kw: lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], **kw),
    "dora": lambda lib, **kw: lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, **kw),
    "ia3": lambda lib, **kw: lib.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                           **kw),
    "adalora": lambda lib, **kw: lib.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                   target_modules=["q_proj", "v_proj"], **kw),
}


def adapter_dtypes(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if any(k in n for k in ("lora_", "ia3_"))}


@pytest.fixture(scope="module")
def half_llama():
    model, inputs = tiny_model("llama")
    return model.to(torch.bfloat16), inputs


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_adapter_dtypes_match_peft(half_llama, method, autocast):
    base, inputs = half_llama
    ours = peftcore.get_peft_model(copy.deepcopy(base), CONFIGS[method](peftcore), autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(copy.deepcopy(base), CONFIGS[method](peft), autocast_adapter_dtype=autocast)
    assert adapter_dtypes(ours) == adapter_dtypes(theirs)
    assert set(adapter_dtypes(ours).values()) == {torch.float32 if autocast else torch.bfloat16}
    second = {"inference_mode": True} if method == "adalora" else {}  # AdaLoRA: one trainable adapter
    ours.add_adapter("second", CONFIGS[method](peftcore, **second), autocast_adapter_dtype=autocast)
    theirs.add_adapter("second", CONFIGS[method](peft, **second), autocast_adapter_dtype=autocast)
    assert adapter_dtypes(ours) == adapter_dtypes(theirs)
    assert ours(**inputs).logits.dtype == torch.bfloat16


def test_a_float32_file_loads_without_rounding_onto_a_half_base(half_llama, tmp_path):
    base, inputs = half_llama
    trained = peftcore.get_peft_model(copy.deepcopy(base), CONFIGS["lora"](peftcore))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1 + 1e-4)  # values bfloat16 cannot hold
    trained.save_pretrained(tmp_path)
    want = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_" in n}
    assert {t.dtype for t in want.values()} == {torch.float32}
    loaded = peftcore.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path, adapter_name="again")
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    for name, value in want.items():
        assert torch.equal(got[name], value), name
        assert torch.equal(got[name.replace(".default.", ".again.")], value), name
