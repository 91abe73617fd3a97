"""nanogpt_np: GPT-2 training in NumPy (CPU) and CuPy (GPU), every backward pass by hand."""
from .model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
__version__ = "0.1.0"
