"""LoftQ (Li et al., 2023, arXiv:2310.08659): LoRA factors that absorb the quantization error of the base weight.

For a weight W, LoftQ alternates ``Q = quantize(W - B@A)`` and ``B, A = rank-r SVD of (W - Q)``; the base keeps
``dequantize(Q)`` and ``Q + B@A`` is closer to W than ``Q`` alone. This is PEFT 0.21's algorithm
(``peft.utils.loftq_utils.loftq_init``), written in plain torch so it runs without the bnb library and without a
GPU; the round trips below give the same numbers as bnb's own quantizers:

- 4 bits: NF4 (QLoRA's NormalFloat table), absmax per block of 64 consecutive values of the stored weight, each
  value scaled into [-1, 1] and sent to the nearest table entry (a value on a midpoint goes to the lower one);
- 8 bits: LLM.int8's row-wise int8 (the weight goes through float16 first, as ``bnb.nn.Int8Params`` does).

As in PEFT, ``B@A`` is *not* divided by the adapter's scaling (``lora_alpha / r``): the adapter's output
``Q + scaling·B@A`` approximates W only when ``lora_alpha == r`` (peft issue #1982); :func:`loftq_layer_init`
warns otherwise.
"""

from __future__ import annotations

import warnings

import torch

# bnb's NF4 table (``bnb.functional.get_4bit_type("nf4")``; QLoRA, Dettmers et al. 2023, App. E)
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_BLOCKSIZE = 64  # bnb.nn.Params4bit's default, which PEFT's LoftQ uses


@torch.no_grad()
def nf4_roundtrip(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> torch.Tensor:
    """``dequantize(quantize_nf4(weight))`` in float32, blocks running over the flattened weight (as bnb does)."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=flat.device)
    midpoints = (code[:-1] + code[1:]) / 2
    index = torch.bucketize(scaled, midpoints)
    return (code[index] * absmax.unsqueeze(1)).reshape(-1)[:n].reshape(weight.shape)


@torch.no_grad()
def int8_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """``dequantize(quantize_int8(weight))`` in float32: per row, absmax/127 steps of float16 values (LLM.int8)."""
    if weight.dim() != 2:
        raise ValueError(f"int8 LoftQ quantizes 2-D weights row by row, got shape {tuple(weight.shape)}")
    half = weight.detach().to(torch.float16)
    row_absmax = half.abs().amax(dim=1).float()
    q = torch.round(half * (127.0 / row_absmax.unsqueeze(-1))).to(torch.int8)
    return q.float() * (row_absmax.view(-1, 1) * 7.874015718698502e-3)  # 1/127, bnb's constant


def quantize_roundtrip(weight: torch.Tensor, num_bits: int) -> torch.Tensor:
    if num_bits == 4:
        return nf4_roundtrip(weight)
    if num_bits == 8:
        return int8_roundtrip(weight)
    raise ValueError(f"LoftQ: Only nf4 and int8 quantization is supported (loftq_bits 4 or 8), got {num_bits}")


@torch.no_grad()
def low_rank_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L @ R`` the best rank-``rank`` approximation of ``residual``: ``U√S`` and ``√S Vᴴ``."""
    if residual.dim() != 2:
        raise ValueError(f"LoftQ decomposes 2-D weights, got shape {tuple(residual.shape)}")
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:rank])
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


@torch.no_grad()
def loftq_decompose(
    weight: torch.Tensor, num_bits: int, rank: int, num_iter: int = 1, dequantized: torch.Tensor | None = None,
    transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, A, B)`` in float32 for a 2-D ``weight`` (out, in): ``Q`` the dequantized quantized weight, ``A`` (r, in)
    and ``B`` (out, r) with ``Q + B @ A ≈ weight``.

    ``num_iter`` alternations of quantize(W − B@A) and SVD(W − Q) (the first quantizes W itself). ``dequantized``:
    an already quantized weight, dequantized (a bnb ``Linear4bit``'s): one SVD of ``W − dequantized`` and
    no quantizing here, as PEFT's ``replace_lora_weights_loftq``. ``transposed``: ``weight`` is stored (in, out)
    (GPT-2's Conv1D): it is quantized as stored (blocks and rows of that layout) and ``Q`` returned so, while
    ``A`` and ``B`` factor the (out, in) residual, as the LoRA layer applies them.
    """
    if num_iter <= 0:
        raise ValueError("LoftQ: Number of iterations must be greater than 0")
    w = weight.detach().to(torch.float32)
    oriented = (lambda m: m.T) if transposed else (lambda m: m)
    if dequantized is not None:
        q = dequantized.detach().to(device=w.device, dtype=torch.float32)
        left, right = low_rank_factors(oriented(w - q), rank)
        return q, right, left
    target = w
    for step in range(num_iter):
        q = quantize_roundtrip(target, num_bits)
        left, right = low_rank_factors(oriented(w - q), rank)
        if step + 1 < num_iter:
            target = w - oriented(left @ right)
    return q, right, left


@torch.no_grad()
def loftq_layer_init(layer, adapter_name: str, loftq_config: dict) -> None:
    """LoftQ for one LoRA Linear/Conv1D layer: the base weight becomes the dequantized quantized weight (its dtype
    kept) and lora_A/lora_B the factors of the residual (PEFT's ``LoraLayer.loftq_init``)."""
    base = layer.get_base_layer()
    if not hasattr(layer, "fan_in_fan_out"):
        raise ValueError(f"LoftQ initialisation is only available for Linear/Conv1D layers, not "
                         f"{type(layer).__name__} ({layer.module_name or 'a module'})")
    weight = base.weight
    if not weight.is_floating_point() or type(weight).__name__ in ("Params4bit", "Int8Params"):
        raise ValueError(
            f"LoftQ init (init_lora_weights='loftq') quantizes a full-precision base itself, but "
            f"{layer.module_name or type(base).__name__} is already quantized ({type(base).__name__}, weight "
            f"{weight.dtype}). Load the model unquantized, or keep the quantized model and call "
            "peftcore.replace_lora_weights_loftq(peft_model) (peftcore-bnb) after get_peft_model."
        )
    scaling = layer.scaling[adapter_name]
    if scaling != 1:
        warnings.warn(
            f"LoftQ: {layer.module_name or 'a layer'} has scaling {scaling:g} (lora_alpha / r); as in PEFT the "
            "factors are not divided by it, so base + scaling·B@A approximates the original weight only with "
            "scaling 1 (lora_alpha == r, no rsLoRA)",
            RuntimeWarning, stacklevel=2,
        )
    transposed = bool(layer.fan_in_fan_out)  # Conv1D stores (in, out): quantize as stored, factor as (out, in)
    q, a, b = loftq_decompose(weight, loftq_config["loftq_bits"], layer.r[adapter_name], loftq_config["loftq_iter"],
                              transposed=transposed)
    lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    lora_a.data = a.to(device=lora_a.device, dtype=lora_a.dtype).contiguous()
    lora_b.data = b.to(device=lora_b.device, dtype=lora_b.dtype).contiguous()
    if layer.lora_B[adapter_name].bias is not None:  # lora_bias: starts at zero, as in every other init
        layer.lora_B[adapter_name].bias.data.zero_()
    weight.data = q.to(device=weight.device, dtype=weight.dtype).contiguous()

