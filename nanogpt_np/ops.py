"""The one choice per layer: the NumPy formula (layers/) or the fused GPU kernel (kernels/).

The model calls `layer_ops(xp).<layer>.forward/backward`; this module is the only
place that knows both sets exist. It sits above both: kernels may import the layer
formulas they fall back to, layers never import kernels, and neither imports this.
"""
import os

import numpy as np

from . import layers


def layer_ops(xp):
    """The layer implementations for array module `xp`: a namespace with modules
    attention, cross_entropy, embedding, gelu, layernorm and linear, each with the
    forward(...) -> (out, cache) / backward(dout, cache) interface.

    NumPy gets nanogpt_np.layers, the readable formulas. CuPy gets
    nanogpt_np.kernels: attention, LayerNorm, GELU and softmax + cross-entropy as
    CUDA kernels, linear (cuBLAS) and embedding as the formula layers on CuPy
    arrays. NANOGPT_KERNELS=0 in the environment gives CuPy the formula layers too
    (slower, but a second opinion when a kernel is in doubt).
    """
    if xp is np or os.environ.get("NANOGPT_KERNELS", "1") == "0":
        return layers
    from . import kernels  # imported only when asked for: it needs CuPy's RawModule at run time

    return kernels
