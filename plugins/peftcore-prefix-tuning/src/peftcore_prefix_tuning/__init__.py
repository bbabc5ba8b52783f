"""Prefix tuning for peftcore. Importing this package registers nothing: the ``peftcore`` entry point does."""

from peftcore_prefix_tuning.config import PrefixTuningConfig
from peftcore_prefix_tuning.model import PrefixEncoder

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]
