"""``PrefixTuningConfig``: PEFT's fields and defaults, checked when the config is made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peftcore.prompt_learning import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    init_weights: Optional[Literal["zero"]] = field(
        default=None, metadata={"help": "None: random prefixes; 'zero': the prefix activations start at zero"}
    )
    encoder_hidden_size: int = field(
        default=None, metadata={"help": "Hidden size of the projection MLP (token_dim if unset)"}
    )
    prefix_projection: bool = field(
        default=False, metadata={"help": "Reparameterise the prefixes through Embedding -> Linear -> Tanh -> Linear"}
    )

    def __post_init__(self):
        self.peft_type = "PREFIX_TUNING"
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig: init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0
        ):
            raise ValueError(
                f"PrefixTuningConfig: encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}"
            )

    def adjust_to_model_config(self, config: dict) -> None:
        """Grouped-query attention caches ``num_key_value_heads`` heads: size the prefixes for those (as PEFT does)."""
        if config.get("global_head_dim") is not None or config.get("per_layer_config") is not None:
            raise ValueError(
                "PrefixTuningConfig: models whose layers have different key/value shapes (global_head_dim / "
                "per_layer_config) are not supported by peftcore-prefix-tuning"
            )
        num_kv_heads = config.get("num_key_value_heads")
        if num_kv_heads is None:
            return
        head_dim = config.get("head_dim") or self.token_dim // self.num_attention_heads
        self.token_dim = head_dim * num_kv_heads
        self.num_attention_heads = num_kv_heads
