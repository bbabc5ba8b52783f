"""AdaLoRA for peftcore. Importing this package registers nothing: the ``peftcore`` entry point does."""

from peftcore_adalora.allocator import RankAllocator, orthogonal_regularizer
from peftcore_adalora.config import AdaLoraConfig
from peftcore_adalora.layer import AdaLoraLayer, SVDConv2d, SVDLinear

__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdaLoraLayer",
    "RankAllocator",
    "SVDConv2d",
    "SVDLinear",
    "orthogonal_regularizer",
]


def __getattr__(name: str):
    # the callback pulls in transformers' Trainer stack (seconds of imports): only on demand
    if name == "AdaLoraCallback":
        from peftcore_adalora.callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
