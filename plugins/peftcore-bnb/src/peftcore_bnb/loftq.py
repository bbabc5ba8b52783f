"""``replace_lora_weights_loftq``: LoftQ factors for LoRA adapters on an already 4-bit (bitsandbytes) base.

PEFT 0.21's function of that name (``peft.utils.loftq_utils``): the original weights are read, one tensor at a
time, from the model's safetensors file(s); for every LoRA layer on a ``bnb.nn.Linear4bit`` base, lora_A and
lora_B become the rank-r SVD factors of ``W − dequantize(Q)``, Q the layer's own quantized weight (one LoftQ
step; the base is not touched). An optional ``callback(peft_model, module_name) -> bool`` decides per module
whether to keep the new factors (False puts the previous ones back).

The maths is peftcore-lora's (:mod:`peftcore_lora.loftq`); what needs bitsandbytes (dequantizing the base)
is :func:`peftcore_bnb.quant.dequantized_weight`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from peftcore_bnb import quant

_PREFIX = "base_model.model."


class _SafetensorsWeights:
    """Tensors by name from ``model.safetensors`` or a sharded ``model.safetensors.index.json`` folder."""

    def __init__(self, peft_model, model_path: Optional[str]):
        if model_path is None:
            model_path = _model_folder(peft_model)
        suffix = "model.safetensors"
        if not model_path.endswith(suffix):
            model_path = os.path.join(model_path, suffix)
        self.files: dict[str, str] | None = None  # tensor name -> shard, when sharded
        self.path = model_path
        if not os.path.exists(model_path):
            folder = os.path.dirname(model_path)
            index = os.path.join(folder, "model.safetensors.index.json")
            if not os.path.exists(index):
                raise FileNotFoundError(
                    f"Could not find file for {model_path}, ensure that there is a (sharded) safetensors file of "
                    "the model (replace_lora_weights_loftq reads the original, unquantized weights from it)."
                )
            with open(index) as handle:
                weight_map = json.load(handle)["weight_map"]
            self.files = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
        self.base_prefix = getattr(peft_model.get_base_model(), "base_model_prefix", None)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (a path in the transformers model); files saved from the bare backbone lack its
        ``base_model_prefix``, which is then tried without (as PEFT does)."""
        candidates = [name]
        if self.base_prefix and name.startswith(self.base_prefix + "."):
            candidates.append(name[len(self.base_prefix) + 1:])
        for candidate in candidates:
            path = self.path if self.files is None else self.files.get(candidate)
            if path is None:
                continue
            with safe_open(path, framework="pt", device="cpu") as handle:
                try:
                    return handle.get_tensor(candidate)
                except SafetensorError:
                    continue
        raise KeyError(f"replace_lora_weights_loftq: no tensor {' or '.join(map(repr, candidates))} in "
                       f"{self.path if self.files is None else 'the shards of ' + os.path.dirname(self.path)}")


def _model_folder(peft_model) -> str:
    try:
        name = peft_model.get_base_model().config._name_or_path
    except AttributeError as exc:
        raise ValueError(
            "The provided model does not appear to be a transformers model or is a local model. In this case, you "
            "must pass the model_path argument that points to the safetensors file."
        ) from exc
    if name and os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except HFValidationError as exc:
        raise ValueError(
            "The provided model does not appear to be a transformers model or is a local model. In this case, you "
            "must pass the model_path argument that points to the safetensors file."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ValueError("The model.safetensors file must be present on disk, but it could not be found.") from exc


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model,
    model_path: Optional[str] = None,
    adapter_name: str = "default",
    callback: Optional[Callable[[torch.nn.Module, str], bool]] = None,
) -> None:
    """Set the LoRA weights of every layer on a 4-bit bitsandbytes base by LoftQ (PEFT's function).

    Args:
        peft_model: a ``PeftModel`` with LoRA layers on ``bnb.nn.Linear4bit`` bases.
        model_path: the folder (or ``model.safetensors`` file) of the original, unquantized model; by default
            the base model's ``config._name_or_path`` (a local folder, or a model in the local Hugging Face cache).
        adapter_name: the adapter whose weights are replaced.
        callback: called as ``callback(peft_model, module_name)`` after each module's replacement; returning
            False rolls that module back. Calling the function again may improve further (a greedy search).
    """
    try:
        from peftcore_lora.loftq import loftq_decompose
    except ImportError as exc:
        raise ImportError("replace_lora_weights_loftq needs peftcore-lora (pip install peftcore-lora)") from exc
    if not hasattr(peft_model, "get_base_model"):
        raise TypeError("The passed model does not appear to be a valid PeftModel")
    layers = []
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and quant.is_4bit(getattr(module, "get_base_layer", lambda: None)())):
            continue
        if not name.startswith(_PREFIX):
            raise TypeError("The passed model does not appear to be a valid PeftModel")
        if adapter_name in module.lora_A:
            layers.append((name, module))
    if not layers:
        raise ValueError(
            f"No bnb LoRA module found on the model (replace_lora_weights_loftq needs LoRA adapter {adapter_name!r} "
            "on bitsandbytes Linear4bit layers)"
        )
    weights = _SafetensorsWeights(peft_model, model_path)
    unscaled = []
    for name, module in layers:
        name = name[len(_PREFIX):]
        base = module.get_base_layer()
        original = weights.get(name + ".weight")
        shape = (base.out_features, base.in_features)
        if tuple(original.shape) != shape:
            raise ValueError(f"replace_lora_weights_loftq: {name}.weight in the safetensors file has shape "
                             f"{tuple(original.shape)}, the 4-bit layer {shape}: is model_path the model that was "
                             "quantized?")
        dequantized = quant.dequantized_weight(base, name)
        _, lora_a, lora_b = loftq_decompose(original, 4, module.r[adapter_name], dequantized=dequantized)
        if module.scaling[adapter_name] != 1:
            unscaled.append(name)
        a_param, b_param = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        before = (a_param.data, b_param.data)
        a_param.data = lora_a.to(device=a_param.device, dtype=a_param.dtype).contiguous()
        b_param.data = lora_b.to(device=b_param.device, dtype=b_param.dtype).contiguous()
        if callback is not None and not callback(peft_model, name):
            a_param.data, b_param.data = before  # roll back
    if unscaled:
        warnings.warn(
            f"replace_lora_weights_loftq: {len(unscaled)} modules (e.g. {unscaled[0]}) have a scaling other than 1 "
            "(lora_alpha / r); as in PEFT the factors are not divided by it, so base + scaling·B@A approximates the "
            "original weight only with lora_alpha == r",
            RuntimeWarning, stacklevel=2,
        )
