"""``add_weighted_adapter`` for every layer method: the checks, the new adapter, and filling it layer by layer.

Uses only the combining contract of ``peftcore.layer`` (``low_rank_delta`` /
``set_low_rank_delta``, ``scaling_vector`` / ``set_scaling_vector``) and the configs'
``combined_config``; it never reads another plugin's attributes. Every check runs
before the new adapter is created, and a failure while filling it deletes it again.
"""

from __future__ import annotations

import math
import warnings
from numbers import Real

import torch

from peftcore.layer import ScalingAdapterLayer

from peftcore_fusion import low_rank
from peftcore_fusion.task_maths import SIGN_METHODS

# PEFT's types, then peftcore's exact one
PEFT_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties",
              "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
LOW_RANK_TYPES = PEFT_TYPES + ("task_arithmetic",)
SCALING_TYPES = ("linear", "task_arithmetic")
NEEDS_DENSITY = tuple(t for t in PEFT_TYPES if t.startswith(("ties", "dare", "magnitude")))
OPTIONS = ("svd_rank", "svd_clamp", "svd_full_matrices", "svd_driver", "density", "majority_sign_method", "seed")
FUSION = "FUSION"


def combine_adapters(model, adapters: list[str], weights: list[float], adapter_name: str,
                     combination_type: str | None, options: dict) -> bool:
    """Create ``adapter_name`` in the ``LayerTuner`` ``model`` from ``adapters`` (names and weights checked)."""
    configs = {name: model.peft_config[name] for name in adapters}
    _check_methods(configs)
    _check_options(options)
    _check_weights(weights)
    layers = [(key, layer) for key, layer in model.adapter_layers() if any(layer.has_adapter(a) for a in adapters)]
    if not layers:
        raise ValueError(f"None of the adapters {adapters} is in any layer of the model")
    scaling = {isinstance(layer, ScalingAdapterLayer) for _, layer in layers}
    if len(scaling) > 1:
        raise ValueError(f"Adapters {adapters} mix scaling layers and additive layers; combine adapters of one method")
    kind = "scaling" if scaling == {True} else "low_rank"
    peft_type = next(iter(configs.values())).peft_type
    combination_type = _resolve_type(combination_type, kind, peft_type, len(adapters))
    _check_option_values(combination_type, options)
    _check_modules_to_save(model, adapters)
    by_name = dict(zip(adapters, weights))
    if kind == "scaling":
        fill = _scaling_filler(combination_type, by_name)
        new_config = configs[adapters[0]].combined_config(list(configs.values()), None)
    else:
        deltas = {key: _deltas(layer, key, adapters) for key, layer in layers}
        rank = _new_rank(combination_type, deltas, options)
        fill = _low_rank_filler(combination_type, deltas, by_name, rank, options)
        new_config = configs[adapters[0]].combined_config(list(configs.values()), rank)
    model.inject_adapter(new_config, adapter_name)
    try:
        with torch.no_grad():
            for key, layer in model.adapter_layers():
                if layer.has_adapter(adapter_name):
                    fill(key, layer, adapter_name)
    except Exception:
        model.delete_adapter(adapter_name)
        raise
    return True


# -- checks ---------------------------------------------------------------------------


def _check_methods(configs: dict) -> None:
    fusion = [name for name, config in configs.items() if config.peft_type == FUSION]
    if fusion:
        raise ValueError(
            f"Adapter(s) {fusion} are learned fusion adapters: their output depends on the input through attention, "
            "so they have no weight change to combine; combine their member adapters instead"
        )
    types = {name: config.peft_type for name, config in configs.items()}
    if len(set(types.values())) > 1:
        raise ValueError(f"Cannot combine adapters of different methods {types}; combine adapters of one method")


def _check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"add_weighted_adapter got unexpected options {unknown}; it accepts {', '.join(OPTIONS)}")


