"""Renamed: ``peftcore.tuner.AdapterModel`` is now :class:`peftcore.layer_tuner.LayerTuner` (hookspec version 2)."""

import warnings


def __getattr__(name: str):
    if name == "AdapterModel":
        from peftcore.layer_tuner import LayerTuner

        warnings.warn("peftcore.tuner.AdapterModel is now peftcore.LayerTuner", DeprecationWarning, stacklevel=2)
        return LayerTuner
    raise AttributeError(f"module 'peftcore.tuner' has no attribute {name!r}")
