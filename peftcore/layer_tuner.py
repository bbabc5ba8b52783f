"""``LayerTuner``: a model with adapter layers injected (PEFT's ``BaseTuner``: ``LoraModel``, ...).

One walk over the model finds the targets (``is_target_module`` hook) and
wraps each with the most specific registered wrapper (``register_layer_support``);
everything after that is bookkeeping across the injected layers.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from torch import nn

from peftcore import matching
from peftcore.adapter_names import check_adapter_name
from peftcore.errors import NoMatchingPeftModuleError
from peftcore.layer import AdapterLayer
from peftcore.modules_to_save import ModulesToSaveWrapper, wrap_modules_to_save
from peftcore.plugins import hooks, layer_supports, method_for_config, methods, pick_layer_support
from peftcore.quantized import MergeRounding, collect_rounding, dequantize_model, unsupported_quantized_layer
from peftcore.rollback import MergedWeights, Trainability
from peftcore.walking import set_submodule, walk_modules

WRAPPERS = (AdapterLayer, ModulesToSaveWrapper)  # candidates for a new adapter never live inside one


class LayerTuner(nn.Module):
    """Holds the wrapped model as ``self.model`` and the configs in ``self.peft_config``.

    ``LayerTuner(model, config, adapter_name)`` injects the adapter's layers into ``model``
    in place, as PEFT's ``LoraModel(model, config, adapter_name)`` does; ``config`` may also
    be PEFT's ``{adapter_name: config}``. With ``state_dict`` (PEFT's argument), the modules
    to wrap are read from its keys instead of ``target_modules``; its values are not loaded.
    """

    def __init__(self, model: nn.Module, config, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
                 state_dict: dict | None = None):
        super().__init__()
        if isinstance(config, dict):
            if list(config) != [adapter_name]:
                raise ValueError(f"{type(self).__name__}: a config dict must hold exactly the adapter "
                                 f"{adapter_name!r}, got {sorted(config)}")
            config = config[adapter_name]
        self.model = model
        self.peft_config: dict = {}
        self._active_adapter: str | list[str] = adapter_name
        #: full names of the modules wrapped so far, every adapter's (PEFT's attribute of the same name)
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []  # PEFT's target_parameters; no peftcore method has them
        names = None
        if state_dict is not None:
            names = matching.module_names_in_state_dict(state_dict, method_for_config(config).tensor_prefixes)
        self.inject_adapter(config, adapter_name, module_names=names)
        if low_cpu_mem_usage:
            self.empty_adapter(adapter_name)

    def empty_adapter(self, adapter_name: str) -> None:
        """Adapter ``adapter_name``'s layer tensors on the meta device, to be loaded (PEFT's ``low_cpu_mem_usage``)."""
        for _, layer in self.adapter_layers():
            layer.empty_adapter(adapter_name)

    @property
    def prefix(self) -> str:
        """The start of every adapter parameter's name segment (PEFT's ``LoraModel.prefix``: "lora_")."""
        first = self.peft_config[self._first_active() or next(iter(self.peft_config))]
        prefixes = method_for_config(first).tensor_prefixes
        return prefixes[0] if prefixes else ""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        output = self.model(*args, **kwargs)
        hooks.process_model_output(model=self, output=output)
        return output

    # -- layers ----------------------------------------------------------------

    def adapter_layers(self) -> list[tuple[str, AdapterLayer]]:
        return [(name, m) for name, m in walk_modules(self.model) if isinstance(m, AdapterLayer)]

    def saved_module_wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return [(name, m) for name, m in walk_modules(self.model) if isinstance(m, ModulesToSaveWrapper)]

    # -- injection -------------------------------------------------------------

    def inject_adapter(self, config, adapter_name: str, fill=None, module_names: set[str] | None = None) -> None:
        """Add adapter ``adapter_name``: wrap its targets, run ``fill()`` (if given: load its tensors), then settle
        which adapters train. ``module_names`` (full names) replaces ``target_modules`` as the rule for what to wrap.

        A failure before the last step removes everything the adapter added; until then
        nothing else in the model has changed but trainability flags (a merged model is
        unmerged only in the last step), which ``PeftModel`` puts back (peftcore.rollback).
        """
        check_adapter_name(adapter_name)
        method = method_for_config(config)
        check_methods_can_share(method, self.peft_config, adapter_name)
        with_bias = [name for name, c in {**self.peft_config, adapter_name: config}.items()
                     if getattr(c, "bias", "none") != "none"]
        if len(with_bias) > 1:  # each would train the same base biases: the adapters could not be told apart
            raise ValueError(f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, "
                             f"set bias to 'none' for all adapters (adapters with bias: {with_bias})")
        hooks.prepare_config(config=config, model=self.model)
        self.peft_config[adapter_name] = config
        targeted_before = list(self.targeted_module_names)
        try:
            self._wrap_modules_to_save(config, adapter_name)
            self._wrap_targets(method, config, adapter_name, module_names)
            if fill is not None:
                fill()
        except BaseException:
            self._remove_partial(adapter_name)
            self.targeted_module_names[:] = targeted_before
            raise
        self._freeze_all_but_adapters(new_adapter=adapter_name)
        hooks.adapter_injected(model=self, config=config, adapter_name=adapter_name)
        if config.inference_mode:
            self._freeze_adapter(adapter_name)

    def _freeze_adapter(self, adapter_name: str) -> None:
        for _, layer in self.adapter_layers():
            for attr in layer.adapter_layer_names:
                holder = getattr(layer, attr)
                if adapter_name in holder:
                    holder[adapter_name].requires_grad_(False)
        for _, wrapper in self.saved_module_wrappers():
            if adapter_name in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter_name].requires_grad_(False)

    def _wrap_targets(self, method, config, adapter_name: str, module_names: set[str] | None = None) -> None:
        matched = 0
        wrapped_prefix = None  # descendants of a module just wrapped follow it in pre-order: skip them
        disagree: dict[str, list[str]] = {"config": [], "state_dict": []}
        for key, target in list(walk_modules(self.model, stop_at=WRAPPERS)):
            if not key or (wrapped_prefix is not None and key.startswith(wrapped_prefix)):
                continue
            by_config = hooks.is_target_module(config=config, module_name=key, module=target, model=self.model)
            if module_names is not None:
                in_state_dict = key.removeprefix("_orig_mod.") in module_names
                if bool(by_config) != in_state_dict:
                    disagree["state_dict" if in_state_dict else "config"].append(key)
                by_config = in_state_dict
            if not by_config:
                continue
            matched += 1
            if key not in self.targeted_module_names:
                self.targeted_module_names.append(key)
            if isinstance(target, AdapterLayer) and target.peft_type not in method.builds_on:
                own_layer = _own_layer(target, method, key)
                own_layer.create_adapter(adapter_name, config, module_name=key)
                continue
            support = pick_layer_support(method.peft_type, target, config)
            refused = unsupported_quantized_layer(target, support, key, method.name)
            if refused is not None:
                raise refused
            if support is None:
                known = sorted({s.base_type.__name__ for s in layer_supports() if s.peft_type == method.peft_type})
                raise ValueError(
                    f"Target module {key} is a {type(target).__module__}.{type(target).__name__}, which {method.name} "
                    f"cannot wrap; supported layer types: {', '.join(known) or 'none'}"
                )
            # a plain module, or a layer of a method this one builds on (which the wrapper then holds)
            wrapper = support.factory(target, adapter_name, config, key)
            # wrappers written for hookspec 1 may leave both to the core
            wrapper.module_name = key
            wrapper.place_adapter(adapter_name)
            set_submodule(self.model, key, wrapper)
            wrapped_prefix = f"{key}."
        if matched == 0:
            raise NoMatchingPeftModuleError(matching.describe_no_match(config, self.model))
        if disagree["config"] or disagree["state_dict"]:
            warnings.warn(
                f"adapter {adapter_name!r}: the modules wrapped were taken from the state_dict, which differs from "
                f"target_modules; only in the config: {disagree['config']}, only in the state_dict: "
                f"{disagree['state_dict']}", RuntimeWarning, stacklevel=3,
            )
        # which adapters are active (and train) is settled by _freeze_all_but_adapters, which follows

    def _wrap_modules_to_save(self, config, adapter_name: str) -> None:
        names = getattr(config, "modules_to_save", None)
        if not names:
            return
        wrap_modules_to_save(self.model, names, adapter_name, modules=walk_modules(self.model))
        for _, wrapper in self.saved_module_wrappers():
            wrapper.set_adapter(self.active_adapters)

    def _remove_partial(self, adapter_name: str) -> None:
        """Undo a failed injection so no half-registered adapter stays behind."""
        self.peft_config.pop(adapter_name, None)
        for key, layer in self.adapter_layers():
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
            if not layer.adapter_names:  # one level only: a layer it wraps may hold other adapters
                set_submodule(self.model, key, layer.base_layer)
        for key, wrapper in self.saved_module_wrappers():
            wrapper.delete_adapter(adapter_name)
            if not wrapper.modules_to_save:
                set_submodule(self.model, key, wrapper.original_module)

    def _freeze_all_but_adapters(self, new_adapter: str | None = None) -> None:
        """Freeze everything but the active adapters (PEFT's ``_mark_only_adapters_as_trainable``).

        Costs the same with 2 or 16 adapters: the walk skips the per-adapter holders, and
        a layer whose active adapters stay as they were only gets ``new_adapter``'s flags
        set (it is inactive there); any other layer gets a full ``set_adapter``. Adding an
        adapter to a merged layer unmerges it first, as PEFT does.
        """
        layers, saved = [], []
        for _, module in walk_modules(self.model):
            for param in module._parameters.values():
                if param is not None:
                    param.requires_grad_(False)
            if isinstance(module, ModulesToSaveWrapper):
                saved.append(module)
            if isinstance(module, AdapterLayer):
                layers.append(module)
                for attr in module.other_param_names:
                    holder = getattr(module, attr, None)
                    if not isinstance(holder, nn.Module):
                        continue
                    if new_adapter is None:
                        holder.requires_grad_(False)
                    elif new_adapter in holder:  # the older entries were frozen when they came
                        holder[new_adapter].requires_grad_(False)
        active = self.active_adapters
        for layer in layers:
            if new_adapter is not None and layer.merged:
                warnings.warn("Adapters were merged; unmerging before adding an adapter")
                self._unmerge_layer(layer)
            attrs = layer.adapter_layer_names + layer.other_param_names
            present = [n for n in active if any(n in (getattr(layer, attr, None) or ()) for attr in attrs)]
            if new_adapter is None or layer.active_adapters != present:
                layer.set_adapter(active)
                continue
            for attr in layer.adapter_layer_names:  # the others' flags stand; only the newcomer's are set
                holder = getattr(layer, attr, None)
                if holder is not None and new_adapter in holder:
                    holder[new_adapter].requires_grad_(new_adapter in present)
        for wrapper in saved:
            wrapper.set_adapter(self.active_adapters)

    # -- activation --------------------------------------------------------------

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else list(self._active_adapter)

    def _first_active(self) -> str | None:
        return self.active_adapters[0] if self.active_adapters else None

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; existing adapters: {sorted(self.peft_config)}")
        wrappers = self.saved_module_wrappers()
        for key, wrapper in wrappers:  # checked before any layer switches
            try:
                wrapper.adapter_to_activate(names)
            except ValueError as exc:
                raise ValueError(f"{exc} ({key})") from None
        for _, layer in self.adapter_layers():
            if layer.merged:
                warnings.warn("Adapters were merged; unmerging before switching the active adapter")
                layer.unmerge()
            layer.set_adapter(names)
        for _, wrapper in wrappers:
            wrapper.set_adapter(names)
        self._active_adapter = adapter_name
        if inference_mode:
            for name in names:
                self._freeze_adapter(name)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether every adapter layer can be factored into LoRA (``convert_to_lora``), as PEFT asks."""
        return all(layer.supports_lora_conversion(adapter_name) for _, layer in self.adapter_layers())

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Train (or freeze) the named adapters' tensors everywhere, active or not (PEFT's method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter {unknown[0]} does not exist (adapters: {sorted(self.peft_config)})")
        for _, module in self.adapter_layers() + self.saved_module_wrappers():
            module.set_requires_grad(names, requires_grad)

    def _set_adapter_layers(self, enabled: bool) -> None:
        for _, module in self.adapter_layers() + self.saved_module_wrappers():
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        for _, layer in self.adapter_layers():
            if layer.merged:
                warnings.warn("Disabling adapters while merged: unmerging first so the base outputs are exact")
                self._unmerge_layer(layer)
        self._set_adapter_layers(False)

    @contextmanager
    def adapters_disabled(self):
        """Base outputs inside the block; afterwards the model is as before (merged, frozen, ...).

        As in PEFT, layers that were all disabled stay so, and a model with some layers enabled and others not
        (the state a by-hand ``layer.enable_adapters(False)`` leaves) is warned about and ends with all enabled.
        """
        trainability = Trainability(self)
        merged = MergedWeights(self)  # disabling unmerges (exact base outputs); the exit merges back, bit for bit
        active = self.active_adapters
        states = {layer.disable_adapters for _, layer in self.adapter_layers()}
        if len(states) > 1:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all "
                          "adapters will be enabled", stacklevel=3)
        self.disable_adapter_layers()
        try:
            yield
        finally:
            if states != {True}:
                self.enable_adapter_layers()  # re-activating makes the active adapters trainable ...
            if self.active_adapters == active:  # ... unless the block switched adapters itself, put back what was
                merged.restore()
                trainability.restore()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; existing adapters: {sorted(self.peft_config)}")
        merged_in = [key for key, layer in self.adapter_layers() if adapter_name in layer.merged_adapters]
        if merged_in:  # checked before anything is deleted
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first. "
                f"(It is merged into {merged_in[0]}, ...: call unmerge_adapter().)"
            )
        was_active = adapter_name in self.active_adapters
        del self.peft_config[adapter_name]
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self.saved_module_wrappers():
            wrapper.delete_adapter(adapter_name)
        if not was_active:  # the layers and wrappers dropped it; what is active and trains stays as it was
            return
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self._active_adapter = remaining[0] if len(remaining) == 1 else remaining
        if remaining:
            self.set_adapter(self._active_adapter)

    # -- merging ---------------------------------------------------------------

    def _merge_layer(self, layer: AdapterLayer, adapter_names, safe_merge: bool) -> None:
        names = layer.active_adapters if adapter_names is None else list(adapter_names)
        hooks.merge_layer(layer=layer, adapter_names=names, safe_merge=safe_merge)

    def _unmerge_layer(self, layer: AdapterLayer) -> None:
        hooks.unmerge_layer(layer=layer)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> MergeRounding | None:
        """Merge into every layer, or into none: each layer checks first (``check_merge``), then all merge.

        With ``safe_merge`` the check computes every merged weight once for NaN/inf, so a
        bad adapter in the last layer leaves every weight untouched. Should a merge still
        fail (a plugin's own merge code), the layers merged so far are unmerged again.
        Quantised layers (see :mod:`peftcore.quantized`) round what they store: their
        per-layer errors come back as a :class:`~peftcore.quantized.MergeRounding` (also
        kept as ``self.rounding_report``), with one summary warning; None otherwise.
        """
        layers = [layer for _, layer in self.adapter_layers()]
        for layer in layers:
            layer.check_merge(layer.active_adapters if adapter_names is None else list(adapter_names), safe_merge)
        done = []
        try:
            for layer in layers:
                was_merged = list(layer.merged_adapters)
                self._merge_layer(layer, adapter_names, safe_merge)
                if not was_merged and layer.merged:  # only these can be rolled back
                    done.append(layer)
        except Exception:
            for layer in done:
                self._unmerge_layer(layer)
            collect_rounding(layers, "unmerge")  # the rollback's own rounding is not this merge's report
            raise
        self.rounding_report = collect_rounding(layers, "merge")
        return self.rounding_report

    def unmerge_adapter(self) -> MergeRounding | None:
        layers = [layer for _, layer in self.adapter_layers()]
        for layer in layers:
            self._unmerge_layer(layer)
        self.rounding_report = collect_rounding(layers, "unmerge")
        return self.rounding_report

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None,
                dequantize: bool = False, dtype=None) -> nn.Module:
        if dequantize:  # full precision first, so the merge below is exact and nothing is re-quantized
            dequantize_model(self.model, dtype)
        report = self.merge_adapter(adapter_names, safe_merge) if merge else None
        walk = walk_modules(self.model, stop_at=(AdapterLayer,))
        outermost = [(key, m) for key, m in walk if isinstance(m, AdapterLayer)]
        for key, layer in outermost:  # replacing the outermost wrapper removes the layers inside it too
            set_submodule(self.model, key, layer.get_base_layer())
        for key, wrapper in self.saved_module_wrappers():
            set_submodule(self.model, key, wrapper.unwrapped())
        if report is not None:
            self.model.rounding_report = report
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None,
        dequantize: bool = False, dtype=None,
    ) -> nn.Module:
        """Merge the active (or given) adapters into the base weights and return the plain model.

        On a quantised base the merge re-quantizes (rounding reported as ``model.rounding_report``).
        ``dequantize=True`` instead replaces every quantized layer by a plain one (in ``dtype``,
        default the layer's compute dtype) before an exact merge, and removes the model's
        ``quantization_config``: a full-precision transformers model, the route from QLoRA
        training to a deployable model. Needs the plugin of the quantization library (peftcore-bnb).
        """
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names, dequantize=dequantize,
                            dtype=dtype)

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging and return the plain model."""
        return self._unload(merge=False)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str | None = None,
        **options,
    ) -> None:
        """Create ``adapter_name`` from ``adapters`` (PEFT's arguments; answered by the ``combine_adapters`` hook).

        ``combination_type=None`` is the default of the adapters' kind, as in PEFT: "svd"
        for LoRA, the weighted sum ("linear") for IA3. peftcore-fusion implements it.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists; pick a new name or delete it first")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"Unknown adapter(s) {missing}; existing adapters: {sorted(self.peft_config)}")
        if len(adapters) != len(weights):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        handled = hooks.combine_adapters(
            model=self, adapters=list(adapters), weights=list(weights), adapter_name=adapter_name,
            combination_type=combination_type, options=options,
        )
        if not handled:
            method = method_for_config(self.peft_config[adapters[0]])
            raise ImportError(
                f"add_weighted_adapter: no installed plugin combines {method.name} adapters; weighted merging lives "
                f"in the peftcore-fusion package: pip install peftcore-fusion (from a checkout: pip install "
                f"./plugins/peftcore-fusion)"
            )


def check_methods_can_share(method, configs: dict, adapter_name: str) -> None:
    """Refuse a ``method`` adapter beside adapters (``configs``) of a method it cannot share a model with."""
    seen = {}  # one check per method present, not per adapter: adding stays flat in the number of adapters
    for existing_name, existing in configs.items():
        seen.setdefault(existing.peft_type, existing_name)
    for peft_type, existing_name in seen.items():
        other = methods()[peft_type] if peft_type in methods() else method_for_config(configs[existing_name])
        if not method.can_share_a_model_with(other):
            raise ValueError(
                f"Cannot add a {method.peft_type} adapter {adapter_name!r} next to the {other.peft_type} adapter "
                f"{existing_name!r}: one model holds adapters of one method (or of methods that build on one "
                "another, such as FUSION on LORA)"
            )


def _own_layer(target: AdapterLayer, method, key: str) -> AdapterLayer:
    """The layer of ``method`` at ``key``: ``target`` itself, or the one inside wrappers of methods building on it."""
    layer = target
    while isinstance(layer, AdapterLayer) and layer.peft_type != method.peft_type:
        outer = methods().get(layer.peft_type)
        if outer is None or method.peft_type not in outer.builds_on:
            raise ValueError(f"{key} is already wrapped by {target.peft_type}; cannot add {method.peft_type} on top")
        layer = layer.base_layer
    if not isinstance(layer, AdapterLayer):
        raise ValueError(f"{key} is wrapped by {target.peft_type}, which holds no {method.peft_type} layer to add to")
    return layer
