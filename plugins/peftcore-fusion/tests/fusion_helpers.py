"""Shared by the fusion tests: identical adapters in peft and in peftcore, and layer-by-layer comparisons."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import peftcore
from peftcore.testing import tiny_model

DENSITY_TYPES = ("ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd")


class ConvNet(nn.Module):
    """Embedding -> 3x3 Conv2d -> 1x1 Conv2d -> Linear: every LoRA layer type PEFT merges."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.pointwise = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, input_ids):
        x = self.emb(input_ids).transpose(1, 2).reshape(input_ids.shape[0], 8, 4, 4)
        return self.head(self.pointwise(self.conv(x)).mean(dim=(2, 3)))


TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "convnet": ["emb", "conv", "pointwise", "head"]}


def base_model(arch: str):
    if arch == "convnet":
        torch.manual_seed(0)
        ids = torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(2))
        return ConvNet().eval(), {"input_ids": ids}
    return tiny_model(arch)


def paired_models(arch: str, tmp_path, ranks=(4, 4, 4), alphas=(8, 4, 16), **lora_kwargs):
    """(peft model, peftcore model, inputs) holding the same random adapters "default", "b", "c".

    The adapters are made in peft, saved in PEFT's format and loaded by peftcore, so both libraries hold
    bit-identical weights.
    """
    import peft

    base, inputs = base_model(arch)
    names = ["default", "b", "c"][: len(ranks)]
    theirs = None
    for name, r, alpha in zip(names, ranks, alphas):
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS[arch], **lora_kwargs)
        if theirs is None:
            theirs = peft.get_peft_model(base, config)
        else:
            theirs.add_adapter(name, config)
    randomize_adapters(theirs, seed=1, scale=0.5)
    theirs.save_pretrained(tmp_path)
    ours_base, _ = base_model(arch)
    ours = peftcore.PeftModel.from_pretrained(ours_base, tmp_path)
    for name in names[1:]:
        ours.load_adapter(tmp_path / name, name)
    return theirs.eval(), ours.eval(), inputs


def randomize_adapters(model, seed: int, scale: float, marker: str = "lora_") -> None:
    """Random values in every adapter tensor whose name contains ``marker`` (fresh LoRA B's are zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if marker in key:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def peft_layers(model) -> dict:
    from peft.tuners.lora import LoraLayer

    return {k.removeprefix("base_model.model."): m for k, m in model.named_modules() if isinstance(m, LoraLayer)}


def our_layers(model) -> dict:
    return dict(model.base_model.adapter_layers())


def largest_relative_gap(theirs, ours, adapter: str) -> float:
    """Max over layers of max|ΔW_peft - ΔW_peftcore| / max|ΔW_peft| for ``adapter``."""
    theirs_by_key, ours_by_key = peft_layers(theirs), our_layers(ours)
    assert set(theirs_by_key) == set(ours_by_key)
    worst = 0.0
    for key, layer in theirs_by_key.items():
        expected = layer.get_delta_weight(adapter).double()
        got = ours_by_key[key].delta_weight(adapter).double()
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
    return worst


def outputs(model, inputs, adapter: str | None = None) -> torch.Tensor:
    if adapter is not None:
        model.set_adapter(adapter)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def float64_delta(layer, adapter: str) -> torch.Tensor:
    """ΔW of an adapter in the (out, fan_in) orientation, in float64, from its factors."""
    delta = layer.low_rank_delta(adapter)
    return delta.up.double() @ delta.down.double() * delta.scale
