"""The base class of every per-layer adapter wrapper (PEFT's ``BaseTunerLayer``).

Keeps the bookkeeping every method needs: the wrapped ``base_layer``, which
adapters exist, are active, merged, or disabled. A method subclasses it and
fills in ``update_layer``, ``forward``, ``merge``/``unmerge`` and
``delta_weight``. The attribute names match PEFT's so that tools walking PEFT
models (Trainer, accelerate, conversion scripts) find what they expect.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class AdapterLayer(nn.Module):
    #: attributes that hold per-adapter parameters (``nn.ModuleDict``/``ParameterDict``)
    adapter_layer_names: tuple[str, ...] = ()
    #: attributes that hold other per-adapter state (plain dicts keyed by adapter name)
    other_param_names: tuple[str, ...] = ()
    #: the method's ``peft_type``
    peft_type: str = ""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self._active_adapter: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False

    # -- what the wrapped module looks like from outside ----------------------

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    # -- adapter bookkeeping ---------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names + self.other_param_names:
            for name in getattr(self, attr, {}) or {}:
                if name not in names:
                    names.append(name)
        return names

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activate ``adapter_names``; only active adapters' parameters train."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for attr in self.adapter_layer_names:
            holder = getattr(self, attr)
            for key, module in holder.items():
                module.requires_grad_(key in adapter_names)
        self._active_adapter = [name for name in adapter_names if name in self.adapter_names]

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for attr in self.adapter_layer_names:
                getattr(self, attr).requires_grad_(False)
            self._disable_adapters = True

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter {adapter_name!r} while it is merged; unmerge first")
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr, None)
            if holder is not None and adapter_name in holder:
                del holder[adapter_name]
        if adapter_name in self._active_adapter:
            remaining = [name for name in self._active_adapter if name != adapter_name]
            if not remaining and self.adapter_names:
                remaining = [self.adapter_names[0]]
            self.set_adapter(remaining)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        ref = next((p for p in base.parameters() if p.is_floating_point()), None)
        if ref is None:
            ref = next(base.parameters(), None)
        if ref is None:
            return
        for attr in self.adapter_layer_names:
            holder = getattr(self, attr)
            if adapter_name in holder:
                item = holder[adapter_name]
                tensors = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                if all(t.device == ref.device and (t.dtype == ref.dtype or not ref.is_floating_point()) for t in tensors):
                    continue  # already in place: Module.to would only cost time (attaching hundreds of layers)
                if ref.is_floating_point():
                    holder[adapter_name] = item.to(ref.device, dtype=ref.dtype) if isinstance(item, nn.Parameter) else item.to(ref.device, ref.dtype)
                else:  # quantised base weights: keep adapters in their own float dtype
                    holder[adapter_name] = item.to(ref.device)

    # -- to be provided by the method -----------------------------------------

    def update_layer(self, adapter_name: str, config) -> None:
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change this adapter makes to ``base_layer.weight`` when merged."""
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    # -- helpers shared by methods --------------------------------------------

    def adapters_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        already = [name for name in names if name in self.merged_adapters]
        if already:
            warnings.warn(f"Adapters {already} are already merged into {type(self.get_base_layer()).__name__}; skipped")
        return [name for name in names if name not in self.merged_adapters and name in self.adapter_names]


def check_finite(tensor: torch.Tensor, adapter_name: str, what: str = "merged weights") -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"NaNs or infs in the {what} after merging adapter {adapter_name!r}; the base layer is left unchanged")


def linear_features(base_layer: nn.Module, config, module_name: str = "") -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or transformers ``Conv1D``.

    ``Conv1D`` (GPT-2) stores its weight as (in, out); like PEFT, correct the
    config's ``fan_in_fan_out`` to match the layer, with a warning.
    """
    from transformers.pytorch_utils import Conv1D

    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        if not config.fan_in_fan_out:
            warnings.warn(f"{module_name}: Conv1D stores weights as (in, out); setting fan_in_fan_out=True")
            config.fan_in_fan_out = True
        return in_features, out_features
    if config.fan_in_fan_out:
        warnings.warn(f"{module_name}: nn.Linear stores weights as (out, in); setting fan_in_fan_out=False")
        config.fan_in_fan_out = False
    return base_layer.in_features, base_layer.out_features


def rows_by_adapter(adapter_names: list[str], batch_size: int) -> dict[str, list[int]]:
    """Batch rows grouped by the adapter named for each (mixed-adapter batches)."""
    if len(adapter_names) != batch_size:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} rows")
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(row)
    return groups
