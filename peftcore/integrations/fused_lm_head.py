"""Moving TRL's fused LM head from a peftcore wrapper to its base model (why: ``peftcore.integrations.trl``)."""

from __future__ import annotations

# The per-token fields SFTTrainer 1.x asks of its fused head (log-probs for the loss, entropy and
# top-1 hits for its logged metrics)
SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


def is_trl_trainer(trainer) -> bool:
    return any(cls.__module__.split(".")[0] == "trl" for cls in type(trainer).__mro__)


def move_fused_lm_head(model) -> bool:
    """Move TRL's fused LM head from the peftcore wrapper ``model`` to its base model; False: none was there."""
    if "forward" not in vars(model):  # add_fused_lm_head sets an instance attribute; PeftModel's own is on the class
        return False
    from trl.trainer.utils import add_fused_lm_head

    del model.forward
    add_fused_lm_head(model.get_base_model(), outputs=SFT_FUSED_OUTPUTS)
    return True
