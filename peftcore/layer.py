"""The base class of every per-layer adapter wrapper (PEFT's ``BaseTunerLayer``).

A method says what one adapter does to one layer; :class:`AdapterLayer` does the
rest: the wrapped ``base_layer``, which adapters exist, are active, merged or
disabled, the forward pass around them (disabled -> base outputs, mixed batches,
merged -> base layer), and merging with ``safe_merge`` all-or-nothing per layer.

What a method defines per adapter:

- always ``update_layer(adapter_name, config, module_name)``: create the adapter's
  tensors in the holders named by ``adapter_layer_names`` (and ``other_param_names``);
- an *additive* method (LoRA, AdaLoRA): ``adapter_output(name, x, base_result)``
  (what the adapter adds to the output), ``delta_weight(name)`` (what merging adds
  to the base weight, in its layout; None for none) and optionally ``delta_bias(name)``;
- a *multiplicative* method (IA3) subclasses :class:`ScalingAdapterLayer` and defines
  the scaling instead; it keeps its own forward.

What a method exposes so that adapters can be combined into new ones
(``add_weighted_adapter``, answered by peftcore-fusion), never by reading its private
attributes: a low-rank method answers :meth:`AdapterLayer.low_rank_delta` (the
adapter's weight change as ``scale · up @ down``) and :meth:`AdapterLayer.set_low_rank_delta`
(write such a product into an adapter); a scaling method answers
:meth:`ScalingAdapterLayer.scaling_vector` and :meth:`ScalingAdapterLayer.set_scaling_vector`.

The attribute names match PEFT's so that tools walking PEFT models (Trainer,
accelerate, conversion scripts) find what they expect.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

#: In ``adapter_names`` of a mixed batch: this row uses no adapter.
BASE_ADAPTER = "__base__"


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``weight`` as (out, in) when the layer stores it as (in, out) (GPT-2's ``Conv1D``)."""
    return weight.T if fan_in_fan_out else weight


def check_finite(tensor: torch.Tensor, adapter_name: str, what: str = "merged weights", where: str = "") -> None:
    if not torch.isfinite(tensor).all():
        place = f" of {where}" if where else ""
        raise ValueError(  # PEFT's first sentence, which scripts match on
            f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken: NaNs or infs in "
            f"the {what}{place}; the base layer is left unchanged"
        )


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


def check_adapter_names_length(adapter_names: list[str], batch_size: int) -> None:
    """A mixed batch names one adapter per row (PEFT's message first, for scripts that match it)."""
    if len(adapter_names) != batch_size:
        raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(adapter_names)} and {batch_size} respectively (adapter_names has {len(adapter_names)} "
                         f"entries but the batch has {batch_size} rows)")


def rows_by_adapter(adapter_names: list[str], batch_size: int) -> dict[str, list[int]]:
    """Batch rows grouped by the adapter named for each (mixed-adapter batches)."""
    check_adapter_names_length(adapter_names, batch_size)
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(row)
    return groups


@dataclass(frozen=True)
class LowRankDelta:
    """An adapter's weight change as a product of two thin factors: ``scale · up @ down``.

    ``up`` is (out, r) and ``down`` is (r, fan_in), where ``fan_in`` is everything a
    weight row spans (``in_features``; ``in_channels · kh · kw`` for a convolution, its
    kernel flattened). ``delta_weight(name)`` equals this product put back into the
    layer's own layout (transposed for GPT-2's ``Conv1D`` and for embeddings, reshaped to
    the kernel for convolutions). The tensors are the adapter's own (no copies): read them.
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def matrix(self) -> torch.Tensor:
        """The (out, fan_in) product ``(up @ down) · scale`` (dense: for references and small layers)."""
        return (self.up @ self.down) * self.scale


def padded_factors(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``up`` (out, k) and ``down`` (k, fan_in) widened with zeros to rank ``rank`` (same product)."""
    k = down.shape[0]
    if k > rank:
        raise ValueError(f"a rank-{k} product does not fit an adapter of rank {rank}")
    if k == rank:
        return up, down
    wide_up = torch.cat([up, up.new_zeros(up.shape[0], rank - k)], 1)
    return wide_up, torch.cat([down, down.new_zeros(rank - k, down.shape[1])])


