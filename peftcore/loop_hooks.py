"""What a training loop tells a peftcore model: the ``on_optimizer_step`` hook, and a run's length.

``peftcore apply``'s loop and the Trainer integration call these; so can any loop
(accelerate, Lightning, a hand-written one) that wants methods like AdaLoRA to
work without method-specific calls.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from peftcore.plugins import hooks

RUN_LENGTH = "run_length"  # field metadata key: the field takes the run's number of optimizer steps


def unwrap(model: nn.Module) -> nn.Module:
    """The peftcore model inside DDP / accelerate / ``torch.compile`` wrappers."""
    from peftcore.peft_model import PeftModel

    seen = model
    while seen is not None and not isinstance(seen, PeftModel):
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
    return seen if seen is not None else model


def optimizer_step_done(model: nn.Module, step: int) -> None:
    """Call after ``optimizer.step()`` and before the gradients are zeroed; ``step`` counts from 0."""
    hooks.on_optimizer_step(model=unwrap(model), step=step)


def run_length_field(config_class: type) -> str | None:
    """The config field (if any) that takes the number of optimizer steps of the run (AdaLoRA's ``total_step``)."""
    for f in dataclasses.fields(config_class):
        if f.metadata.get(RUN_LENGTH):
            return f.name
    return None
