"""peftcore-fusion: combining adapters (every PEFT weighted-merge type, exact task arithmetic) and learned fusion."""

from peftcore_fusion.combine import LOW_RANK_TYPES, SCALING_TYPES
from peftcore_fusion.config import FusionConfig
from peftcore_fusion.layer import FusionLayer

__all__ = ["FusionConfig", "FusionLayer", "LOW_RANK_TYPES", "SCALING_TYPES"]
