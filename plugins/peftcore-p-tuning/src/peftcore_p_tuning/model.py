"""``PromptEncoder``: virtual-token embeddings reparameterised by an MLP or LSTM (PEFT's class and names)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peftcore.prompt_learning import VirtualTokenAdapter

from peftcore_p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType

MLP_LAYERS = 2  # PEFT's MLP has a fixed depth; encoder_num_layers only sizes the LSTM


class PromptEncoder(VirtualTokenAdapter):
    """``embedding`` -> ``mlp_head`` (MLP) or ``lstm_head`` -> ``mlp_head`` (LSTM).

    Built in inference mode (PEFT's files), only ``embedding`` exists and holds the encoder output.
    """

    head_names = ("mlp_head", "lstm_head")

    def __init__(self, config: PromptEncoderConfig):
        super().__init__(config)
        self.token_dim = config.token_dim
        self.hidden_size = config.encoder_hidden_size or config.token_dim
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if config.inference_mode:
            return
        hidden = self.hidden_size
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=self.token_dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, self.token_dim)
            )
        else:
            if config.encoder_num_layers != MLP_LAYERS:
                warnings.warn(
                    f"for MLP, the argument `encoder_num_layers` is ignored. Exactly {MLP_LAYERS} MLP layers are "
                    "used.",
                    stacklevel=4,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.token_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, self.token_dim),
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if self.baked:
            return embeds
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)
