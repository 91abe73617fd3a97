"""LayerNorm through layernorm.cu, with the interface of nanogpt_np/layers/layernorm.py.

The readable formula and its derivation are in that file; the kernels compute the
same thing row by row (one warp per row) and save the same statistics, mean and
rstd, so the cache has the same contents.
"""
import numpy as np

from ..backend import array_module
from .loader import KernelFile, ceil_div, ctype, kernel_array, scalar

_cu = KernelFile(
    "layernorm.cu",
    [f"layernorm_{part}<{t}>" for part in ("forward", "backward_dx", "backward_params") for t in ("float", "double")],
)
ROWS_PER_BLOCK = 8  # one warp per row, so 256 threads per block
PARAM_THREADS = 256  # columns per block in the dweight/dbias kernel
PARAM_CHUNKS = 256  # row chunks summed separately for dweight/dbias, then added up


def forward(x, weight, bias, eps=1e-5):
    """x: (B, T, C)  weight, bias: (C,)  ->  out: (B, T, C)"""
    xp = array_module(x)
    C = x.shape[-1]
    x2 = kernel_array(x, x.dtype, xp).reshape(-1, C)  # (N, C)
    N = x2.shape[0]
    out = xp.empty_like(x2)
    mean = xp.empty(N, dtype=x.dtype)  # (N,)
    rstd = xp.empty(N, dtype=x.dtype)  # (N,)
    _cu.launch(
        f"layernorm_forward<{ctype(x.dtype)}>", (ceil_div(N, ROWS_PER_BLOCK),), (32 * ROWS_PER_BLOCK,),
        (x2, kernel_array(weight, x.dtype, xp), kernel_array(bias, x.dtype, xp), out, mean, rstd,
         np.int32(N), np.int32(C), scalar(eps, x.dtype)),
    )
    stat_shape = x.shape[:-1] + (1,)
    cache = (x2.reshape(x.shape), weight, mean.reshape(stat_shape), rstd.reshape(stat_shape))
    return out.reshape(x.shape), cache


def backward(dout, cache):
    """dout: (B, T, C)  ->  dx: (B, T, C), dweight: (C,), dbias: (C,)"""
    xp = array_module(dout)
    x, weight, mean, rstd = cache
    C = x.shape[-1]
    t = ctype(x.dtype)
    x2 = x.reshape(-1, C)  # (N, C), contiguous since forward made it so
    dout2 = kernel_array(dout, x.dtype, xp).reshape(-1, C)  # (N, C)
    N = x2.shape[0]
    mean1, rstd1 = mean.reshape(-1), rstd.reshape(-1)  # (N,)
    dx = xp.empty_like(dout2)
    _cu.launch(
        f"layernorm_backward_dx<{t}>", (ceil_div(N, ROWS_PER_BLOCK),), (32 * ROWS_PER_BLOCK,),
        (dout2, x2, kernel_array(weight, x.dtype, xp), mean1, rstd1, dx, np.int32(N), np.int32(C)),
    )
    rows_per_chunk = ceil_div(N, min(N, PARAM_CHUNKS))
    n_chunks = ceil_div(N, rows_per_chunk)
    dweight_part = xp.empty((n_chunks, C), dtype=x.dtype)
    dbias_part = xp.empty((n_chunks, C), dtype=x.dtype)
    _cu.launch(
        f"layernorm_backward_params<{t}>", (ceil_div(C, PARAM_THREADS), n_chunks), (PARAM_THREADS,),
        (dout2, x2, mean1, rstd1, dweight_part, dbias_part, np.int32(N), np.int32(C), np.int32(rows_per_chunk)),
    )
    return dx.reshape(dout.shape), dweight_part.sum(axis=0), dbias_part.sum(axis=0)
