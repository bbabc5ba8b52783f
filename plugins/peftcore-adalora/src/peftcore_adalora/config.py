"""``AdaLoraConfig``: PEFT's fields (LoRA's, which PEFT's class inherits, plus AdaLoRA's) and checks."""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peftcore import LayerConfig
from peftcore.config import united
from peftcore.validation import DROPOUT, NON_NEGATIVE, POSITIVE, ConfigError, Range, check_left_off

# PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING (peft 0.21).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    # PEFT's "gemma4" default is a regex; the core's default_target_modules hook takes lists only
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# LoRA fields PEFT's AdaLoraConfig inherits but AdaLoRA has no use for: accepted (so PEFT's
# files load) only at their "off" value, refused when set rather than silently ignored.
UNSUPPORTED_WHEN_SET = (
    "megatron_config", "trainable_token_indices", "eva_config", "corda_config", "lora_ga_config", "velora_config",
    "alora_invocation_tokens", "monteclora_config", "layer_replication", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config", "use_dora", "lora_bias", "use_qalora", "ensure_weight_tying", "loftq_config",
)
# 0 would keep no history, 1 would never move the averages from their start
EMA_FACTOR = Range(low=0, high=1, low_open=True, high_open=True)
_RANK_PATTERN_KEY = re.compile(r"(?P<module>.+)\.lora_E(?:\.(?P<adapter>[^.]+))?")


def rank_pattern_module(key: str) -> tuple[str, str | None]:
    """``a.b.lora_E.default`` -> ("a.b", "default"); ``a.b.lora_E`` (as saved) -> ("a.b", None)."""
    found = _RANK_PATTERN_KEY.fullmatch(key)
    if found is None:
        raise ValueError(
            f"AdaLoraConfig.rank_pattern key {key!r} does not name a lora_E parameter (<module>.lora_E[.<adapter>])"
        )
    return found["module"], found["adapter"]


