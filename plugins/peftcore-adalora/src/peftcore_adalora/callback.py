"""``AdaLoraCallback``: rank allocation inside a transformers ``Trainer`` run, with no manual call.

Allocation scores parameters by |p · ∇p|, so it must run while the gradients still
exist: after ``optimizer.step()`` and before ``model.zero_grad()``. The Trainer's
``on_optimizer_step`` event fires exactly there (``on_step_end`` is too late: the
gradients are already zeroed).
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

if not hasattr(TrainerCallback, "on_optimizer_step"):  # added in transformers 4.41
    raise ImportError("AdaLoraCallback needs transformers >= 4.41 (TrainerCallback.on_optimizer_step)")


def _find_update_and_allocate(model):
    """The model's ``update_and_allocate``, looking through DDP/accelerate wrappers."""
    seen = model
    while seen is not None:
        try:
            return seen.update_and_allocate
        except AttributeError:
            seen = getattr(seen, "module", None)
    raise TypeError(f"AdaLoraCallback: {type(model).__name__} has no update_and_allocate; is it a peftcore AdaLoRA model?")


class AdaLoraCallback(TrainerCallback):
    """Calls ``model.update_and_allocate(state.global_step)`` after every optimizer step.

    ``trainer = Trainer(model=peft_model, ..., callbacks=[AdaLoraCallback()])``. Pass the
    model explicitly if the Trainer is given a different object than the peftcore model.
    """

    def __init__(self, model=None):
        self.model = model

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        target = self.model if self.model is not None else model
        peft_config = getattr(target, "peft_config", {})
        name = getattr(target, "trainable_adapter_name", None)
        total_step = getattr(peft_config.get(name), "total_step", None) if name else None
        if total_step is not None and state.max_steps and state.max_steps != total_step:
            warnings.warn(
                f"AdaLoRA total_step={total_step} but the Trainer will run {state.max_steps} optimizer steps; "
                "the rank budget follows total_step (set it to the number of optimizer steps)",
                stacklevel=2,
            )

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # state.global_step counts the steps completed before this one: 0, 1, 2, ...
        _find_update_and_allocate(self.model if self.model is not None else model)(state.global_step)
