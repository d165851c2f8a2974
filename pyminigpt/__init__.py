"""pyminigpt: a small GPT-2 whose hot operations run on fused kernels."""

from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
