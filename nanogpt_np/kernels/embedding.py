"""Token and position embeddings through embedding.cu, with the interface of
nanogpt_np/layers/embedding.py (whose reference_forward / reference_backward are the
formulas): one kernel each way, where the formula layer on CuPy ran a gather, an
add, a sum over the batch and an atomic scatter (and their temporaries)."""
import numpy as np

from ..backend import array_module
from .loader import KernelFile, ceil_div, ctype, kernel_array

_cu = KernelFile("embedding.cu", [f"embedding_{part}<{t}>" for part in ("forward", "backward")
                                  for t in ("float", "double")])
THREADS = 256
MAX_BLOCKS = 65536


def _grid(n):
    return (max(1, min(ceil_div(n, THREADS), MAX_BLOCKS)),)


def forward(idx, wte, wpe, out=None):
    """idx: (B, T) ints  wte: (V, C)  wpe: (block_size, C)  ->  x: (B, T, C), cache

    x = wte[idx] + wpe[:T]; an id outside [0, V) gives a row of NaN."""
    xp = array_module(wte)
    B, T = idx.shape
    V, C = wte.shape
    idx32 = kernel_array(idx, np.int32, xp)  # (B, T) int32, as the kernel reads it
    x = xp.empty((B, T, C), dtype=wte.dtype) if out is None else out
    _cu.launch(f"embedding_forward<{ctype(wte.dtype)}>", _grid(x.size), (THREADS,),
               (idx32, wte, wpe, x, np.int64(x.size), np.int32(T), np.int32(C), np.int32(V)))
    return x, (idx32, wte.shape, wpe.shape)


def backward(dx, cache, dwte=None, dwpe=None, write_wpe=False):
    """dx: (B, T, C)  ->  dwte: (V, C), dwpe: (block_size, C), added into the given
    arrays (fresh zeros when None). write_wpe=True writes dwpe[:T] instead of adding
    (right after zero_grad: the same numbers, without reading the zeros)."""
    xp = array_module(dx)
    idx32, wte_shape, wpe_shape = cache
    B, T, C = dx.shape
    dwte = xp.zeros(wte_shape, dtype=dx.dtype) if dwte is None else dwte
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype) if dwpe is None else dwpe
    _cu.launch(f"embedding_backward<{ctype(dx.dtype)}>", _grid(T * C), (THREADS,),
               (kernel_array(dx, dx.dtype, xp), idx32, dwte, dwpe, np.int32(B), np.int32(T), np.int32(C),
                np.int32(wte_shape[0]), np.int32(not write_wpe)))
    return dwte, dwpe
