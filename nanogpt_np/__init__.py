"""nanogpt_np: GPT-2 training in NumPy (CPU) and CuPy (GPU), every backward pass by hand."""
from . import pretrained
from .model import GPT, GPTConfig

# pretrained.py builds on model.py (imports run one way), so GPT's two pretrained
# entry points are attached here, above both
GPT.from_pretrained = classmethod(pretrained.from_pretrained)
GPT.save_pretrained = pretrained.save_pretrained

__all__ = ["GPT", "GPTConfig"]
__version__ = "0.1.0"
