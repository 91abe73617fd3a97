"""GELU through gelu.cu, with the interface of nanogpt_np/layers/gelu.py.

As in the formula layer, only x is cached and tanh is recomputed in backward.
bf16 arrays are computed in float32 and rounded once on the way out.
"""
import numpy as np

from ..backend import array_module
from .fused import THREADS, elementwise_grid
from .loader import KernelFile, ctype, kernel_array

_cu = KernelFile("gelu.cu", [f"gelu_{part}<{t}>" for part in ("forward", "backward") for t in ("float", "double", "bf16")])


def forward(x):
    """x: (B, T, C)  ->  out: (B, T, C)"""
    xp = array_module(x)
    x = kernel_array(x, x.dtype, xp)
    out = xp.empty_like(x)
    _cu.launch(f"gelu_forward<{ctype(x.dtype)}>", elementwise_grid(x.size, x.dtype), (THREADS,),
               (x, out, np.int64(x.size)))
    return out, x


def backward(dout, cache):
    """dout: (B, T, C)  ->  dx: (B, T, C)"""
    xp = array_module(dout)
    x = cache
    dout = kernel_array(dout, x.dtype, xp)
    dx = xp.empty_like(dout)
    _cu.launch(f"gelu_backward<{ctype(x.dtype)}>", elementwise_grid(x.size, x.dtype), (THREADS,),
               (x, dout, dx, np.int64(x.size)))
    return dx
