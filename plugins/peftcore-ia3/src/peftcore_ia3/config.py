"""``IA3Config``: PEFT's fields and defaults, and PEFT's per-architecture default tables."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peftcore import LayerConfig
from peftcore.config import united
from peftcore.validation import NON_NEGATIVE, ConfigError, check_regex

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING (peft 0.21).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

# PEFT's TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING (peft 0.21).
DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

# Fields peftcore adds on top of PEFT's IA3Config; written to JSON only when set, so that
# files from a default config carry exactly PEFT's keys.
PEFTCORE_ONLY_FIELDS = ("layers_to_transform", "layers_pattern")


@dataclass
class IA3Config(LayerConfig):
    """(IA)^3: one learned vector per target module, initialised to ones.

    ``feedforward_modules`` scale the layer input (shape 1 x in); every other
    target scales the layer output (shape out x 1).
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "module names (exact or dotted suffix), a regex matched against the full name, or 'all-linear'; "
                "None uses PEFT's IA3 default for the architecture"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "module names or a regex of modules never to adapt"})
    feedforward_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "targets whose input (not output) is scaled; names (suffix match) or a regex; must be a subset of "
                "target_modules; None uses PEFT's IA3 default for the architecture"})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "the wrapped layer stores its weight as (in, out), as GPT-2's Conv1D (set automatically)"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={
        "help": "modules trained in full and saved beside the vectors (e.g. a classifier head)"})
    init_ia3_weights: bool = field(default=True, metadata={
        "help": "initialise the vectors to ones, so a fresh adapter changes nothing (False: random normal)"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={
        "help": "only adapt these layer indices (peftcore extension; PEFT's IA3Config has no such field)",
        "range": NON_NEGATIVE})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "name of the layer list for layers_to_transform, e.g. 'layers' or 'h'"})

    def __post_init__(self):
        self.peft_type = "IA3"
        super().__post_init__()
        if isinstance(self.feedforward_modules, (list, tuple, set)):
            self.feedforward_modules = set(self.feedforward_modules)
        if isinstance(self.feedforward_modules, str):
            check_regex(self, "feedforward_modules", self.feedforward_modules)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            extra = self.feedforward_modules - self.target_modules
            if extra:
                raise ConfigError(
                    f"`feedforward_modules` should be a subset of `target_modules` (IA3Config: {sorted(extra)} "
                    f"are not in target_modules {sorted(self.target_modules)})", "feedforward_modules", extra,
                )

    def combined_config(self, sources: list[LayerConfig], rank: int | None) -> "IA3Config":
        """PEFT's IA3 rule for a combined adapter: targets and feedforward modules united over ``sources``."""
        return dataclasses.replace(
            self,
            target_modules=united([s.target_modules for s in sources], "target_modules"),
            feedforward_modules=united([s.feedforward_modules for s in sources], "feedforward_modules"),
        )

    def is_feedforward(self, module_name: str) -> bool:
        """PEFT's rule: a regex must match the full name; names match as a plain suffix."""
        ff = self.feedforward_modules
        if ff is None:
            raise ValueError("IA3Config.feedforward_modules is not resolved yet (None)")
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        # a plain ``endswith`` (not ``.name``), exactly as PEFT checks it
        return any(module_name.endswith(name) for name in ff)
