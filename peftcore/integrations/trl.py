"""TRL's trainers with peftcore models: ``class MySFTTrainer(PeftTrainerMixin, SFTTrainer)``, or ``PeftSFTTrainer``.

``PeftTrainerMixin`` gives TRL's trainers adapter-only saving and resuming, as for any ``Trainer``.
``SFTTrainer`` (TRL 1.x) needs one more thing, which the mixin does when the trainer class comes
from ``trl``: in ``__init__`` TRL adds a "fused LM head" (``add_fused_lm_head``: per-token
log-probabilities without the full logits) by replacing the model's ``forward`` with one that
calls ``model.base_model`` as the *backbone*. It applies it to ``model.get_base_model()`` only for
``peft`` models (accelerate's ``is_peft_model`` is an ``isinstance`` check against ``peft.PeftModel``);
on a peftcore model it patches the wrapper, whose ``base_model`` is the adapter tuner (PEFT's
layout), and every training step fails (``CausalLMOutputWithPast`` has no ``last_hidden_state``).

``peftcore.integrations.fused_lm_head.move_fused_lm_head`` puts the head where TRL puts it for
``peft`` models: it removes the patch from the wrapper (``PeftModel.forward`` is back) and adds the
head to the base model, so ``model(**batch, fused_lm_head=True)`` runs the adapters and then TRL's
fused head (the chunked causal-LM loss of ``PeftModelForCausalLM`` steps aside for it). Nothing in
TRL or transformers is patched.
"""

from __future__ import annotations

from peftcore.integrations.trainer import PeftTrainerMixin

try:
    from trl import SFTTrainer
except ImportError:  # trl is optional: this module stays importable without it
    SFTTrainer = None

if SFTTrainer is not None:

    class PeftSFTTrainer(PeftTrainerMixin, SFTTrainer):
        """TRL's ``SFTTrainer`` training a peftcore model, saving and resuming adapter files only."""
