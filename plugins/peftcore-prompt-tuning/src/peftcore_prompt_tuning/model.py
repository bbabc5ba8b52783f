"""``PromptEmbedding``: one learned embedding per virtual token (PEFT's class and parameter names)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from peftcore.prompt_learning import VirtualTokenAdapter

from peftcore_prompt_tuning.config import PromptTuningConfig, PromptTuningInit


class PromptEmbedding(VirtualTokenAdapter):
    """``embedding``: ``[num_virtual_tokens * num_transformer_submodules, token_dim]``, prepended to the input."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module):
        super().__init__(config)
        total = config.total_virtual_tokens
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == PromptTuningInit.RANDOM:
            return
        device = word_embeddings.weight.device
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            token_ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        else:
            token_ids = torch.tensor(_text_token_ids(config, total), dtype=torch.long)
        if tuple(word_embeddings.weight.shape[1:]) != (config.token_dim,):
            raise ValueError(
                f"PromptTuningConfig: token_dim={config.token_dim} but the model's word embeddings have width "
                f"{word_embeddings.weight.shape[1]}"
            )
        with torch.no_grad():
            init = word_embeddings(token_ids.to(device)).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(init)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def _text_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """The init text's token ids, repeated or cut to ``total`` (PEFT's rule, special tokens included)."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    if kwargs.pop("trust_remote_code", None):
        warnings.warn(
            "PromptTuningConfig: tokenizer_kwargs['trust_remote_code'] is ignored; no remote code runs for the init "
            "text",
            stacklevel=4,
        )
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError(
            f"PromptTuningConfig: prompt_tuning_init_text {config.prompt_tuning_init_text!r} gives no tokens"
        )
    ids = ids * math.ceil(total / len(ids))
    return ids[:total]
