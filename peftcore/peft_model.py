"""``PeftModel``: the user-facing wrapper, with PEFT's API and attribute layout."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from peftcore import embedding_layers, hub, lm_loss, member_adapters, serialization, status
from peftcore.activation_savings import recomputing_activations
from peftcore.adapter_folder import adapter_subfolder
from peftcore.adapter_names import check_adapter_name
from peftcore.chunked_loss import (
    ChunkedLossSettings,
    NotExact,
    run_chunked,
    static_reason,
    token_nll_from_logits,
    warn_fallback,
)
from peftcore.config import PeftConfig, TaskType, config_from_file, config_path
from peftcore.files import AdapterFileError
from peftcore.forward_signature import sign_forward
from peftcore.layer import BASE_ADAPTER, AdapterLayer
from peftcore.layer_tuner import LayerTuner
from peftcore.model_card import model_card_text, write_model_card
from peftcore.modules_to_save import (
    ModulesToSaveWrapper,
    check_modules_to_save,
    saved_module_wrappers,
    unwrap_modules_to_save,
    wrap_modules_to_save,
)
from peftcore.plugins import hooks, method_for_config
from peftcore.preparation import checkpointing_on, offload_checkpointed_inputs, require_input_grads
from peftcore.prompt_learning import generation_expand_size
from peftcore.quantized import is_quantized_model
from peftcore.rollback import Bookkeeping, Trainability, unchanged_on_failure
from peftcore.walking import walk_modules


class PeftModel(nn.Module):
    """A base model plus adapters. ``get_peft_model`` mutates and wraps the base model in place."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        sign_forward(cls)  # every task class's forward reports the base model's signature (Trainer columns)

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, **kwargs):
        super().__init__()
        check_adapter_name(adapter_name)
        self._prepare_config(peft_config, model)
        method = method_for_config(peft_config)
        self.modules_to_save = set(getattr(peft_config, "modules_to_save", None) or ()) or None
        checkpointing = checkpointing_on(model)  # asked before injection: the check visits every module
        with unchanged_on_failure(model):  # a failed injection leaves the caller's model as it was
            if method.kind == "model":
                self.base_model = model
                self.prompt_encoder = nn.ModuleDict()
                self._prompt_configs: dict[str, PeftConfig] = {}
                self._prompt_active = adapter_name
                self._prompt_disabled = False
                self._add_model_adapter(peft_config, adapter_name)
            else:
                self.base_model = (method.tuner_class or LayerTuner)(model, peft_config, adapter_name,
                                                                     low_cpu_mem_usage=low_cpu_mem_usage)
                if autocast_adapter_dtype:
                    self._upcast_adapter(adapter_name)
        if checkpointing:
            require_input_grads(
                model
            )  # checkpointing was on before the adapters came (see gradient_checkpointing_enable)

    # -- construction ------------------------------------------------------------

    def _prepare_config(self, config: PeftConfig, model: nn.Module) -> None:
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = (
                getattr(model, "name_or_path", None)
                or getattr(getattr(model, "config", None), "_name_or_path", None)
                or None
            )
        task_heads = TASK_HEADS.get(str(config.task_type) if config.task_type else None)
        check_modules_to_save(model, getattr(config, "modules_to_save", None), ignore=task_heads or ())
        if task_heads and hasattr(config, "modules_to_save"):
            current = list(config.modules_to_save or [])
            config.modules_to_save = current + [n for n in task_heads if n not in current]

    def _add_model_adapter(self, config: PeftConfig, adapter_name: str) -> None:
        check_adapter_name(adapter_name)
        if any(isinstance(m, AdapterLayer) for m in self.base_model.modules()):
            raise ValueError(
                f"Cannot add a {config.peft_type} adapter to a model that already has adapter layers (e.g. LoRA): "
                "one model holds adapters of one method; merge_and_unload() or unload() the layer adapters first"
            )
        hooks.prepare_config(config=config, model=self.base_model)
        adapter = hooks.create_model_adapter(model=self.base_model, config=config, adapter_name=adapter_name)
        if adapter is None:
            raise ValueError(f"No plugin created a model adapter for {config.peft_type}")
        for param in self.base_model.parameters():
            param.requires_grad_(False)
        try:
            wrap_modules_to_save(self.base_model, getattr(config, "modules_to_save", None), adapter_name)
        except Exception:
            for wrapper in saved_module_wrappers(self.base_model):
                wrapper.delete_adapter(adapter_name)
            unwrap_modules_to_save(self.base_model)
            raise
        self.prompt_encoder[adapter_name] = adapter
        self._prompt_configs[adapter_name] = config
        self._activate_model_adapter(self._prompt_active)

    def _activate_model_adapter(self, adapter_name: str | None, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the one that runs; it trains unless it (or its config) is in inference mode."""
        self._prompt_active = adapter_name
        trainable = adapter_name is not None and not (
            inference_mode or self._prompt_configs[adapter_name].inference_mode
        )
        for name, module in self.prompt_encoder.items():
            module.requires_grad_(name == adapter_name and trainable)
        for wrapper in saved_module_wrappers(self.base_model):
            wrapper.set_adapter(adapter_name)
            if not trainable:
                wrapper.requires_grad_(False)

    @property
    def _uses_layers(self) -> bool:
        return isinstance(self.base_model, LayerTuner)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- configs and adapters ---------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config if self._uses_layers else self._prompt_configs

    @property
    def active_adapter(self) -> str:
        if self._uses_layers:
            active = self.base_model.active_adapter
            return active
        return self._prompt_active

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters if self._uses_layers else [self._prompt_active]

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model if self._uses_layers else self.base_model

    def get_prompt_embedding_to_save(self, adapter_name: str):
        """PEFT's ``prompt_embeddings`` of a prompt-learning adapter (the encoder output, on the CPU)."""
        if self._uses_layers or adapter_name not in self.prompt_encoder:
            raise ValueError(f"{adapter_name!r} is not a prompt-learning adapter of this model")
        return self.prompt_encoder[adapter_name].prompt_embeddings_to_save()

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add an inactive adapter; ``set_adapter`` makes it the one that trains and runs.

        ``autocast_adapter_dtype`` (PEFT's default, True): on a float16/bfloat16 base the
        adapter's weights are float32. On failure the model is left as it was (adapters,
        active adapter, trainability, merged state).
        """
        self._add_adapter(adapter_name, peft_config, autocast_adapter_dtype=autocast_adapter_dtype)

    def _upcast_adapter(self, adapter_name: str) -> None:
        for _, layer in self.base_model.adapter_layers():  # a walk that skips the adapters' own modules
            layer.upcast_adapter(adapter_name)

    def _add_adapter(self, adapter_name: str, peft_config: PeftConfig, fill=None,
                     autocast_adapter_dtype: bool = True) -> None:
        """``add_adapter``, with ``fill()`` run once the adapter exists but before anything else changes."""
        self._check_new_name(adapter_name)
        method = method_for_config(peft_config)
        for existing in {c.peft_type: c for c in self.peft_config.values()}.values():  # one check per method
            if not method.can_share_a_model_with(method_for_config(existing)):
                raise ValueError(
                    f"Cannot add a {peft_config.peft_type} adapter to a model holding {existing.peft_type} adapters; "
                    "one PeftModel holds adapters of one method (or of methods that build on one another, such as "
                    "FUSION on LORA)"
                )
        with unchanged_on_failure(self):
            self._prepare_config(peft_config, self.get_base_model())
            if self._uses_layers:
                # inject_adapter leaves the active adapters as they were (and unmerges, as PEFT does);
                # no model-wide set_adapter here, whose cost grows with the number of adapters
                def settle():  # before the tensors are loaded: a float32 file keeps its precision
                    if autocast_adapter_dtype:
                        self._upcast_adapter(adapter_name)
                    if fill is not None:
                        fill()

                self.base_model.inject_adapter(peft_config, adapter_name, fill=settle)
            else:
                self._add_model_adapter(peft_config, adapter_name)
                try:
                    if fill is not None:
                        fill()
                except BaseException:
                    self.delete_adapter(adapter_name)
                    raise
        if getattr(peft_config, "modules_to_save", None):
            self.modules_to_save = (self.modules_to_save or set()) | set(peft_config.modules_to_save)

    def _check_new_name(self, adapter_name: str) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists; delete it first or pick another name")

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (layer methods: or a list of them); it trains unless
        ``inference_mode``. A name that does not exist changes nothing."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"Adapter(s) {unknown or names} not found; existing adapters: {sorted(self.peft_config)}")
        if self._uses_layers:
            self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)
        elif len(names) > 1:
            raise ValueError(f"A prompt-learning model runs one adapter at a time, got {names}")
        else:
            self._activate_model_adapter(names[0], inference_mode=inference_mode)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether ``convert_to_lora`` applies (layer methods whose layers all add a weight change)."""
        return self._uses_layers and self.base_model.supports_lora_conversion(adapter_name)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Train (or freeze) the named adapters, active or not; not for prompt learning (as in PEFT)."""
        if not self._uses_layers:
            raise TypeError("Setting `requires_grad` is not supported for prompt learning methods like "
                            f"{self.active_peft_config.peft_type}.")
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if self._uses_layers:
            self.base_model.delete_adapter(adapter_name)
            return
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; existing adapters: {sorted(self.peft_config)}")
        del self.prompt_encoder[adapter_name]
        del self._prompt_configs[adapter_name]
        for wrapper in saved_module_wrappers(self.base_model):
            wrapper.delete_adapter(adapter_name)
        unwrap_modules_to_save(self.base_model)
        if self._prompt_active == adapter_name:
            self._activate_model_adapter(next(iter(self._prompt_configs), None))

    @contextmanager
    def disable_adapter(self):
        """Run the base model without any adapter inside the ``with`` block; afterwards the model is as before."""
        if self._uses_layers:
            with self.base_model.adapters_disabled():
                yield
            return
        # The active adapter stays named (active_peft_config works inside); only its effect is switched off.
        was_disabled, self._prompt_disabled = self._prompt_disabled, True
        wrappers = saved_module_wrappers(self.base_model)
        trainability = Trainability(self)
        for wrapper in wrappers:
            wrapper.enable_adapters(False)
        try:
            yield
        finally:
            self._prompt_disabled = was_disabled
            for wrapper in wrappers:
                wrapper.enable_adapters(not was_disabled)
            trainability.restore()  # enabling makes the active copies trainable; put back what was

    # -- parameters ------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return status.count_parameters(self)

    def adapter_layers_root(self) -> LayerTuner:
        """The module under which the adapter layers are; a prompt-learning model has none (TypeError)."""
        if not self._uses_layers:
            raise TypeError(f"{self.active_peft_config.peft_type} is a prompt-learning method: the model has no "
                            "adapter layers to report on (get_layer_status / get_model_status)")
        return self.base_model

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """Per adapter layer: name, type, enabled, active/merged/available adapters, requires_grad, devices."""
        return status.get_layer_status(self)

    def get_model_status(self) -> status.TunerModelStatus:
        """The model-wide summary, ``"irregular"`` where layers disagree."""
        return status.get_model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- training ------------------------------------------------------------------------

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """PEFT's helper: make ``model``'s embedding output require grad (not for quantized models); returns it.

        Checkpointed blocks of a frozen model need an input that requires grad, or
        no gradient reaches the adapters inside them.
        """
        if not is_quantized_model(model):
            require_input_grads(model)
        return model

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, offload: bool = False, **kwargs
    ) -> None:
        """Checkpoint the base model's blocks and let gradients reach the adapters inside them.

        Non-reentrant checkpointing unless ``gradient_checkpointing_kwargs`` says otherwise.
        On a frozen base a checkpointed block's inputs carry no grad, so with reentrant
        checkpointing the adapters in it would get none ("element 0 of tensors does not
        require grad"): the input embeddings are made to require grad, as PEFT does.
        ``offload=True`` keeps the inputs each checkpointed block holds for its recompute
        in pinned host memory until backward (for models on an accelerator; on the CPU it
        does nothing, and says so). ``Trainer(args.gradient_checkpointing=True)`` calls this.
        """
        base = self.get_base_model()
        checkpoint_kwargs = (
            {"use_reentrant": False} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        )
        if hasattr(base, "activation_checkpointing_enable"):  # transformers 5 name; the old one warns
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        elif hasattr(base, "gradient_checkpointing_enable"):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
        else:
            raise ValueError(f"{type(base).__name__} has no gradient_checkpointing_enable (not a transformers model?)")
        if offload:
            offload_checkpointed_inputs(base, checkpoint_kwargs)
        require_input_grads(base)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, offload: bool = False, **kwargs
    ) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, offload=offload, **kwargs)

    # -- running -------------------------------------------------------------------------

    @contextmanager
    def _mixed_batch(self, adapter_names: list[str] | None, rows_per_input: int = 1):
        """Route each batch row to its own adapter for the duration of one call.

        ``generate`` repeats each input row ``rows_per_input`` times (beams, returned sequences): the decoder sees
        each name repeated as often, an encoder (which runs once on the original rows) the names as given."""
        if adapter_names is None:
            yield
            return
        if not self._uses_layers:
            raise ValueError("adapter_names (mixed batches) works with layer methods such as LoRA, not prompt methods")
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode: mixed batches are for "
                             "inference; call model.eval() first")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} (adapter_names has "
                             f"unknown adapters {unknown}; existing: {sorted(self.peft_config)})")
        # walk_modules skips the per-adapter sub-modules: this runs on every mixed-batch call
        layers = [
            m for _, m in walk_modules(self.get_base_model()) if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))
        ]
        if any(isinstance(m, AdapterLayer) and m.merged for m in layers):
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")

        def inject(module, args, kwargs, names):
            kwargs["adapter_names"] = names
            return args, kwargs

        given = list(adapter_names)
        expanded = [name for name in given for _ in range(rows_per_input)]
        encoder = self._encoder_of_encoder_decoder() if rows_per_input > 1 else None
        in_encoder = set() if encoder is None else {id(m) for m in encoder.modules()}
        handles = [
            m.register_forward_pre_hook(partial(inject, names=given if id(m) in in_encoder else expanded),
                                        with_kwargs=True)
            for m in layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _prepare_model_kwargs(
        self, kwargs: dict[str, Any], generating: bool = False, args: tuple = ()
    ) -> tuple[tuple, dict[str, Any]]:
        if self._uses_layers or self._prompt_active is None or self._prompt_disabled:
            return args, kwargs
        if args:  # a model adapter edits keyword arguments; the one usual positional is input_ids
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError(
                    f"{self.active_peft_config.peft_type} models take keyword arguments (input_ids=..., "
                    f"attention_mask=...), got {len(args)} positional"
                )
            kwargs = {"input_ids": args[0], **kwargs}
        adapter = self.prompt_encoder[self._prompt_active]
        model = self.base_model
        return (), adapter.prepare_generate(model, kwargs) if generating else adapter.prepare_forward(model, kwargs)

    def forward(self, *args, **kwargs):
        return self._forward(args, kwargs)

    def _forward(self, args: tuple, kwargs: dict[str, Any], run=None):
        """Prepare the inputs (prompt methods), route mixed batches, call the model.

        ``run(call, kwargs, mixed_batch)``, when given, makes the call itself (the chunked LM loss).
        """
        adapter_names = kwargs.pop("adapter_names", None)
        args, kwargs = self._prepare_model_kwargs(kwargs, args=args)
        with self._mixed_batch(adapter_names), recomputing_activations():
            # through the LayerTuner (not straight to the wrapped model), so process_model_output runs
            if run is None:
                return self.base_model(*args, **kwargs)
            return run(lambda call_kwargs: self.base_model(*args, **call_kwargs), kwargs, adapter_names is not None)

    def _encoder_of_encoder_decoder(self) -> nn.Module | None:
        base = self.get_base_model()
        if not getattr(getattr(base, "config", None), "is_encoder_decoder", False) or not hasattr(base, "get_encoder"):
            return None
        return base.get_encoder()

    def generate(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        args, kwargs = self._prepare_model_kwargs(kwargs, generating=True, args=args)
        rows = 1 if adapter_names is None else generation_expand_size(self.get_base_model(), kwargs)
        with self._mixed_batch(adapter_names, rows_per_input=rows):
            return self.get_base_model().generate(*args, **kwargs)

    # -- files ---------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        save_embedding_layers: str | bool = "auto",
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs,
    ) -> None:
        """Write PEFT's files: ``default`` at the top, other adapters in sub-folders.

        On a sharded model (FSDP2, DeepSpeed ZeRO-3) call it on every rank: the adapter's
        shards are gathered (a collective) and only ``is_main_process`` writes. ``state_dict``
        (PEFT's argument) is a whole model state dict gathered by the engine, e.g.
        ``accelerator.get_state_dict(model)``; the adapters are then written from it.
        ``save_embedding_layers`` (True, False, "auto": when embeddings are targeted or the vocabulary was
        resized) writes the base model's embedding weights too, as PEFT does; loading puts them back.
        ``path_initial_model_for_weight_conversion``: the folder of the adapter as initialised (PiSSA, OLoRA),
        saved before training; the adapter is then written as the plain LoRA adapter that gives the same model
        on the original base weights (the method's tuner converts it: ``convert_for_initial_model``).
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters has unknown adapters {unknown}; existing: {sorted(self.peft_config)}")
        folders = {name: adapter_subfolder(save_directory, name) for name in names}  # all checked before any write
        card = model_card_text(save_directory, base_model=self.get_base_model(),
                               peft_type=self.active_peft_config.peft_type,
                               task_type=self.active_peft_config.task_type) if is_main_process else None
        for name in names:
            config = self.peft_config[name]
            if config.base_model_name_or_path is None:  # an adapter added after get_peft_model (PEFT fills it here)
                config.base_model_name_or_path = _base_name(self)
            with serialization.tensors_from(state_dict):  # every rank: gathering shards is collective
                tensors = hooks.adapter_state_dict(model=self, config=config, adapter_name=name)
                if embedding_layers.should_save_embeddings(self.get_base_model(), config, save_embedding_layers):
                    tensors.update(embedding_layers.embedding_tensors(self, config, state_dict))
            if not is_main_process:
                continue
            written = config
            if path_initial_model_for_weight_conversion is not None:
                convert = getattr(self.base_model, "convert_for_initial_model", None)
                if convert is None:
                    raise ValueError(f"path_initial_model_for_weight_conversion: {config.peft_type} adapters change "
                                     "no base weights, so there is nothing to convert")
                tensors, written = convert(config, name, tensors, str(path_initial_model_for_weight_conversion))
            serialization.save_adapter_files(folders[name], tensors, written, safe_serialization=safe_serialization,
                                             extra_config=self._auto_mapping(config))
        if is_main_process:
            write_model_card(save_directory, card)

    def _auto_mapping(self, config: PeftConfig) -> dict | None:
        """Where ``AutoPeftModel`` finds the base's class when ``task_type`` does not say (PEFT's field)."""
        if config.task_type is not None:
            return None
        base_class = type(self.get_base_model())
        return {"auto_mapping": {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}}

    def push_to_hub(
        self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
        private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
        create_pr: bool = False, max_shard_size=None, tags: list[str] | None = None, **save_kwargs,
    ):
        """Upload the adapter files (``save_pretrained``'s, README included) as one commit (``peftcore.hub``).

        ``max_shard_size`` is accepted for transformers' signature and unused: adapter files are not sharded.
        """
        def save(folder: str) -> None:
            self.save_pretrained(folder, **save_kwargs)
            hub.add_card_tags(folder, tags)

        return hub.push_folder_to_hub(
            save, repo_id, default_message="Upload model", commit_message=commit_message,
            commit_description=commit_description, private=private, token=token, revision=revision,
            create_pr=create_pr,
        )

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
        config: PeftConfig | None = None, allow_pickle: bool = False, autocast_adapter_dtype: bool = True, **kwargs,
    ) -> "PeftModel":
        """Load a PEFT-format adapter from a local folder or a Hub repo id onto ``model``."""
        hub_kwargs = {
            k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs
        }
        subfolder = hub_kwargs.pop("subfolder", None)
        check_adapter_name(adapter_name)
        where = None
        if config is None:
            where = config_path(model_id, subfolder=subfolder, **hub_kwargs)
            config = config_from_file(where)
        config.inference_mode = not is_trainable
        path = serialization.find_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle, **hub_kwargs)
        weights = serialization.read_weights(path)
        model_cls = cls
        if cls is PeftModel and config.task_type is not None:
            model_cls = TASK_MODELS.get(str(config.task_type), PeftModel)
        if member_adapters.member_names(config):  # it builds on other adapters: those come first
            return member_adapters.from_pretrained(
                model_cls, model, member_adapters.local_folder(model_id, subfolder), adapter_name, config,
                is_trainable, allow_pickle=allow_pickle, autocast_adapter_dtype=autocast_adapter_dtype,
                **{k: v for k, v in kwargs.items() if k != "subfolder"},
            )
        before = Bookkeeping(model)
        with _blamed_on(where, model):
            peft_model = model_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            peft_model._load_state_dict_into(config, adapter_name, weights, path)
        except BaseException:  # give the caller's model back as it came, not wrapped around a random adapter
            peft_model._take_out(adapter_name)
            before.restore()
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        autocast_adapter_dtype: bool = True,
        **kwargs,
    ):
        """Add adapter ``adapter_name`` from files; on any failure the model is left as it was.

        Returns PEFT's load result: ``missing_keys`` (this adapter's tensors the file lacks)
        and ``unexpected_keys`` (the file's tensors that belong to none of them). As in
        :func:`set_peft_model_state_dict`, keys are the names in the file (PEFT's missing
        keys are module paths with the adapter name in them).
        """
        self._check_new_name(adapter_name)  # before reading any file
        hub_kwargs = {
            k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs
        }
        subfolder = hub_kwargs.pop("subfolder", None)
        where = config_path(model_id, subfolder=subfolder, **hub_kwargs)
        config = config_from_file(where)
        config.inference_mode = not is_trainable
        path = serialization.find_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle, **hub_kwargs)
        weights = serialization.read_weights(path)
        members = member_adapters.load_missing_members(
            self, member_adapters.local_folder(model_id, subfolder), config, allow_pickle=allow_pickle,
            autocast_adapter_dtype=autocast_adapter_dtype, **{k: v for k, v in kwargs.items() if k != "subfolder"},
        )
        loaded = []
        try:
            # the tensors are loaded before a merged model is unmerged or any flag is settled
            with _blamed_on(where, self.get_base_model()):
                self._add_adapter(
                    adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype,
                    fill=lambda: loaded.append(self._load_state_dict_into(config, adapter_name, weights, path)),
                )
        except BaseException:
            for name in members:  # the members this call loaded go too: the model is left as it was
                self.delete_adapter(name)
            raise
        if not is_trainable:
            self.eval()
        return loaded[0] if loaded else None

    def _take_out(self, adapter_name: str) -> None:
        """Remove the adapter and every wrapper left without one (the base model's own modules go back)."""
        if self._uses_layers:
            self.base_model._remove_partial(adapter_name)
        else:
            self.delete_adapter(adapter_name)

    def _load_state_dict_into(self, config, adapter_name, weights, where) -> _IncompatibleKeys:
        try:
            missing, unexpected = hooks.load_adapter_state_dict(
                model=self, config=config, adapter_name=adapter_name, state_dict=weights
            )
        except AdapterFileError as exc:  # the hook knows tensors, not files
            raise AdapterFileError(f"{where}: {exc}") from None
        if missing and len(unexpected) == len(weights):
            raise AdapterFileError(
                f"{where}: none of its {len(weights)} tensors belongs to the {config.peft_type} adapter "
                f"{adapter_name!r} (it needs e.g. {missing[:2]}; the file has e.g. {unexpected[:2]}): "
                "a file for another model or method?"
            )
        serialization.warn_load_report(missing, unexpected, where)
        return _IncompatibleKeys(list(missing), list(unexpected))


