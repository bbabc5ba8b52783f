"""``FusionConfig``: a learned fusion adapter over adapters the model already holds (AdapterFusion)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftcore import LayerConfig


@dataclass
class FusionConfig(LayerConfig):
    """AdapterFusion (Pfeiffer et al., 2021) over frozen LoRA/AdaLoRA adapters of the same model.

    In every layer that holds one of ``adapters`` a small attention picks, per token,
    how much of each member's output to use: query = the layer's base output, keys
    and values = each member's output (what it adds), ``softmax(q·kᵢ / temperature)``
    over the members, and the value projection starts as the identity (so a fresh
    fusion adds the attention-weighted mean of the members' outputs). Only the
    fusion's projections (and its own copies of ``modules_to_save``) train.
    """

    adapters: list[str] = field(default_factory=list, metadata={
        "help": "the adapters to fuse (names in the model; for `peftcore apply fusion`: adapter folders)",
        "member_adapters": True})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature over the member adapters"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on the attention scores"})
    value_regularization: float = field(default=0.01, metadata={
        "help": "weight of the training-loss term ||I - V||^2 that keeps the value projection near the identity"})
    init_std: float = field(default=0.02, metadata={"help": "std of the query and key projections' initial weights"})

    def __post_init__(self):
        self.peft_type = "FUSION"
        super().__post_init__()
        if isinstance(self.adapters, str):
            self.adapters = [a.strip() for a in self.adapters.split(",") if a.strip()]
        self.adapters = list(self.adapters or [])
        if len(self.adapters) < 2 or len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"FusionConfig: adapters must name at least two different adapters, got {self.adapters}")
        if not all(isinstance(a, str) and a for a in self.adapters):
            raise ValueError(f"FusionConfig: adapters must be adapter names (strings), got {self.adapters}")
        if not self.temperature > 0:
            raise ValueError(f"FusionConfig: temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ValueError(f"FusionConfig: attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        if self.value_regularization < 0 or self.init_std < 0:
            raise ValueError("FusionConfig: value_regularization and init_std must be >= 0")
