"""Method layers on bitsandbytes bases: the method's own class, with quantised weight storage.

:class:`QuantizedBase` goes in front of a method's layer class (``lora.Linear``,
``ia3.Linear``, ``adalora.SVDLinear``) and changes only what depends on how the
base weight is stored: merging dequantises, adds the method's change (computed by
the method's public ``merged_params``/``unmerged_params``), quantises again and
records the rounding error; the rollback snapshot keeps the quantised storage;
DoRA reads the dequantised weight. The forward pass is the method's: the
bitsandbytes layer computes the base output, the adapter adds to it.
"""

from __future__ import annotations

import torch

from peftcore.quantized import RoundingReport

from peftcore_bnb import quant


class _DequantizedView:
    """What DoRA reads of a base layer (``weight``, ``bias``), with the weight dequantised."""

    def __init__(self, base, where: str):
        self.weight = quant.dequantized_weight(base, where)
        self.bias = base.bias


def _view(base, where: str):
    return _DequantizedView(base, where) if quant.is_4bit(base) or quant.is_8bit(base) else base


class QuantizedBase:
    """Mixin for a method layer whose base is ``bnb.nn.Linear4bit`` or ``bnb.nn.Linear8bitLt``."""

    #: LoRA's fused kernel reads a plain float base weight; quantised bases take the plain path
    fast_path_applies = False
    #: the rounding of the latest merge or unmerge of this layer (None before any)
    rounding: RoundingReport | None = None

    # -- reading and writing the base -------------------------------------------------

    @property
    def base_is_quantized(self) -> bool:
        """False once ``merge_and_unload(dequantize=True)`` put a plain layer underneath: the method's own maths."""
        base = self.get_base_layer()
        return quant.is_4bit(base) or quant.is_8bit(base)

    def base_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.get_base_layer()
        bias = None if base.bias is None else base.bias.data.float()
        return quant.dequantized_weight(base, self.location), bias

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None, adapters: list[str], operation: str) -> None:
        base = self.get_base_layer()
        stored = quant.store_weight(base, weight, self.location)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
        error = (stored - weight.float()).abs()
        self.rounding = RoundingReport(module=self.location, adapters=tuple(adapters), operation=operation,
                                       quantization=quant.describe(base), max_abs_error=error.max().item(),
                                       mean_abs_error=error.mean().item())

    def check_representable(self, names: list[str]) -> None:
        """Adapters whose dtype bitsandbytes cannot quantise a sum in (float64, ...) are refused, by name."""
        for name in names:
            for attr, _, _, tensors in self.adapter_holdings(name, self.adapter_layer_names):
                bad = {str(t.dtype) for t in tensors if t.dtype not in quant.REPRESENTABLE_DTYPES}
                if bad:
                    raise ValueError(
                        f"Cannot merge adapter {name!r} into the quantized layer {self.location} "
                        f"({quant.describe(self.get_base_layer())}): its {attr} tensors are {', '.join(sorted(bad))}, "
                        "which bitsandbytes cannot quantize; cast the adapter to float32/bfloat16/float16 first, or "
                        "use merge_and_unload(dequantize=True) for a full-precision model"
                    )

    # -- the merge contract ---------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if not self.base_is_quantized:
            return super().merge(safe_merge, adapter_names)
        names = self.adapters_to_merge(adapter_names)
        if not names:
            return
        self.check_representable(names)
        weight, bias = self.merged_params(*self.base_tensors(), names, safe_merge)
        before = None if self.merged else (quant.snapshot(self.get_base_layer()), self._bias_ref())
        self._store(weight, bias, names, "merge")
        self.merged_adapters.extend(names)
        if before is not None:
            self._unmerged_storage = (*before, self._adapter_fingerprint())

    def unmerge(self) -> None:
        if not self.base_is_quantized:
            return super().unmerge()
        if not self.merged:
            return super().unmerge()  # the method's "already unmerged" warning
        kept = self.__dict__.pop("_unmerged_storage", None)
        if kept is not None and kept[2] == self._adapter_fingerprint():
            # nothing changed since the merge: the exact weights from before it, not a second rounding
            quant.restore(self.get_base_layer(), kept[0])
            if kept[1] is not None:
                self.get_base_layer().bias.data = kept[1]
            self._unmerge_method_state()
            self.merged_adapters.clear()
            return
        weight, bias = self.unmerged_params(*self.base_tensors(), self.merged_adapters)
        self._store(weight, bias, list(self.merged_adapters), "unmerge")
        self.merged_adapters.clear()

    def _bias_ref(self) -> torch.Tensor | None:
        bias = self.get_base_layer().bias
        return None if bias is None else bias.data

    def _adapter_fingerprint(self) -> tuple:
        """Identity and in-place version of every merged adapter tensor, and the scalings: equal means unchanged."""
        parts = []
        for name in self.merged_adapters:
            for *_, tensors in self.adapter_holdings(name, self.adapter_layer_names):
                parts.extend((id(t), t._version) for t in tensors)
            parts.append(repr(getattr(self, "scaling", {}).get(name)))
        return tuple(parts)

    def _unmerge_method_state(self) -> None:
        """Drop what the method keeps per merge (LoRA's DoRA norms), as its own unmerge would."""
        cache = getattr(self, "_weight_norm_cache", None)
        if cache is not None:
            for name in self.merged_adapters:
                cache.pop(name, None)

    def check_merge(self, adapter_names: list[str], safe_merge: bool = False) -> None:
        if not self.base_is_quantized:
            return super().check_merge(adapter_names, safe_merge)
        names = [n for n in adapter_names if n not in self.merged_adapters and n in self.adapter_names]
        if not names:
            return
        self.check_representable(names)
        weight, bias = self.base_tensors()
        if safe_merge:
            self.merged_params(weight, bias, names, safe_merge=True)
        elif bias is None:
            for name in names:
                if self.delta_bias(name) is not None:
                    raise self._no_bias_to_merge_into(name)

    def merge_snapshot(self) -> object:
        if not self.base_is_quantized:
            return super().merge_snapshot(), None
        return super().merge_snapshot(), quant.snapshot(self.get_base_layer())

    def restore_merge(self, snapshot: object) -> None:
        method_state, storage = snapshot
        super().restore_merge(method_state)  # the method's own merge state (DoRA norms, merged_adapters)
        if storage is not None:
            quant.restore(self.get_base_layer(), storage)  # then the quantised weight exactly as it was


