"""Adapters move between peft and peftcore unchanged, in both directions, with equal outputs."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors import safe_open

import peftcore
from peftcore.testing import TASK_TYPES, tiny_model

ARCHS = ["llama", "gpt2", "bert", "t5"]
CONFIGS = {
    "default": dict(),
    "dora": dict(use_dora=True),
    "all-linear+bias": dict(target_modules="all-linear", bias="lora_only", lora_alpha=16),
    "rslora+patterns": dict(
        use_rslora=True,
        r=4,
        rank_pattern={"layers.1.*": 2, "h.1.*": 2, "layer.1.*": 2, "block.1.*": 2},
        alpha_pattern={".*0.*": 3},
    ),
    "lora_bias": dict(lora_bias=True),
}


def _outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _randomize_adapters(model):
    """Make every adapter tensor (all that trains, and other adapters' tensors) non-trivial."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _peft_config(cls, arch, options):
    return cls(task_type=TASK_TYPES[arch], r=options.pop("r", 4), **options)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_peft_saved_adapter_loads_in_peftcore(arch, variant, tmp_path):
    base, inputs = tiny_model(arch)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), _peft_config(peft.LoraConfig, arch, dict(CONFIGS[variant]))
    ).eval()
    _randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a missing or unexpected tensor would warn
        ours = peftcore.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(ours).__name__ == type(theirs).__name__
    torch.testing.assert_close(_outputs(ours, inputs), _outputs(theirs, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_peftcore_saved_adapter_loads_in_peft(arch, variant, tmp_path):
    base, inputs = tiny_model(arch)
    ours = peftcore.get_peft_model(
        copy.deepcopy(base), _peft_config(peftcore.LoraConfig, arch, dict(CONFIGS[variant]))
    ).eval()
    _randomize_adapters(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_outputs(theirs, inputs), _outputs(ours, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_parameter_names_files_and_config_keys_as_peft(arch, tmp_path):
    base, _ = tiny_model(arch)
    options = dict(use_dora=True, modules_to_save=None)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(peft.LoraConfig, arch, dict(options)))
    ours = peftcore.get_peft_model(copy.deepcopy(base), _peft_config(peftcore.LoraConfig, arch, dict(options)))
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        n for n, p in theirs.named_parameters() if p.requires_grad
    ]

    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    for sub in ("adapter_model.safetensors",):
        with safe_open(tmp_path / "peft" / sub, "pt") as a, safe_open(tmp_path / "ours" / sub, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert a.metadata() == b.metadata() == {"format": "pt"}
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_json) == set(peft_json)
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_dora", "inference_mode", "modules_to_save", "bias"):
        assert our_json[key] == peft_json[key], key
    assert sorted(our_json["target_modules"]) == sorted(peft_json["target_modules"])


def test_non_default_adapters_in_subfolders_both_ways(tmp_path):
    base, inputs = tiny_model("llama")
    ours = peftcore.get_peft_model(copy.deepcopy(base), peftcore.LoraConfig(r=4))
    ours.add_adapter("second", peftcore.LoraConfig(r=2, target_modules=["k_proj"]))
    _randomize_adapters(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs.load_adapter(tmp_path / "second", adapter_name="second")
    for name in ("default", "second"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(_outputs(ours, inputs), _outputs(theirs, inputs), atol=1e-6, rtol=0)

    theirs.save_pretrained(tmp_path / "from_peft")
    back = peftcore.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_peft")
    back.load_adapter(tmp_path / "from_peft" / "second", adapter_name="second")
    back.set_adapter("second")
    torch.testing.assert_close(_outputs(back, inputs), _outputs(theirs, inputs), atol=1e-6, rtol=0)


def test_embedding_and_conv2d_adapters_interoperate(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("emb", torch.nn.Embedding(20, 8))
    base.add_module("conv", torch.nn.Conv2d(1, 4, 3, padding=1))
    ids = torch.randint(0, 20, (2, 5))

    def run(model):
        emb = model.base_model.model.emb if hasattr(model, "base_model") else model.emb
        conv = model.base_model.model.conv if hasattr(model, "base_model") else model.conv
        return emb(ids), conv(torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)))

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["emb", "conv"]))
    _randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftcore.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for a, b in zip(run(ours), run(theirs)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


DEFAULT_TARGET_ARCHS = ["bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "gemma", "t5", "bart", "opt"]


@pytest.mark.parametrize("arch", DEFAULT_TARGET_ARCHS)
def test_default_targets_are_peft_s_and_wrap_the_same_modules(arch):
    """With target_modules=None both libraries pick the same modules (peft's own table is the reference)."""
    ours = peftcore.get_peft_model(tiny_model(arch)[0], peftcore.LoraConfig(task_type=TASK_TYPES[arch]))
    theirs = peft.get_peft_model(tiny_model(arch)[0], peft.LoraConfig(task_type=TASK_TYPES[arch]))
    assert ours.peft_config["default"].target_modules == theirs.peft_config["default"].target_modules
    wrapped = [n for n, m in ours.named_modules() if isinstance(m, peftcore.AdapterLayer)]
    assert wrapped == [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def test_architectures_peft_has_no_default_for_get_attention_targets():
    model, _ = tiny_model("distilbert")
    with pytest.raises(ValueError):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type="SEQ_CLS"))
    ours = peftcore.get_peft_model(model, peftcore.LoraConfig(task_type="SEQ_CLS"))
    assert ours.peft_config["default"].target_modules == {"q_lin", "v_lin"}
    assert {n.rsplit(".", 1)[1] for n, m in ours.named_modules() if isinstance(m, peftcore.AdapterLayer)} == {
        "q_lin",
        "v_lin",
    }