sign_forward(PeftModel)


@contextmanager
def _blamed_on(config_file: str | None, model: nn.Module):
    """Errors applying a config read from ``config_file`` name that file (those about the weights name theirs)."""
    try:
        yield
    except AdapterFileError:
        raise
    except (ValueError, TypeError) as exc:
        if config_file is None:
            raise
        raise AdapterFileError(f"{config_file}: cannot be applied to {type(model).__name__}: {exc}") from None


class PeftModelForSequenceClassification(PeftModel):
    # token_type_ids is named so that transformers' Trainer, which keeps only the dataset
    # columns the forward signature names, passes BERT-style segment ids through.
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, token_type_ids=None, **kwargs):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **_drop_none(
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                token_type_ids=token_type_ids,
            ),
            **kwargs,
        )


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    pass


class PeftModelForQuestionAnswering(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, task_ids=None, **kwargs):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **_drop_none(
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                start_positions=start_positions,
                end_positions=end_positions,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
            ),
            **kwargs,
        )


class PeftModelForCausalLM(PeftModel):
    """A causal LM with adapters; called with ``labels`` in training mode it computes the loss chunk by chunk.

    The chunked loss (:mod:`peftcore.chunked_loss`) equals the model's own loss and
    gradients without ever holding the full logits. ``skip_logits`` says what the
    caller wants: None (default) skips the logits when training with labels, True
    always with labels, False never (the model's own path, logits returned). When
    the chunked path ran, ``output.logits`` is None. ``set_chunked_loss(False)``
    turns it off for this model, ``PEFTCORE_CHUNKED_LOSS=0`` for every model.
    """

    chunked_loss = ChunkedLossSettings()  # replaced per model by set_chunked_loss

    def set_chunked_loss(self, enabled: bool = True, chunk_tokens: int | None = None) -> None:
        """Use the chunked loss where it is exact (``enabled``), ``chunk_tokens`` tokens at a time (None: automatic)."""
        lm_loss.chunk_rows(1, chunk_tokens)  # checks the value
        self.chunked_loss = ChunkedLossSettings(enabled=bool(enabled), chunk_tokens=chunk_tokens)
        self._chunked_loss_fallback = None

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, skip_logits=None, **kwargs):
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **_drop_none(
                output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict
            ),
            **kwargs,
        )
        if not self._wants_chunked_loss(kwargs, skip_logits):
            return self._forward((), kwargs)
        try:
            return self._forward((), dict(kwargs), run=self._run_chunked)
        except NotExact as exc:
            self._chunked_loss_fallback = str(exc)
            warn_fallback(type(self.get_base_model()).__name__, str(exc))
            return self._forward((), kwargs)

    def _wants_chunked_loss(self, kwargs: dict[str, Any], skip_logits: bool | None) -> bool:
        has_labels = kwargs.get("labels") is not None  # transformers computes no loss without them
        if skip_logits is True and not has_labels:
            raise ValueError("skip_logits=True needs labels: without them there is no loss")
        # the transformers model's mode (what its dropout follows), not the wrapper's own flag
        training = self.get_base_model().training
        if not has_labels or skip_logits is False or (skip_logits is None and not training):
            return False
        if kwargs.get("fused_lm_head"):  # the base model's own fused head (TRL's) scores the labels without logits
            return False
        if not self.chunked_loss.enabled or getattr(self, "_chunked_loss_fallback", None) is not None:
            return False
        base = self.get_base_model()
        reason = static_reason(base, kwargs, mixed_batch=kwargs.get("adapter_names") is not None)
        if reason is not None:
            warned = self.__dict__.setdefault("_chunked_loss_warned", set())
            if reason not in warned:
                warned.add(reason)
                warn_fallback(type(base).__name__, reason)
            return False
        return True

    def _run_chunked(self, call, kwargs, mixed_batch: bool, per_token: bool = False):
        return run_chunked(call, self.get_base_model(), kwargs, self.chunked_loss, mixed_batch, per_token)

    @torch.no_grad()
    def token_nll(self, labels, **kwargs) -> torch.Tensor:
        """Negative log-likelihood of each label given the tokens before it, ``(batch, seq)``, 0 where ignored.

        Computed from the final hidden states chunk by chunk, like the training loss
        (the full logits when the chunked path cannot be exact). Prompt methods add
        positions for their virtual tokens in front (ignored: 0).
        """
        kwargs = {**kwargs, "labels": labels}
        if self._wants_chunked_loss(kwargs, skip_logits=True):
            try:
                return self._forward((), dict(kwargs), run=partial(self._run_chunked, per_token=True)).loss
            except NotExact as exc:
                self._chunked_loss_fallback = str(exc)
                warn_fallback(type(self.get_base_model()).__name__, str(exc))
        kwargs.pop("labels")
        return token_nll_from_logits(self._forward((), kwargs).logits, labels)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **_drop_none(
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                decoder_inputs_embeds=decoder_inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
            ),
            **kwargs,
        )


