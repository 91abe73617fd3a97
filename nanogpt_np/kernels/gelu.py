"""GELU through gelu.cu, with the interface of nanogpt_np/layers/gelu.py.

As in the formula layer, only x is cached and tanh is recomputed in backward.
bf16 arrays are computed in float32 and rounded once on the way out.
"""
import numpy as np

from ..backend import array_module
from .loader import KernelFile, ceil_div, ctype, kernel_array

_cu = KernelFile("gelu.cu", [f"gelu_{part}<{t}>" for part in ("forward", "backward") for t in ("float", "double", "bf16")])
THREADS = 256
MAX_BLOCKS = 65536  # grid-stride loops cover the rest


def _grid(n):
    return (max(1, min(ceil_div(n, THREADS), MAX_BLOCKS)),)


def forward(x):
    """x: (B, T, C)  ->  out: (B, T, C)"""
    xp = array_module(x)
    x = kernel_array(x, x.dtype, xp)
    out = xp.empty_like(x)
    _cu.launch(f"gelu_forward<{ctype(x.dtype)}>", _grid(x.size), (THREADS,), (x, out, np.int64(x.size)))
    return out, x


def backward(dout, cache):
    """dout: (B, T, C)  ->  dx: (B, T, C)"""
    xp = array_module(dout)
    x = cache
    dout = kernel_array(dout, x.dtype, xp)
    dx = xp.empty_like(dout)
    _cu.launch(f"gelu_backward<{ctype(x.dtype)}>", _grid(x.size), (THREADS,), (x, dout, dx, np.int64(x.size)))
    return dx
