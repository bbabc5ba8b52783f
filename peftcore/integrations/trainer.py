"""transformers' ``Trainer`` with peftcore models.

What the stock ``Trainer`` already does right with a :class:`~peftcore.PeftModel`:
the training and evaluation loops (only adapter parameters require grad), and gradient checkpointing
(``args.gradient_checkpointing=True`` calls ``PeftModel.gradient_checkpointing_enable``,
which also makes the input embeddings require grad so adapters inside checkpointed
blocks of a frozen base get gradients).

What it cannot do (checked in transformers 5.24): ``Trainer._save`` calls
``save_pretrained`` only on a ``PreTrainedModel`` or a ``peft.PeftModel``; any other
module is written as its *full* state dict (``model.safetensors``), and resuming reads
that file back. Those are type checks inside the Trainer, so a callback cannot change
them (``save_model`` fires no callback event) and a peftcore model cannot pass them
without pretending to be a class it is not.

Column removal needs nothing from the Trainer: ``PeftModel.forward`` reports the base model's
signature (``peftcore.forward_signature``), so the stock ``Trainer`` keeps the columns the base model
takes (``token_type_ids``...) whatever the task type, and trainers that choose their own columns
(TRL's ``SFTTrainer``) keep doing so.

So the supported way is a small mixin over the Trainer's saving and loading methods, :class:`PeftTrainerMixin`, and the
ready-made :class:`PeftTrainer` (``Trainer`` + mixin). With it:

- ``save_model`` and every checkpoint write only the adapter, in PEFT's format
  (``adapter_config.json`` + ``adapter_model.safetensors``, other adapters in
  sub-folders), plus the tokenizer and ``training_args.bin`` as usual;
- ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` load the
  adapter weights back into the model's existing adapters, strictly (a missing or
  unexpected tensor is an error, never a silent partial load);
- methods that act after each optimizer step (AdaLoRA's rank allocation) do so:
  the mixin adds :class:`PeftcoreCallback`, which calls the ``on_optimizer_step``
  hook. A stock ``Trainer`` takes it as ``callbacks=[PeftcoreCallback()]``.

Under DDP, FSDP and DeepSpeed ``save_model`` runs on every rank and saves through
``save_pretrained``, which gathers only the adapter's shards (FSDP2, ZeRO-3) and writes on
the main process (docs/distributed.md). Any model that is not a peftcore ``PeftModel``
goes through the Trainer's own code.
Other trainers built on ``Trainer`` take the mixin first: ``class MyTrainer(PeftTrainerMixin, OtherTrainer): pass``
(with TRL's ``SFTTrainer`` the mixin also moves TRL's fused LM head to the base model: ``peftcore.integrations.trl``).
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import Trainer, TrainerCallback

from peftcore import serialization
from peftcore.files import SAFETENSORS_WEIGHTS_NAME, AdapterFileError
from peftcore.integrations.fused_lm_head import is_trl_trainer, move_fused_lm_head
from peftcore.loop_hooks import optimizer_step_done, run_length_field, unwrap
from peftcore.peft_model import PeftModel
from peftcore.plugins import hooks

TRAINING_ARGS_NAME = "training_args.bin"  # what the stock Trainer writes beside the weights


def adapter_folder(checkpoint: str | os.PathLike, adapter_name: str) -> str:
    """Where ``save_pretrained`` puts ``adapter_name`` inside ``checkpoint`` (PEFT's layout)."""
    return str(checkpoint) if adapter_name == "default" else os.path.join(str(checkpoint), adapter_name)


def load_adapter_weights(model: PeftModel, folder: str | os.PathLike, adapter_name: str = "default") -> None:
    """Copy saved weights into the existing adapter ``adapter_name``; every tensor must match."""
    config = model.peft_config[adapter_name]
    weights = serialization.load_weights(folder)
    missing, unexpected = hooks.load_adapter_state_dict(
        model=model, config=config, adapter_name=adapter_name, state_dict=weights
    )
    if missing or unexpected:
        raise AdapterFileError(
            f"{folder}: adapter {adapter_name!r} does not match the model: "
            f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


class PeftcoreCallback(TrainerCallback):
    """Tells peftcore methods about the run: its length at the start, and every optimizer step.

    ``on_optimizer_step`` fires after ``optimizer.step()`` and before the gradients are
    zeroed (``on_step_end`` would be too late for AdaLoRA's gradient-based scores).
    Pass ``model`` when the Trainer is given another object than the peftcore model.
    """

    def __init__(self, model=None):
        self.model = model

    def _peft_model(self, model):
        return unwrap(self.model if self.model is not None else model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        peft_model = self._peft_model(model)
        for name, config in getattr(peft_model, "peft_config", {}).items():
            field_name = None if config.inference_mode else run_length_field(type(config))
            planned = getattr(config, field_name) if field_name else None
            if planned is not None and state.max_steps and state.max_steps != planned:
                warnings.warn(
                    f"adapter {name!r}: {type(config).__name__}.{field_name}={planned} but the Trainer will run "
                    f"{state.max_steps} optimizer steps; the method's schedule follows {field_name} (set it to the "
                    "number of optimizer steps)",
                    stacklevel=2,
                )

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        peft_model = self._peft_model(model)
        if getattr(peft_model, "_peftcore_steps_seen", None) == state.global_step:
            return  # a second PeftcoreCallback (e.g. AdaLoraCallback beside PeftTrainer's own) in this run
        peft_model._peftcore_steps_seen = state.global_step
        # state.global_step counts the steps completed before this one: 0, 1, 2, ...
        optimizer_step_done(peft_model, state.global_step)


class PeftTrainerMixin:
    """Makes a ``Trainer`` save, resume and load-best with adapter files only (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, PeftcoreCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(PeftcoreCallback())
        model = self._peftcore_model()
        if model is not None:
            if is_trl_trainer(self):  # TRL patched the wrapper's forward (peftcore.integrations.trl says why)
                move_fused_lm_head(model)

    def _peftcore_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        return model if isinstance(model, PeftModel) else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Adapter files only, from every rank: sharded adapters (FSDP2, ZeRO-3) are gathered, rank 0 writes.

        The stock ``save_model`` gathers the *whole* model (FSDP's full state dict, DeepSpeed's
        consolidated weights; ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save``
        hands ``_save`` an empty dict, peft #2500); here only the adapter's tensors move.
        """
        model = self._peftcore_model()
        if model is None:
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if self.args.should_save:
            self._save_beside_adapter(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._peftcore_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        # a state dict the caller gathered (transformers' own save paths): the adapters are written from
        # it and the live parameters, which may be shards, are not touched
        model.save_pretrained(output_dir, is_main_process=True, state_dict=state_dict or None)
        self._save_beside_adapter(output_dir)

    def _save_beside_adapter(self, output_dir: str) -> None:
        """What the stock Trainer writes next to the weights: the tokenizer (or processor) and the arguments."""
        os.makedirs(output_dir, exist_ok=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_adapters_from(self, checkpoint: str, model: PeftModel) -> None:
        for name in model.peft_config:
            folder = adapter_folder(checkpoint, name)
            if not os.path.isfile(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)):
                raise AdapterFileError(
                    f"{folder}: no {SAFETENSORS_WEIGHTS_NAME} for adapter {name!r}; "
                    "was this checkpoint written by a Trainer without PeftTrainerMixin?"
                )
            load_adapter_weights(model, folder, name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # under FSDP2 the Trainer passes the sharded model itself (still a PeftModel): its shards are
        # loaded in place; an FSDP1 wrapper goes to the Trainer's own FSDP checkpoint loading
        target = model if model is not None else self._peftcore_model()
        if not isinstance(target, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        self._load_adapters_from(resume_from_checkpoint, target)

    def _load_best_model(self) -> None:
        model = self._peftcore_model()
        if model is None:
            return super()._load_best_model()
        self._load_adapters_from(self.state.best_model_checkpoint, model)


class PeftTrainer(PeftTrainerMixin, Trainer):
    """``transformers.Trainer`` that saves and restores peftcore adapters in PEFT's format."""
