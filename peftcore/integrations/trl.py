"""TRL's trainers with peftcore models: ``PeftSFTTrainer`` (``SFTTrainer`` + :class:`PeftSFTTrainerMixin`).

``PeftTrainerMixin`` alone gives TRL's trainers adapter-only saving and resuming. ``SFTTrainer``
(TRL 1.x) needs one more thing: in ``__init__`` it adds a "fused LM head" (``trl``'s
``add_fused_lm_head``: per-token log-probabilities without the full logits) by replacing the
model's ``forward`` with one that calls ``model.base_model`` as the *backbone*. It applies it to
``model.get_base_model()`` only for ``peft`` models (accelerate's ``is_peft_model`` is an
``isinstance`` check against ``peft.PeftModel``); on a peftcore model it patches the wrapper, whose
``base_model`` is the adapter tuner (PEFT's layout), and every training step fails
(``CausalLMOutputWithPast`` has no ``last_hidden_state``).

The mixin moves the head where TRL puts it for ``peft`` models: it removes the patch from the
wrapper (``PeftModel.forward`` is back) and adds the head to the base model, so
``model(**batch, fused_lm_head=True)`` runs the adapters and then TRL's fused head. Nothing in TRL or
transformers is patched. Use it first among the bases::

    class PeftSFTTrainer(PeftSFTTrainerMixin, SFTTrainer): ...
"""

from __future__ import annotations

from peftcore.integrations.trainer import PeftTrainerMixin

# The per-token fields SFTTrainer 1.x asks of its fused head (log-probs for the loss, entropy and
# top-1 hits for its logged metrics)
SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class PeftSFTTrainerMixin(PeftTrainerMixin):
    """``PeftTrainerMixin`` plus TRL's fused LM head on the base model instead of the peftcore wrapper."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self._peftcore_model()
        if model is not None and "forward" in vars(model):  # the instance attribute add_fused_lm_head set
            from trl.trainer.utils import add_fused_lm_head

            del model.forward
            add_fused_lm_head(model.get_base_model(), outputs=SFT_FUSED_OUTPUTS)


try:
    from trl import SFTTrainer
except ImportError:  # trl is optional: the mixin stays importable without it
    SFTTrainer = None

if SFTTrainer is not None:

    class PeftSFTTrainer(PeftSFTTrainerMixin, SFTTrainer):
        """TRL's ``SFTTrainer`` training a peftcore model, saving and resuming adapter files only."""
