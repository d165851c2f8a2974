"""pyminigpt: a small GPT-2 whose hot operations run on fused kernels."""

from . import ops
from .model import GPT, GPTConfig

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "ops", "__version__"]