class PeftModelForFeatureExtraction(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **_drop_none(
                output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict
            ),
            **kwargs,
        )


def _base_name(model: nn.Module) -> str | None:
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return inner.__dict__.get("name_or_path") or None  # a model built from a config has "": not a Hub id


def _record_base(config: PeftConfig, model: nn.Module, revision: str | None) -> None:
    old, new = config.base_model_name_or_path, _base_name(model)
    config.base_model_name_or_path = new
    if old is not None and old != new:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old}' to '{new}'. Please "
                      "ensure that the correct base model is loaded when loading this checkpoint (it is the model's "
                      "name_or_path).", stacklevel=3)
    if revision is not None:
        if config.revision is not None and config.revision != revision:
            warnings.warn(f"the config's revision {config.revision!r} is replaced by {revision!r}", stacklevel=3)
        config.revision = revision


def _drop_none(**kwargs) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


TASK_MODELS: dict[str, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
# Heads trained in full for these tasks, as PEFT does (only those the model has).
TASK_HEADS: dict[str | None, list[str]] = {
    TaskType.SEQ_CLS.value: ["classifier", "score"],
    TaskType.TOKEN_CLS.value: ["classifier", "score"],
    TaskType.QUESTION_ANS.value: ["qa_outputs"],
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, revision: str | None = None, low_cpu_mem_usage: bool = False,
                   **kwargs) -> PeftModel:
    """Wrap ``model`` (modified in place) with a new adapter, choosing the wrapper from ``task_type``.

    ``low_cpu_mem_usage`` (layer methods) leaves the new adapter's tensors on the meta device, for weights that
    are loaded next (``set_peft_model_state_dict``); not for training from the initialisation.

    As in PEFT, the config's ``base_model_name_or_path`` becomes the model's ``name_or_path`` (a warning says so
    when it replaces another name) and ``revision``, if given, the base's revision written with the adapter.
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peftcore config (e.g. LoraConfig), got {type(peft_config).__name__}")
    _record_base(peft_config, model, revision)
    if isinstance(model, PeftModel) and (not model._uses_layers or method_for_config(peft_config).kind == "model"):
        raise ValueError(
            f"get_peft_model got a PeftModel holding {model.active_peft_config.peft_type} adapters and a "
            f"{peft_config.peft_type} config: one model holds adapters of one method (prompt-learning methods "
            "cannot be stacked with others)"
        )
    if isinstance(model, PeftModel) or any(isinstance(m, AdapterLayer) for m in model.modules()):
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time. If you want to reload the model with a "
            "different config, make sure to call `.unload()` before. (The model already has adapter layers; use "
            "add_adapter/load_adapter on the PeftModel instead.)", stacklevel=2
        )
    model_cls = TASK_MODELS.get(str(peft_config.task_type), PeftModel) if peft_config.task_type else PeftModel
    return model_cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                     low_cpu_mem_usage=low_cpu_mem_usage)
