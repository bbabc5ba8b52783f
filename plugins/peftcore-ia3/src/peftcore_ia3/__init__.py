"""(IA)^3 for peftcore. Importing this package registers nothing: the ``peftcore`` entry point does."""

from peftcore_ia3.config import IA3Config
from peftcore_ia3.layer import Conv2d, Conv3d, IA3Layer, Linear

__all__ = ["Conv2d", "Conv3d", "IA3Config", "IA3Layer", "Linear"]
