"""Renamed: ``peftcore.model_adapter.ModelAdapter`` is now :class:`peftcore.InputAdapter` (hookspec version 2)."""

import warnings


def __getattr__(name: str):
    if name == "ModelAdapter":
        from peftcore.input_adapter import InputAdapter

        warnings.warn(
            "peftcore.model_adapter.ModelAdapter is now peftcore.InputAdapter", DeprecationWarning, stacklevel=2
        )
        return InputAdapter
    raise AttributeError(f"module 'peftcore.model_adapter' has no attribute {name!r}")
