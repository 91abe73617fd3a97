"""One file per layer, each a short lesson. Read each from the top: the docstring says
what the layer computes and derives its backward; `reference_forward` and
`reference_backward` follow, plain NumPy, each backward line under the forward line it
differentiates. Below them, `forward(...) -> (out, cache)` and
`backward(dout, cache) -> (dx, grads...)` compute the same numbers scheduled for speed
(the model runs those). docs/backprop.md tours them in reading order, and
`python -m nanogpt_np.exercises start DIR` has you write each backward yourself."""
from . import attention, cross_entropy, embedding, gelu, layernorm, linear

__all__ = ["attention", "cross_entropy", "embedding", "gelu", "layernorm", "linear"]
