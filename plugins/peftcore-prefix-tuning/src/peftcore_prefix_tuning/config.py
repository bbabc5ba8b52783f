"""``PrefixTuningConfig``: PEFT's fields and defaults, checked when the config is made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peftcore.prompt_learning import PromptLearningConfig
from peftcore.validation import POSITIVE


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    init_weights: Optional[Literal["zero"]] = field(
        default=None, metadata={"help": "None: random prefixes; 'zero': the prefix activations start at zero"}
    )
    encoder_hidden_size: Optional[int] = field(
        default=None, metadata={"help": "Hidden size of the projection MLP (token_dim if unset)", "range": POSITIVE}
    )
    prefix_projection: bool = field(
        default=False, metadata={"help": "Reparameterise the prefixes through Embedding -> Linear -> Tanh -> Linear"}
    )

    def __post_init__(self):
        self.peft_type = "PREFIX_TUNING"
        super().__post_init__()  # types and ranges of every field (peftcore.validation)

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
