"""``AdaLoraCallback``: kept for ``Trainer`` runs wired with it before rank allocation became a hook.

It is :class:`peftcore.integrations.trainer.PeftcoreCallback`, which calls the
``on_optimizer_step`` hook (AdaLoRA allocates ranks there) after every optimizer
step, plus a check that the model holds an AdaLoRA adapter. ``PeftTrainer`` adds a
``PeftcoreCallback`` itself; on a stock ``Trainer`` pass either callback (a second one
in the same run does nothing: the hook runs once per step).
"""

from __future__ import annotations

from peftcore.integrations.trainer import PeftcoreCallback
from peftcore.loop_hooks import unwrap

from peftcore_adalora.config import AdaLoraConfig


class AdaLoraCallback(PeftcoreCallback):
    """``Trainer(model=peft_model, ..., callbacks=[AdaLoraCallback()])``: ranks are allocated during training."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        target = unwrap(self.model if self.model is not None else model)
        configs = getattr(target, "peft_config", None)
        if not isinstance(configs, dict) or not any(isinstance(c, AdaLoraConfig) for c in configs.values()):
            raise TypeError(f"AdaLoraCallback: {type(target).__name__} is not a peftcore model with an AdaLoRA adapter")
        super().on_optimizer_step(args, state, control, model=model, **kwargs)