class QuantizedLoraMixin(QuantizedBase):
    """LoRA extras: the fused training path on 4-bit bases; DoRA's magnitude reads the dequantised weight."""

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs:
            fused = self._fused_4bit_forward(x)
            if fused is not None:
                return fused
        return super().adapted_forward(x, *args, **kwargs)

    def _fused_4bit_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Training on a ``Linear4bit``: peftcore-lora's fused function with the weight dequantised on demand.

        The same maths as the plain path (bitsandbytes' ``x W.T + b``, then each adapter's
        ``s * B(A(dropout(x)))`` added), without the ``(N, out)`` LoRA product, its scaled copy
        and the sum, and with only the input (or its factors) and the ``(N, r)`` products kept for
        backward. The weight is dequantised in forward and again in backward, as bitsandbytes'
        ``MatMul4Bit`` does: no full-precision copy outlives its GEMM. Inference (no gradient) keeps
        bitsandbytes' own forward and its CPU kernels; every other case takes the plain path.
        """
        from peftcore_lora import fast
        from peftcore_lora.layer import LoraLayer

        base = self.get_base_layer()
        if not quant.is_4bit(base) or not torch.is_grad_enabled() or not fast.enabled():
            return None
        if type(self).adapter_output is not LoraLayer.adapter_output or self.fan_in_fan_out:
            return None
        if not isinstance(x, torch.Tensor) or not (x.requires_grad or any(
                p.requires_grad for name in self.active_adapters if name in self.r
                for p in (self.lora_A[name].weight, self.lora_B[name].weight))):
            return None
        operands = quant.fused_4bit_operands(base, x)
        if operands is None:
            return None
        form, shape, bias = operands
        return fast.linear_forward(self, x, base=(fast.FormedWeight(form, shape), bias))

    def make_dora_layer(self, fan_in_fan_out: bool):
        dora_class = type(super().make_dora_layer(fan_in_fan_out))
        layer = self

        class QuantizedDora(dora_class):
            def update_layer(self, *, base_layer, **kwargs):
                return super().update_layer(base_layer=_view(base_layer, layer.location), **kwargs)

            def forward(self, x, *, base_layer, **kwargs):
                return super().forward(x, base_layer=_view(base_layer, layer.location), **kwargs)

        QuantizedDora.__name__ = QuantizedDora.__qualname__ = f"Quantized{dora_class.__name__}"
        return QuantizedDora(fan_in_fan_out=fan_in_fan_out)


def quantized_class(method_class: type, suffix: str, mixin: type = QuantizedBase) -> type:
    """``method_class`` with quantised storage, named like PEFT's (``Linear4bit``, ``SVDLinear8bitLt``)."""
    return type(f"{method_class.__name__}{suffix}", (mixin, method_class), {"__module__": __name__})
