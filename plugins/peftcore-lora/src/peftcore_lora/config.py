"""``LoraConfig``: PEFT's fields and defaults, checked when the config is made."""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peftcore import LayerConfig
from peftcore.config import united
from peftcore.validation import DROPOUT, POSITIVE, ConfigError, check_left_off, check_regex

# Default targets when target_modules is None: PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
# (peft 0.21), plus architectures PEFT lacks (distilbert, mbart, phi3, gemma3, vit). A string is a regex.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "btlm": ["c_proj", "c_attn"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "RefinedWebModel": ["query_key_value"],
    "chatglm": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],  # transformers 5 renamed ViT's query/value
}
# Fields PEFT writes that peftcore-lora accepts only at their "off" value.
UNSUPPORTED_WHEN_SET = (
    "megatron_config", "trainable_token_indices", "eva_config", "corda_config", "lora_ga_config", "velora_config",
    "alora_invocation_tokens", "monteclora_config", "layer_replication", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config", "use_qalora", "ensure_weight_tying",
)
LOFTQ_BITS = (4, 8)  # PEFT 0.21: NF4 (QLoRA's 4-bit table, blocks of 64) and LLM.int8's row-wise int8


@dataclass
class LoftQConfig:
    """PEFT's ``LoftQConfig``: how LoftQ quantizes the base weights it initialises LoRA from.

    ``loftq_bits``: 4 (NF4) or 8 (int8); ``loftq_iter``: alternations of quantize / rank-r SVD (at least 1).
    ``LoraConfig`` keeps it as a dict (``{"loftq_bits": 4, "loftq_iter": 1}``), as PEFT does and writes to
    ``adapter_config.json``.
    """

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits for LoftQ"})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating iterations for LoftQ"})

    def __post_init__(self):
        for name in ("loftq_bits", "loftq_iter"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"LoftQConfig: {name} must be an integer, got {value!r}", name, value)
        if self.loftq_bits not in LOFTQ_BITS:  # PEFT's words (it says them at get_peft_model time)
            raise ConfigError(f"LoftQConfig: loftq_bits={self.loftq_bits}: Only nf4 and int8 quantization is "
                              "supported (loftq_bits 4 or 8)", "loftq_bits", self.loftq_bits)
        if self.loftq_iter <= 0:
            raise ConfigError(f"LoftQConfig: loftq_iter={self.loftq_iter}: Number of iterations must be greater "
                              "than 0", "loftq_iter", self.loftq_iter)


def _loftq_dict(value) -> dict:
    """A ``LoftQConfig`` or its dict (as read from a file), checked, as the dict PEFT keeps."""
    if isinstance(value, LoftQConfig):
        return dict(vars(value))
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(LoftQConfig)})
    if unknown:
        raise ConfigError(f"LoraConfig: loftq_config has unknown keys {unknown}; LoftQConfig takes loftq_bits and "
                          "loftq_iter", "loftq_config", value)
    try:
        return dict(vars(LoftQConfig(**value)))
    except ConfigError as exc:
        raise ConfigError(f"LoraConfig: loftq_config={value!r}: {exc}", "loftq_config", value) from None


@dataclass
class LoraRuntimeConfig:
    """Settings for this process only, never saved (PEFT's class). ``ephemeral_gpu_offload``: move CPU-held
    weights to the GPU for DoRA's initialisation; peftcore-lora accepts it and computes where the weights are."""

    ephemeral_gpu_offload: bool = False

    def __post_init__(self):
        if not isinstance(self.ephemeral_gpu_offload, bool):
            raise ConfigError(f"LoraRuntimeConfig: ephemeral_gpu_offload must be true or false, got "
                              f"{self.ephemeral_gpu_offload!r}", "ephemeral_gpu_offload", self.ephemeral_gpu_offload)