def _check_weights(weights: list[float]) -> None:
    bad = [w for w in weights if not isinstance(w, Real) or isinstance(w, bool) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {bad}")


def _resolve_type(combination_type: str | None, kind: str, peft_type: str, count: int) -> str:
    allowed = LOW_RANK_TYPES if kind == "low_rank" else SCALING_TYPES
    if combination_type is None:
        combination_type = "svd" if kind == "low_rank" else "linear"  # PEFT's defaults (IA3 has no choice)
    if combination_type not in allowed:
        if kind == "scaling" and combination_type in LOW_RANK_TYPES:
            raise ValueError(
                f"{peft_type} adapters scale the weights, so they combine as 'linear' (PEFT: the weighted sum of "
                f"the vectors) or 'task_arithmetic' (exactly Σ wᵢ·ΔWᵢ: 1 + Σ wᵢ·(vᵢ - 1)); {combination_type!r} "
                "prunes or factors low-rank weight changes, which these adapters do not have"
            )
        raise ValueError(f"Unknown combination_type {combination_type!r}; choose one of {', '.join(allowed)}")
    if count == 1 and combination_type in PEFT_TYPES:
        return "linear"  # PEFT's rule: one adapter is only ever rescaled
    return combination_type


def _check_option_values(combination_type: str, options: dict) -> None:
    density = options.get("density")
    if combination_type in NEEDS_DENSITY:
        if density is None:
            raise ValueError(f"combination_type {combination_type!r} needs density (the fraction of entries kept)")
        if not isinstance(density, Real) or isinstance(density, bool) or not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1] (the fraction of entries kept), got {density!r}")
    elif density is not None:
        warnings.warn(f"density is ignored by combination_type {combination_type!r}", stacklevel=4)
    method = options.get("majority_sign_method", "total")
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    rank = options.get("svd_rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"svd_rank must be a positive integer, got {rank!r}")
    clamp = options.get("svd_clamp")
    if clamp is not None and (not isinstance(clamp, Real) or not 0 <= clamp <= 1):
        raise ValueError(f"svd_clamp must be a quantile in [0, 1], got {clamp!r}")
    seed = options.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def _check_modules_to_save(model, adapters: list[str]) -> None:
    """PEFT's rule: two adapters with their own copy of one module cannot be merged (which copy would win?)."""
    shared = [(key, [a for a in adapters if a in wrapper.modules_to_save])
              for key, wrapper in model.saved_module_wrappers()]
    shared = [(key, holders) for key, holders in shared if len(holders) > 1]
    if shared:
        key, holders = shared[0]
        raise ValueError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{len(shared)} such instance(s). (Cannot combine adapters {holders}: each trains its own copy of {key} "
            "(modules_to_save), and the copies cannot be merged; combine adapters without them (load each with a "
            "config whose modules_to_save and task_type are None) and attach a head afterwards.)"
        )


# -- low-rank methods ------------------------------------------------------------------


def _deltas(layer, key: str, adapters: list[str]) -> dict:
    out = {}
    for name in adapters:
        if not layer.has_adapter(name):
            continue
        delta = layer.low_rank_delta(name)  # raises, naming the reason, where a method refuses (DoRA)
        if delta is None:
            raise ValueError(
                f"Adapter {name!r} in {key} ({layer.peft_type} {type(layer).__name__}) exposes no low-rank weight "
                "change (AdapterLayer.low_rank_delta), so it cannot be combined"
            )
        out[name] = delta
    return out


def _new_rank(combination_type: str, deltas: dict, options: dict) -> int:
    if combination_type in low_rank.ON_FACTORS:
        for key, present in deltas.items():
            ranks = {name: d.rank for name, d in present.items()}
            if len(set(ranks.values())) > 1:
                raise ValueError(
                    f"combination_type {combination_type!r} merges the adapters' A and B factors entry by entry, so "
                    f"the ranks must be equal, but in {key} they are {ranks}; use 'cat', 'svd' or "
                    "'task_arithmetic', which combine any ranks"
                )
        return max(d.rank for present in deltas.values() for d in present.values())
    if combination_type == "cat" or (combination_type == "task_arithmetic" and not options.get("svd_rank")):
        return max(sum(d.rank for d in present.values()) for present in deltas.values())
    return options.get("svd_rank") or max(d.rank for present in deltas.values() for d in present.values())


def _low_rank_filler(combination_type: str, deltas: dict, weights: dict, rank: int, options: dict):
    seed = options.get("seed")
    settings = {**options, "generator": None}  # no seed: DARE draws from the global RNG, as PEFT does

    def fill(key, layer, adapter_name):
        present = deltas.get(key, {})
        if not present:  # a layer the united targets reach but none of the adapters: no change
            own = layer.low_rank_delta(adapter_name)
            layer.set_low_rank_delta(adapter_name, own.up.new_zeros(own.up.shape[0], 0),
                                     own.down.new_zeros(0, own.down.shape[1]))
            return
        names = list(present)
        if seed is not None and settings["generator"] is None:  # one stream for the whole model, on its device
            settings["generator"] = torch.Generator(present[names[0]].up.device).manual_seed(seed)
        up, down = low_rank.combine(combination_type, [present[n] for n in names], [weights[n] for n in names], rank,
                                    settings)
        layer.set_low_rank_delta(adapter_name, up, down)

    return fill


# -- scaling methods (IA3) ------------------------------------------------------------------


def _scaling_filler(combination_type: str, weights: dict):
    def fill(key, layer, adapter_name):
        present = [(name, w) for name, w in weights.items() if layer.has_adapter(name)]
        if not present:
            layer.set_scaling_vector(adapter_name, torch.ones_like(layer.scaling_vector(adapter_name)))
            return
        vectors = [(layer.scaling_vector(name), w) for name, w in present]
        if combination_type == "linear":
            combined = sum(v * w for v, w in vectors)
        else:  # ΔW = W ⊙ (v - 1) for each adapter, so Σ wᵢ·ΔWᵢ = W ⊙ Σ wᵢ·(vᵢ - 1)
            combined = 1 + sum((v - 1) * w for v, w in vectors)
        layer.set_scaling_vector(adapter_name, combined)

    return fill