@cache
def _update_layer_takes_module_name(layer_class: type) -> bool:
    params = inspect.signature(layer_class.update_layer).parameters.values()
    return any(p.name == "module_name" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class AdapterLayer(nn.Module):
    #: attributes that hold per-adapter parameters (``nn.ModuleDict``/``ParameterDict``); only active ones train
    adapter_layer_names: tuple[str, ...] = ()
    #: attributes that hold other per-adapter state (dicts keyed by adapter name; holders that are modules are
    #: placed with the adapter, never trained)
    other_param_names: tuple[str, ...] = ()
    #: the method's ``peft_type``
    peft_type: str = ""
    #: what ``repr`` puts in front of the class name, as PEFT does ("lora.Linear(...)"); None: ``peft_type.lower()``
    repr_prefix: str | None = None

    def __init__(self, base_layer: nn.Module, module_name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        #: dotted path of the wrapped module in the model (for messages); the core keeps it current
        self.module_name = module_name
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

    @property
    def location(self) -> str:
        """Where this layer is, for messages: its module path, or the base layer's class."""
        return self.module_name or type(self.get_base_layer()).__name__

    def __repr__(self) -> str:
        prefix = self.peft_type.lower() if self.repr_prefix is None else self.repr_prefix
        text = super().__repr__()
        return f"{prefix}.{text}" if prefix else text

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

    def _all_available_adapter_names(self) -> list[str]:  # PEFT's name; code that inspects layers calls it
        return sorted(self.adapter_names)

    def _get_available_adapters(self) -> set[str]:  # PEFT's name: the adapters with trainable tensors here
        return {name for attr in self.adapter_layer_names for name in (getattr(self, attr, None) or {})}

    def has_adapter(self, adapter_name: str) -> bool:
        return any(adapter_name in getattr(self, attr) for attr in self.adapter_layer_names)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activate ``adapter_names``; only active adapters' parameters train."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for attr in self.adapter_layer_names:
            holder = getattr(self, attr)
            for key, module in holder.items():
                module.requires_grad_(key in adapter_names)
        self._active_adapter = [name for name in adapter_names if name in self.adapter_names]

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Train (or freeze) adapters ``adapter_names`` here, whether active or not (PEFT's method)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self.adapter_names):
            for _, _, _, params in self.adapter_holdings(name):
                for param in params:
                    param.requires_grad_(requires_grad)

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
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             f"first. ({self.location})")
        for attr in self.adapter_layer_names + self.other_param_names:
            holder = getattr(self, attr, None)
            if holder is not None and adapter_name in holder:
                del holder[adapter_name]
        for attr, value in vars(self).items():  # per-adapter flags a method keeps in plain dicts (not torch's own)
            if not attr.startswith("_") and isinstance(value, dict) and adapter_name in value:
                del value[adapter_name]
        if adapter_name in self._active_adapter:
            remaining = [name for name in self._active_adapter if name != adapter_name]
            if not remaining and self.adapter_names:
                remaining = [self.adapter_names[0]]
            self.set_adapter(remaining)

    # -- adding an adapter -----------------------------------------------------

    def create_adapter(self, adapter_name: str, config, module_name: str | None = None) -> None:
        """Give this layer the adapter ``adapter_name``: what the core calls, and a wrapper's ``__init__``.

        Runs the method's ``update_layer``, puts the new tensors on the base layer's
        device and dtype (:meth:`place_adapter`), and makes the adapter active if the
        layer had none active. Beside active adapters a new one starts inactive and
        frozen; the model decides later which adapters run (``set_adapter``).
        """
        if module_name:
            self.module_name = module_name
        if _update_layer_takes_module_name(type(self)):
            self.update_layer(adapter_name, config, module_name=self.module_name)
        else:
            warnings.warn(
                f"{type(self).__name__}.update_layer(adapter_name, config) should also take module_name "
                "(peftcore hookspec 2 passes it every time)", DeprecationWarning, stacklevel=2,
            )
            self.update_layer(adapter_name, config)
        self.place_adapter(adapter_name)
        if not self.active_adapters:
            self.set_adapter([adapter_name])
        else:  # touching only the newcomer's flags keeps adding adapters flat in their number
            for attr in self.adapter_layer_names:
                holder = getattr(self, attr)
                if adapter_name in holder:
                    holder[adapter_name].requires_grad_(False)

    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        """Create adapter ``adapter_name``'s tensors for this layer (the method's part of :meth:`create_adapter`)."""
        raise NotImplementedError

    def place_adapter(self, adapter_name: str) -> None:
        """Move adapter ``adapter_name``'s tensors to the base layer's device, and its float dtype.

        A base with integer (quantised) weights keeps the adapter in its own float
        dtype. Every holder in ``adapter_layer_names`` and every module holder in
        ``other_param_names`` is moved; ``requires_grad`` is kept.
        """
        ref = next((p for p in self.get_base_layer().parameters() if p.is_floating_point()), None)
        if ref is None:
            ref = next(self.get_base_layer().parameters(), None)
        if ref is None:
            return
        dtype = ref.dtype if ref.is_floating_point() else None
        for _, holder, item, tensors in self.adapter_holdings(adapter_name):
            if all(t.device == ref.device and (dtype is None or t.dtype == dtype) for t in tensors):
                continue  # already in place: Module.to would only cost time (attaching hundreds of layers)
            if isinstance(item, nn.Parameter):
                moved = item.data.to(ref.device, dtype=dtype or item.dtype)
                holder[adapter_name] = nn.Parameter(moved, requires_grad=item.requires_grad)
            else:
                holder[adapter_name] = item.to(ref.device, dtype) if dtype is not None else item.to(ref.device)

    def upcast_adapter(self, adapter_name: str) -> None:
        """Keep adapter ``adapter_name``'s float16/bfloat16 tensors in float32 (PEFT's ``autocast_adapter_dtype``).

        Half-precision adapter weights train poorly; the forward casts inputs to the
        adapter's dtype and the result back, so a float32 adapter runs on a half base.
        """
        for *_, params in self.adapter_holdings(adapter_name):
            for param in params:
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()

    def adapter_holdings(self, adapter_name: str, attrs: tuple[str, ...] | None = None):
        """``(holder name, holder, item, its parameters)`` of adapter ``adapter_name``, holder by holder.

        ``attrs``: the holders to look in (default ``adapter_layer_names`` + ``other_param_names``);
        only ``nn.ModuleDict``/``nn.ParameterDict`` holders that have the adapter count.
        """
        for attr in self.adapter_layer_names + self.other_param_names if attrs is None else attrs:
            holder = getattr(self, attr, None)
            if not isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in holder:
                continue
            item = holder[adapter_name]
            yield attr, holder, item, [item] if isinstance(item, nn.Parameter) else list(item.parameters())

    def empty_adapter(self, adapter_name: str) -> None:
        """Replace adapter ``adapter_name``'s tensors by meta-device tensors of the same shape and dtype
        (``low_cpu_mem_usage``: the weights are about to be loaded; ``set_peft_model_state_dict`` assigns them)."""
        for _, holder, item, _ in self.adapter_holdings(adapter_name):
            if isinstance(item, nn.Parameter):
                holder[adapter_name] = nn.Parameter(torch.empty_like(item, device="meta"),
                                                    requires_grad=item.requires_grad)
            else:
                item.to("meta")

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str) -> None:
        warnings.warn("_move_adapter_to_device_of_base_layer is now place_adapter (and the core calls it)",
                      DeprecationWarning, stacklevel=2)
        self.place_adapter(adapter_name)

    # -- running -----------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self.mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer plus every active adapter, unmerged (additive methods)."""
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in self.active_adapters:
            if self.has_adapter(name):
                result = result + self.adapter_output(name, x, result).to(dtype)
        return result

    def mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """Each row through its own adapter (``BASE_ADAPTER``: none), with one base-layer call."""
        groups = rows_by_adapter(adapter_names, x.shape[0])
        return self.add_outputs_by_row(x, self.base_layer(x, *args, **kwargs), groups)

    def add_outputs_by_row(self, x: torch.Tensor, result: torch.Tensor, groups: dict[str, list[int]]) -> torch.Tensor:
        for name, rows in groups.items():
            if name == BASE_ADAPTER or not self.has_adapter(name):
                continue
            result[rows] = result[rows] + self.adapter_output(name, x[rows], result[rows]).to(result.dtype)
        return result

    def adapter_output(self, name: str, x: torch.Tensor, base_result: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base layer's output ``base_result`` for input ``x``."""
        raise NotImplementedError(f"{type(self).__name__} defines no adapter_output (nor its own adapted_forward)")

    # -- merging -----------------------------------------------------------------

    def delta_weight(self, adapter_name: str) -> torch.Tensor | None:
        """What merging adapter ``adapter_name`` adds to the base weight (its layout); None: nothing."""
        raise NotImplementedError(f"{type(self).__name__} defines no delta_weight, so its adapters cannot be merged")

    def delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        """What merging adds to the base bias; None (the default): nothing."""
        return None

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether ``convert_to_lora`` can factor this layer's weight change (PEFT's method); layers that add a
        weight change to a linear base layer answer True."""
        return False

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor | None:  # PEFT's name for delta_weight
        return self.delta_weight(adapter_name)

    # -- combining adapters (the contract peftcore-fusion relies on) ------------------

    def low_rank_delta(self, adapter_name: str) -> LowRankDelta | None:
        """Adapter ``adapter_name``'s weight change in factored form, or None (the default) if it has none.

        Low-rank methods (LoRA, AdaLoRA) answer; a method whose change is not such a
        product for a reason worth telling (DoRA's magnitude rescaling, a bias it
        changes too) raises ``ValueError`` naming the adapter, the layer and why.
        """
        return None

    def set_low_rank_delta(self, adapter_name: str, up: torch.Tensor, down: torch.Tensor) -> None:
        """Make adapter ``adapter_name``'s weight change equal ``up @ down`` (the layout of :meth:`low_rank_delta`).

        The adapter exists (made for a config of rank >= ``up.shape[1]``); ranks it has
        beyond the product's are set to zero, so they change nothing.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be given a low-rank weight change")

    def merge_one(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """(weight, bias) with adapter ``name`` folded in; new tensors, the arguments stay as they are."""
        delta = self.delta_weight(name)
        if delta is not None:
            weight = weight + delta.to(weight.dtype)
        bias_delta = self.delta_bias(name)
        if bias_delta is not None:
            if bias is None:
                raise self._no_bias_to_merge_into(name)
            bias = bias + bias_delta.to(bias.dtype)
        return weight, bias

    def _no_bias_to_merge_into(self, name: str) -> ValueError:
        return ValueError(f"Cannot merge adapter {name!r} into {self.location}: it changes the bias, but the "
                          "base layer has none")

    def unmerge_one(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """The inverse of :meth:`merge_one`."""
        delta = self.delta_weight(name)
        if delta is not None:
            weight = weight - delta.to(weight.dtype)
        bias_delta = self.delta_bias(name)
        if bias_delta is not None and bias is not None:
            bias = bias - bias_delta.to(bias.dtype)
        return weight, bias

    def merged_params(self, weight: torch.Tensor, bias: torch.Tensor | None, adapter_names: list[str],
                      safe_merge: bool = False):
        """(weight, bias) after folding ``adapter_names`` into the given base tensors; the layer is untouched.

        With ``safe_merge`` every intermediate result is checked for NaN/inf. Layer types
        whose stored weights are not plain floats (quantised ones) call this with
        dequantised tensors and store the result their own way.
        """
        for name in adapter_names:
            weight, bias = self.merge_one(name, weight, bias)
            if safe_merge:
                check_finite(weight, name, where=self.location)
                if bias is not None:
                    check_finite(bias, name, "merged bias", where=self.location)
        return weight, bias

    def unmerged_params(self, weight: torch.Tensor, bias: torch.Tensor | None, adapter_names: list[str]):
        """(weight, bias) with ``adapter_names`` (merged in this order) taken out again, last first."""
        for name in reversed(adapter_names):
            weight, bias = self.unmerge_one(name, weight, bias)
        return weight, bias

    def _base_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.get_base_layer()
        bias = getattr(base, "bias", None)
        return base.weight.data, None if bias is None else bias.data

    def _store_base_params(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        base = self.get_base_layer()
        base.weight.data = weight.to(base.weight.dtype)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or given) adapters into the base weights: all of them, or none on error."""
        names = self.adapters_to_merge(adapter_names)
        if not names:
            return
        self._store_base_params(*self.merged_params(*self._base_params(), names, safe_merge))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged; nothing to do")
            return
        self._store_base_params(*self.unmerged_params(*self._base_params(), self.merged_adapters))
        self.merged_adapters.clear()

    def check_merge(self, adapter_names: list[str], safe_merge: bool = False) -> None:
        """Raise what merging ``adapter_names`` would raise, changing nothing (``merge_adapter`` asks every layer
        first, so that a model is merged entirely or not at all).

        With ``safe_merge`` this computes the merged weights once more to check them for NaN/inf. A layer
        type whose weights are stored another way (quantised) overrides this with its own dry run.
        """
        names = [n for n in adapter_names if n not in self.merged_adapters and n in self.adapter_names]
        if not names:
            return
        if safe_merge:
            self.merged_params(*self._base_params(), names, safe_merge=True)
            return
        if self._base_params()[1] is None:
            for name in names:
                if self.delta_bias(name) is not None:
                    raise self._no_bias_to_merge_into(name)

    def merge_snapshot(self) -> object:
        """What :meth:`restore_merge` needs to put the current (merged) weights back bit for bit.

        References to the weight tensors, not copies: merging and unmerging store new tensors
        (``_store_base_params``), so the old ones stay intact while referenced. A layer type that
        merges in place, or keeps more merge state (LoRA's DoRA norms), extends both methods.
        """
        weight, bias = self._base_params()
        return list(self.merged_adapters), weight, bias

    def restore_merge(self, snapshot: object) -> None:
        merged, weight, bias = snapshot
        self._store_base_params(weight, bias)
        self.merged_adapters[:] = merged

    def adapters_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if self.merged:  # PEFT's two warnings, word for word
            remaining = [name for name in names if name not in self.merged_adapters]
            if remaining:
                warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                              f"You are now additionally merging {','.join(remaining)}.")
            else:
                warnings.warn("All adapters are already merged, nothing to do.")
        return [name for name in names if name not in self.merged_adapters and name in self.adapter_names]


# PEFT divides by (s + 1e-8) when unmerging a scaling. The epsilon alone puts the restored weight off
# by a relative 1e-8/|s|; that passes 1e-6 once |s| < 1e-2, where we warn (and where s == 0
# the weights were multiplied by 0 and cannot come back at all).
UNMERGE_EPS = 1e-8
INEXACT_BELOW = 1e-2


class ScalingAdapterLayer(AdapterLayer):
    """Adapters that multiply the base weights (IA3): merging scales, unmerging divides.

    A method defines ``scaling_vector(name)`` (the learned values), ``weight_scaling(name)``
    (broadcastable to the base weight) and ``bias_scaling(name)`` (to the bias, or None),
    plus its own ``adapted_forward`` and ``mixed_batch_forward``. Dividing a value
    close to zero back out is inexact: unmerging warns, naming how many values are affected.
    """

    def scaling_vector(self, adapter_name: str) -> torch.Tensor:
        """The adapter's learned values (1 everywhere: no change), as the method stores them."""
        raise NotImplementedError

    def set_scaling_vector(self, adapter_name: str, vector: torch.Tensor) -> None:
        """Write ``vector`` (the shape :meth:`scaling_vector` returns) as adapter ``adapter_name``'s values."""
        raise NotImplementedError(f"{type(self).__name__} cannot be given a scaling vector")

    def weight_scaling(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def bias_scaling(self, adapter_name: str) -> torch.Tensor | None:
        return None

    def merge_one(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        weight = weight * self.weight_scaling(name)
        scale = self.bias_scaling(name)
        if scale is not None and bias is not None:
            bias = bias * scale
        return weight, bias

    def unmerge_one(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        self._warn_if_inexact(name)
        weight = weight / (self.weight_scaling(name) + UNMERGE_EPS)
        scale = self.bias_scaling(name)
        if scale is not None and bias is not None:
            bias = bias / (scale + UNMERGE_EPS)
        return weight, bias

    def _warn_if_inexact(self, adapter_name: str) -> None:
        vector = self.scaling_vector(adapter_name).detach()
        small = vector.abs() < INEXACT_BELOW
        if not small.any():
            return
        zeros = int((vector == 0).sum())
        lost = f"; {zeros} are exactly 0, so those weights are lost (set to 0)" if zeros else ""
        warnings.warn(
            f"{self.peft_type} unmerge of adapter {adapter_name!r} in {self.location}: {int(small.sum())} of "
            f"{vector.numel()} scaling values are below {INEXACT_BELOW:g} in magnitude (smallest "
            f"{vector.abs().min().item():.3g}); dividing by them does not restore the base weights exactly{lost}. "
            "Reload the base model for exact weights.",
            stacklevel=4,
        )