@dataclass
class AdaLoraConfig(LayerConfig):
    """AdaLoRA: LoRA as P·diag(E)·Q, with a budget of ranks reallocated during training.

    Three phases: ``tinit`` warm-up steps at ``init_r`` per module, a cubic decay of
    the total budget to ``target_r`` per module until ``total_step - tfinal``, then
    ``tfinal`` steps with the allocation fixed. Call ``update_and_allocate(step)``
    after ``backward()`` and before ``zero_grad()`` (or use ``AdaLoraCallback``).
    """

    # -- LoRA's fields, as PEFT's AdaLoraConfig inherits them ---------------------------
    r: int = field(default=8, metadata={
        "help": "unused by AdaLoRA (PEFT keeps it from LoRA); set init_r instead", "range": POSITIVE})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "module names (exact or dotted suffix), a regex matched against the full name, or 'all-linear'; "
                "None uses PEFT's AdaLoRA default for the architecture"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "module names or a regex of modules never to adapt"})
    lora_alpha: Union[int, float] = field(
        default=8, metadata={"help": "scaling numerator: delta W = B (A * E) * lora_alpha / ranknum"}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input", "range": DROPOUT})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "the wrapped layer stores its weight as (in, out), as GPT-2's Conv1D (set automatically)"})
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={
        "help": "which biases train and are saved: none, all, or lora_only (those of adapted layers)"})
    use_rslora: bool = field(default=False, metadata={"help": "no effect on AdaLoRA (PEFT ignores it too)"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={
        "help": "modules trained in full and saved beside the adapter (e.g. a classifier head)"})
    init_lora_weights: bool = field(default=True, metadata={
        "help": "True: E = 0 and A, B ~ N(0, 0.02), so a fresh adapter changes nothing; False: random normal"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={
        "help": "only adapt these layer indices", "range": NON_NEGATIVE})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={
        "help": "name of the layer list for layers_to_transform, e.g. 'layers' or 'h'"})
    rank_pattern: Optional[dict[str, list[bool]]] = field(default=None, metadata={
        "help": "the allocation the RankAllocator made ({'<module>.lora_E': [kept?, ...]}); written on save, "
                "applied on load to shrink the matrices"})
    alpha_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "no effect on AdaLoRA (PEFT ignores it too)"}
    )
    megatron_config: Optional[dict] = field(default=None, metadata={"help": "not supported (must stay None)"})
    megatron_core: Optional[str] = field(default="megatron.core", metadata={"help": "not used"})
    trainable_token_indices: Optional[Union[list[int], dict]] = field(
        default=None, metadata={"help": "not supported (must stay None)"}
    )
    loftq_config: Union[dict, None] = field(
        default_factory=dict, metadata={"help": "not supported by AdaLoRA (must stay empty)"}
    )
    eva_config: Optional[dict] = field(default=None, metadata={"help": "not supported (must stay None)"})
    corda_config: Optional[dict] = field(default=None, metadata={"help": "not supported (must stay None)"})
    lora_ga_config: Optional[dict] = field(default=None, metadata={"help": "not supported (must stay None)"})
    use_dora: bool = field(default=False, metadata={"help": "not supported by AdaLoRA (must stay False)"})
    velora_config: Optional[dict] = field(default=None, metadata={"help": "not supported (must stay None)"})
    alora_invocation_tokens: Optional[list[int]] = field(
        default=None, metadata={"help": "not supported (must stay None)"}
    )
    use_qalora: bool = field(default=False, metadata={"help": "not supported (must stay False)"})
    qalora_group_size: int = field(default=16, metadata={"help": "not used", "range": POSITIVE})
    monteclora_config: Optional[dict] = field(default=None, metadata={"help": "not supported (must stay None)"})
    layer_replication: Optional[list] = field(default=None, metadata={"help": "not supported (must stay None)"})
    lora_bias: bool = field(default=False, metadata={"help": "not supported by AdaLoRA (must stay False)"})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "not supported (must stay None)"})
    use_bdlora: Optional[dict] = field(default=None, metadata={"help": "not supported (must stay None)"})
    arrow_config: Optional[dict] = field(default=None, metadata={"help": "not supported (must stay None)"})
    kasa_config: Optional[dict] = field(default=None, metadata={"help": "not supported (must stay None)"})
    ensure_weight_tying: bool = field(default=False, metadata={"help": "not supported (must stay False)"})

    # -- AdaLoRA's own fields ---------------------------------------------------------------
    target_r: int = field(default=8, metadata={
        "help": "average rank per module once the budget has decayed (at most init_r)", "range": POSITIVE})
    init_r: int = field(default=12, metadata={"help": "rank of every module at the start", "range": POSITIVE})
    tinit: int = field(default=0, metadata={
        "help": "warm-up steps before the budget starts to shrink", "range": NON_NEGATIVE})
    tfinal: int = field(default=0, metadata={"help": "final steps with the allocation fixed", "range": NON_NEGATIVE})
    deltaT: int = field(default=1, metadata={"help": "steps between two reallocations", "range": POSITIVE})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity |p * grad|",
                                                 "range": EMA_FACTOR})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity's uncertainty",
                                                 "range": EMA_FACTOR})
    orth_reg_weight: float = field(default=0.5, metadata={
        "help": "weight of the orthogonality regulariser mean ||P^T P - I||_F added to the training loss",
        "range": NON_NEGATIVE})
    total_step: Optional[int] = field(default=None, metadata={
        "help": "total training steps (required, > 0)", "run_length": True, "required": True, "range": POSITIVE})

    def __post_init__(self):
        self.peft_type = "ADALORA"
        # PEFT's sentences for what AdaLoRA refuses, before the generic field checks word them otherwise
        if self.use_dora is True:
            raise ConfigError("ADALORA does not support DoRA. (AdaLoraConfig: use_dora must stay False)",
                              "use_dora", self.use_dora)
        if self.loftq_config:
            raise ConfigError("ADALORA does not support LOFTQ. (AdaLoraConfig: loftq_config must stay empty)",
                              "loftq_config", self.loftq_config)
        if self.total_step is None:
            raise ConfigError("AdaLoRA does not work when `total_step` is None, supply a value > 0. (AdaLoraConfig: "
                              "total_step is required)", "total_step", None)
        weight = self.orth_reg_weight
        if isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight < 0:
            raise ConfigError(f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                              f"{weight} (AdaLoraConfig: orth_reg_weight)", "orth_reg_weight", weight)
        super().__post_init__()  # types and ranges of every field (peftcore.validation)
        check_left_off(self, UNSUPPORTED_WHEN_SET, "AdaLoRA")
        if self.r != 8:
            warnings.warn(
                "AdaLoraConfig: Note that `r` is not used in AdaLora and will be ignored. Set the initial rank with "
                "init_r", stacklevel=3
            )
        if self.use_rslora or self.alpha_pattern:
            warnings.warn(
                "AdaLoraConfig: use_rslora and alpha_pattern have no effect on AdaLoRA (as in PEFT)", stacklevel=3
            )
        if self.target_r > self.init_r:
            raise ConfigError(
                f"AdaLoraConfig: target_r={self.target_r} exceeds init_r={self.init_r}; the budget only shrinks, "
                "so target_r must be at most init_r", "target_r", self.target_r,
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"AdaLoraConfig: The supplied schedule values don't allow for a budgeting phase: tinit={self.tinit}, "
                f"tfinal={self.tfinal}, total_step={self.total_step} (need tinit < total_step - tfinal); decrease "
                "tinit/tfinal or increase total_step",
                "tinit", self.tinit,
            )
        for key, kept in (self.rank_pattern or {}).items():
            try:
                rank_pattern_module(key)
            except ValueError as exc:
                raise ConfigError(str(exc), "rank_pattern", self.rank_pattern) from None
            if len(kept) != self.init_r:
                raise ConfigError(
                    f"AdaLoraConfig: rank_pattern[{key!r}] has {len(kept)} entries but init_r is {self.init_r} "
                    "(one kept-or-not flag per initial rank)", "rank_pattern", self.rank_pattern,
                )

    def combined_config(self, sources: list[LayerConfig], rank: int | None) -> "AdaLoraConfig":
        """A frozen AdaLoRA adapter of rank ``rank`` everywhere (no allocation: one trainable adapter per model)."""
        return dataclasses.replace(
            self, init_r=rank, target_r=rank, rank_pattern=None, inference_mode=True, init_lora_weights=False,
            target_modules=united([s.target_modules for s in sources], "target_modules"),
        )
