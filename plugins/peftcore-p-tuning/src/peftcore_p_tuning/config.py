"""``PromptEncoderConfig``: PEFT's fields and defaults for p-tuning, checked when the config is made."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Union

from peftcore.prompt_learning import PromptLearningConfig


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
    encoder_hidden_size: int = field(
        default=None, metadata={"help": "Hidden size of the prompt encoder (token_dim if unset)"}
    )
    encoder_num_layers: int = field(
        default=2, metadata={"help": "LSTM layers of the prompt encoder (the MLP always has 2 hidden layers)"}
    )
    encoder_dropout: float = field(
        default=0.0, metadata={"help": "Dropout between the LSTM layers of the prompt encoder"}
    )

    def __post_init__(self):
        self.peft_type = "P_TUNING"
        super().__post_init__()
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                str(self.encoder_reparameterization_type)
            )
        except ValueError:
            raise ValueError(
                "PromptEncoderConfig: encoder_reparameterization_type must be MLP or LSTM, got "
                f"{self.encoder_reparameterization_type!r}"
            ) from None
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0
        ):
            raise ValueError(
                f"PromptEncoderConfig: encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}"
            )
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers <= 0:
            raise ValueError(
                f"PromptEncoderConfig: encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}"
            )
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ValueError(f"PromptEncoderConfig: encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
