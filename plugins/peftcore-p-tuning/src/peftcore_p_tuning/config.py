"""``PromptEncoderConfig``: PEFT's fields and defaults for p-tuning, checked when the config is made."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from peftcore.prompt_learning import PromptLearningConfig
from peftcore.validation import DROPOUT, POSITIVE, ConfigError


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = field(
        default=PromptEncoderReparameterizationType.MLP,
        metadata={"help": "Prompt encoder: MLP (3 linear layers) or LSTM (bidirectional LSTM + 2-layer MLP)"},
    )
    encoder_hidden_size: Optional[int] = field(
        default=None, metadata={"help": "Hidden size of the prompt encoder (token_dim if unset)", "range": POSITIVE}
    )
    encoder_num_layers: int = field(default=2, metadata={
        "help": "LSTM layers of the prompt encoder (the MLP always has 2 hidden layers)", "range": POSITIVE})
    encoder_dropout: float = field(
        default=0.0, metadata={"help": "Dropout between the LSTM layers of the prompt encoder", "range": DROPOUT}
    )

    def __post_init__(self):
        self.peft_type = "P_TUNING"
        super().__post_init__()  # types and ranges of every field (peftcore.validation)
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                str(self.encoder_reparameterization_type)
            )
        except ValueError:
            raise ConfigError(
                "PromptEncoderConfig: encoder_reparameterization_type must be MLP or LSTM, got "
                f"{self.encoder_reparameterization_type!r}", "encoder_reparameterization_type",
                self.encoder_reparameterization_type,
            ) from None
