"""Integrations with other libraries' training loops; import the submodule you need.

``peftcore.integrations.trainer``: transformers' ``Trainer`` (``PeftTrainer``, ``PeftTrainerMixin``).
``peftcore.integrations.trl``: TRL's ``SFTTrainer`` (``PeftSFTTrainer``; the fused LM head ``PeftTrainerMixin`` moves).
"""