@dataclass
class LoraConfig(LayerConfig):
    r: int = field(default=8, metadata={"help": "LoRA rank", "range": POSITIVE})
    lora_alpha: Union[int, float] = field(default=8, metadata={"help": "scaling numerator: scale = lora_alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input", "range": DROPOUT})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "weights stored (in, out), as GPT-2's Conv1D"})
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "which biases train"})
    use_rslora: bool = field(default=False, metadata={"help": "scale = lora_alpha / sqrt(r)"})
    init_lora_weights: Union[bool, Literal["gaussian", "pissa", "olora", "loftq"]] = field(
        default=True, metadata={"help": "True, False, gaussian, pissa, olora, loftq (needs loftq_config)"}
    )
    rank_pattern: Optional[dict[str, int]] = field(
        default_factory=dict, metadata={"help": "per-module r by name pattern", "range": POSITIVE}
    )
    alpha_pattern: Optional[dict[str, Union[int, float]]] = field(
        default_factory=dict, metadata={"help": "per-module alpha by name pattern"}
    )
    megatron_config: Optional[dict] = field(default=None)
    megatron_core: Optional[str] = field(default="megatron.core")
    trainable_token_indices: Optional[Union[list[int], dict]] = field(default=None)
    loftq_config: Union[LoftQConfig, dict, None] = field(
        default_factory=dict, metadata={"help": "LoftQConfig (or its dict) when init_lora_weights='loftq'"}
    )
    eva_config: Optional[dict] = field(default=None)
    corda_config: Optional[dict] = field(default=None)
    lora_ga_config: Optional[dict] = field(default=None)
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    velora_config: Optional[dict] = field(default=None)
    alora_invocation_tokens: Optional[list[int]] = field(default=None)
    use_qalora: bool = field(default=False)
    qalora_group_size: int = field(default=16, metadata={"range": POSITIVE})
    monteclora_config: Optional[dict] = field(default=None)
    layer_replication: Optional[list] = field(default=None)
    lora_bias: bool = field(default=False, metadata={"help": "give lora_B a trainable bias"})
    target_parameters: Optional[list[str]] = field(default=None)
    use_bdlora: Optional[dict] = field(default=None)
    arrow_config: Optional[dict] = field(default=None)
    kasa_config: Optional[dict] = field(default=None)
    ensure_weight_tying: bool = field(default=False)
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig, metadata={"runtime": True})

    def __post_init__(self):
        self.peft_type = "LORA"
        super().__post_init__()  # types and ranges of every field (peftcore.validation)
        if self.use_dora and self.lora_bias:
            raise ConfigError("LoraConfig: use_dora and lora_bias cannot be combined", "lora_bias", self.lora_bias)
        check_left_off(self, UNSUPPORTED_WHEN_SET, "peftcore-lora")
        self._check_loftq()
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                check_regex(self, name, key, "key")

    def _check_loftq(self) -> None:
        """PEFT's rules: "loftq" needs a loftq_config (kept as a dict); a loftq_config without it is dropped, with
        a warning. peftcore also checks the LoftQConfig's values here, not when the model is built."""
        if self.loftq_config:
            self.loftq_config = _loftq_dict(self.loftq_config)
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ConfigError("LoraConfig: `loftq_config` must be specified when `init_lora_weights` is 'loftq'.",
                                  "loftq_config", self.loftq_config)
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                          stacklevel=3)

    def combined_config(self, sources: list[LayerConfig], rank: int | None) -> "LoraConfig":
        """PEFT's config of a weighted-merge result: rank ``rank`` everywhere with alpha = rank (scale 1),
        targets united; no init that touches base weights (PiSSA/OLoRA would)."""
        return dataclasses.replace(
            self, r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, init_lora_weights=False,
            target_modules=united([s.target_modules for s in sources], "target_modules"),
        )

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The r and alpha for one module, after ``rank_pattern``/``alpha_pattern`` (PEFT's first-match rule)."""
        return (
            self.rank_pattern.get(_pattern_key(self.rank_pattern, module_name), self.r),
            self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_name), self.lora_alpha),
        )


def matches_pattern(key: str, module_name: str) -> bool:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern`` keys: a regex matching a dotted suffix."""
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def _pattern_key(patterns: dict, module_name: str) -> str:
    return next((key for key in patterns if matches_pattern(key, module_name)), module_name)
