"""``PrefixEncoder``: learned key/value prefixes for every attention layer (PEFT's class and names).

The prefixes reach the model as a pre-filled transformers ``Cache`` (``DynamicCache``; an
``EncoderDecoderCache`` for encoder-decoder models, whose decoder self-attention gets them),
under whatever name the model's forward takes it (``cache`` in transformers 5, where BERT no
longer accepts ``past_key_values``). ``generate`` receives the same cache, so incremental
decoding simply continues after the prefix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftcore.prompt_learning import (
    PromptLearningAdapter,
    batch_and_length,
    cache_argument,
    extend_attention_mask,
    generation_expand_size,
    is_encoder_decoder,
)

from peftcore_prefix_tuning.config import PrefixTuningConfig

GRADIENT_CHECKPOINTING_ERROR = (
    "Prefix tuning does not work with gradient checkpointing: the prefixes travel to the layers in the KV cache, and "
    "transformers drops the cache inside checkpointed layers while training, so the prefix would be silently ignored. "
    "Call model.gradient_checkpointing_disable(), or use prompt tuning / p-tuning, which work with it."
)


def uses_gradient_checkpointing(model: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


class PrefixEncoder(PromptLearningAdapter):
    """``embedding`` ``[num_virtual_tokens, num_layers * 2 * token_dim]``, or with ``prefix_projection``
    ``embedding`` ``[num_virtual_tokens, token_dim]`` -> ``transform`` (Linear, Tanh, Linear)."""

    head_names = ("transform",)

    def __init__(self, config: PrefixTuningConfig):
        super().__init__(config)
        self.num_layers = config.num_layers
        self.num_heads = config.num_attention_heads
        self.token_dim = config.token_dim
        self.num_transformer_submodules = config.num_transformer_submodules
        if self.token_dim % self.num_heads:
            raise ValueError(
                f"PrefixTuningConfig: token_dim={self.token_dim} is not divisible by "
                f"num_attention_heads={self.num_heads}"
            )
        prefix_width = self.num_layers * 2 * self.token_dim
        if config.prefix_projection and not config.inference_mode:
            hidden = config.encoder_hidden_size or self.token_dim
            self.embedding = nn.Embedding(self.num_virtual_tokens, self.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(self.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, prefix_width)
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(self.num_virtual_tokens, prefix_width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @property
    def saved_tokens(self) -> int:
        return self.num_virtual_tokens

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(prefix)
        if self.baked or not hasattr(self, "transform"):
            return embeds
        return self.transform(embeds)

    # -- the cache ------------------------------------------------------------------------

    def layer_key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
        """Per layer, ``(key, value)`` (plus the unused cross-attention pair for encoder-decoders),
        each ``[batch, heads, num_virtual_tokens, head_dim]``.

        The reshaping is PEFT's, step for step, so adapters trained there act identically here; for
        encoder-decoders that includes PEFT's layout in which the prefix table is tiled twice and cut
        into groups of four (decoder layer ``i`` reads rows ``4i, 4i+1`` modulo ``2 * num_layers``).
        """
        n, heads = self.num_virtual_tokens, self.num_heads
        table = self.prompt_table().to(dtype)
        rows = table.view(1, n, self.num_layers * 2, heads, self.token_dim // heads)
        if self.num_transformer_submodules == 2:
            rows = torch.cat([rows, rows], dim=2)
        rows = rows.permute(2, 0, 3, 1, 4).expand(-1, batch_size, -1, -1, -1)
        return [tuple(group) for group in rows.split(2 * self.num_transformer_submodules)]

    def build_cache(self, model: nn.Module, batch_size: int):
        from transformers import DynamicCache, EncoderDecoderCache

        layers = self.layer_key_values(batch_size, _model_dtype(model))
        encoder_decoder = is_encoder_decoder(model)
        cache = DynamicCache() if encoder_decoder else _dynamic_cache_for(model)
        for index, (key, value, *_) in enumerate(layers):
            cache.update(key, value, index)
        if encoder_decoder:
            # PEFT discards the cross-attention rows: the cross-attention cache fills from the encoder output
            return EncoderDecoderCache(cache, DynamicCache())
        return cache

    # -- the model's inputs ---------------------------------------------------------------

    def _check(self, model: nn.Module, kwargs: dict[str, Any], cache_name: str) -> None:
        if model.training and torch.is_grad_enabled() and uses_gradient_checkpointing(model):
            raise ValueError(GRADIENT_CHECKPOINTING_ERROR)
        for name in {cache_name, "cache", "past_key_values"}:
            if kwargs.get(name) is not None:
                raise ValueError(f"Prefix tuning supplies the KV cache itself; do not pass `{name}`")

    def prepare_forward(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        name = cache_argument(model)
        self._check(model, kwargs, name)
        batch_size, seq_len, device = batch_and_length(kwargs)
        kwargs[name] = self.build_cache(model, batch_size)
        n = self.num_virtual_tokens
        if is_encoder_decoder(model):
            if kwargs.get("decoder_attention_mask") is not None:
                mask = kwargs["decoder_attention_mask"]
                kwargs["decoder_attention_mask"] = extend_attention_mask(
                    mask, n, mask.shape[0], mask.shape[1], mask.device
                )
        else:
            # always explicit: encoders (BERT) size the keys from the mask, not from the cache
            kwargs["attention_mask"] = extend_attention_mask(
                kwargs.get("attention_mask"), n, batch_size, seq_len, device
            )
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return kwargs

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        name = cache_argument(model)
        self._check(model, kwargs, name)
        batch_size, seq_len, device = batch_and_length(kwargs)
        # generate copies each row for beams / returned sequences, but leaves a given cache as it is
        kwargs[name] = self.build_cache(model, batch_size * generation_expand_size(model, kwargs))
        if not is_encoder_decoder(model):
            kwargs["attention_mask"] = extend_attention_mask(
                kwargs.get("attention_mask"), self.num_virtual_tokens, batch_size, seq_len, device
            )
        return kwargs


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(model.parameters()).dtype


def _dynamic_cache_for(model: nn.Module):
    """A cache laid out like the one the model would make itself (sliding-window layers included)."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config) if config is not None else DynamicCache()
    except Exception:  # configs that transformers cannot read a layer layout from
        return DynamicCache()
