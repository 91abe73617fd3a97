"""One file per layer. Each has forward(...) -> (out, cache) and
backward(dout, cache) -> (dx, grads...), side by side, written for reading."""
from . import attention, cross_entropy, embedding, gelu, layernorm, linear

__all__ = ["attention", "cross_entropy", "embedding", "gelu", "layernorm", "linear"]
