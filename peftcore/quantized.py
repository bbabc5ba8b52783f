"""Quantised base models, as far as the core knows them (it never imports a quantisation library).

- :class:`RoundingReport`: what merging into quantised weights lost, per layer; quantised
  layer types (a plugin's, e.g. peftcore-bnb) set ``layer.rounding`` when they merge,
  and ``merge_adapter`` collects those into one :class:`MergeRounding` with one warning.
- :func:`unsupported_quantized_layer`: a layer of a quantisation library that only a
  generic wrapper (the one for ``nn.Linear``) would match is refused, naming the plugin
  to install, instead of being wrapped as if its weights were plain floats.
- :func:`dequantize_model`: every quantised module replaced by the plain module the
  ``dequantize_module`` hook returns, and the model's quantisation settings removed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

#: top-level package of a quantisation library -> the peftcore plugin that supports its layers
QUANTIZATION_PLUGINS = {"bitsandbytes": "peftcore-bnb"}
#: what transformers sets on a model it loaded quantized
QUANTIZED_MODEL_FLAGS = ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized")


def is_quantized_model(model: nn.Module) -> bool:
    return any(getattr(model, flag, False) for flag in QUANTIZED_MODEL_FLAGS)


@dataclass(frozen=True)
class RoundingReport:
    """One layer's merge (or unmerge) into quantised weights: error of what is stored against the exact sum."""

    module: str
    adapters: tuple[str, ...]
    operation: str
    quantization: str
    max_abs_error: float
    mean_abs_error: float


@dataclass
class MergeRounding:
    """Every layer's :class:`RoundingReport` of one merge; ``str()`` is the summary."""

    layers: list[RoundingReport] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max((r.max_abs_error for r in self.layers), default=0.0)

    @property
    def mean_abs_error(self) -> float:
        return sum(r.mean_abs_error for r in self.layers) / len(self.layers) if self.layers else 0.0

    def worst(self) -> RoundingReport | None:
        return max(self.layers, key=lambda r: r.max_abs_error, default=None)

    def __str__(self) -> str:
        worst = self.worst()
        if worst is None:
            return "no quantized layer was merged"
        return (f"{worst.operation} re-quantized {len(self.layers)} layer(s) ({worst.quantization}): rounding error "
                f"against the exact sum max {self.max_abs_error:.3g} (worst {worst.module}), mean "
                f"{self.mean_abs_error:.3g}; per layer in .rounding_report")


def collect_rounding(layers: list[nn.Module], operation: str) -> MergeRounding | None:
    """The reports the quantised ``layers`` left for ``operation``; warns once with the summary if any."""
    found = [getattr(layer, "rounding", None) for layer in layers]
    reports = [r for r in found if r is not None and r.operation == operation]
    for layer in layers:
        if getattr(layer, "rounding", None) is not None:
            layer.rounding = None  # consumed: the next merge reports only itself
    if not reports:
        return None
    rounding = MergeRounding(reports)
    warnings.warn(f"Merging into quantized weights is inexact: {rounding}", UserWarning, stacklevel=3)
    return rounding


def quantization_library(module: nn.Module) -> str | None:
    """The quantisation library ``module``'s class comes from (a key of :data:`QUANTIZATION_PLUGINS`), or None."""
    top = type(module).__module__.split(".")[0]
    return top if top in QUANTIZATION_PLUGINS else None


def unsupported_quantized_layer(module: nn.Module, support, module_name: str, method_name: str) -> Exception | None:
    """An error when ``support`` (the best registered wrapper) is a generic one for a quantised ``module``."""
    library = quantization_library(module)
    if library is None:
        return None
    if support is not None and support.base_type.__module__.split(".")[0] == library:
        return None  # a wrapper written for this library's layer type
    plugin = QUANTIZATION_PLUGINS[library]
    return TypeError(
        f"{module_name}: {type(module).__module__}.{type(module).__name__} is a quantized layer, and no installed "
        f"plugin adds {method_name} support for it (a plain-Linear wrapper would treat its packed weights as floats "
        f"and merge wrongly). Install {plugin}: pip install {plugin} (from a checkout: pip install ./plugins/{plugin})"
    )


def dequantize_model(model: nn.Module, dtype=None) -> int:
    """Replace every quantised module of ``model`` by the hook's plain module; return how many were replaced.

    ``dtype`` None: that of the model's other floating-point parameters.
    """
    from peftcore.plugins import hooks
    from peftcore.walking import set_submodule

    if dtype is None:  # the dtype of the model's unquantised floats (embeddings, norms), so the layers agree
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    replaced = 0
    for name, module in list(model.named_modules()):
        if not name or quantization_library(module) is None:
            continue
        plain = hooks.dequantize_module(module=module, dtype=dtype)
        if plain is None:
            library = quantization_library(module)
            raise TypeError(f"{name}: no installed plugin dequantizes {type(module).__name__}; install "
                            f"{QUANTIZATION_PLUGINS[library]}")
        set_submodule(model, name, plain)
        replaced += 1
    forget_quantization(model)
    return replaced


def forget_quantization(model: nn.Module) -> None:
    """Remove what marks a transformers model as quantised, so it saves and loads as a plain model."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    for attr in QUANTIZED_MODEL_FLAGS:
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None
