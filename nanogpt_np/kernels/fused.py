"""Python side of fused.cu: the elementwise work around a block's matmuls, fused.

Each function states the formula it computes; kernels/block.py strings them
together with the matmuls, and the tests check them against these formulas in
NumPy. `T` below is the activation dtype (float32, float64 or bf16) and `TX` the
residual stream's (float32 or float64); biases and bias gradients are in the
accumulate dtype (float32 for bf16).
"""
import numpy as np

from ..backend import array_module
from .loader import KernelFile, accumulate_dtype, ceil_div, ctype, kernel_array, per16

SINGLE = ("float", "double", "bf16")
RESIDUAL = [("float", "float"), ("double", "double"), ("float", "bf16")]  # (TX, T)
CASTS = [("float", "bf16"), ("bf16", "float"), ("float", "float"), ("double", "double")]

_cu = KernelFile(
    "fused.cu",
    [f"cast<{a}, {b}>" for a, b in CASTS]
    + [f"{k}<{t}>" for k in ("bias_add", "bias_gelu_forward", "bias_gelu_backward", "column_sums") for t in SINGLE]
    + [f"bias_residual<{tx}, {t}>" for tx, t in RESIDUAL]
    + [f"cast_column_sums<{tx}, {t}>" for tx, t in RESIDUAL],
)
THREADS = 256
MAX_BLOCKS = 65536  # grid-stride loops cover the rest
COLUMN_BLOCK = (32, 8)  # column-sum kernels: 32 threads of V columns each, times COLUMN_ROWS (common.cuh) row lanes
# Row chunks summed separately, then added up (reduce.Partials' rows). Two blocks per SM
# of a 132-SM H100/H200 for layernorm_backward_fused, which launches one block per chunk
# (128 left 4 SMs idle and 8 warps on each of the others); the other column-sum kernels launch
# ceil(C / (32 V)) times as many. More chunks cost partials: n_chunks floats per column.
ROW_CHUNKS = 264


def elementwise_grid(n, *dtypes):
    """Blocks for an elementwise kernel over n elements whose threads take per16(dtypes)
    elements a step (fused.cu): one step per thread, capped (grid-stride loops)."""
    return (max(1, min(ceil_div(n, THREADS * per16(*dtypes)), MAX_BLOCKS)),)


def _column_grid(C, n_chunks, *dtypes):
    """The column-sum kernels' grid for (N, C) rows of `dtypes` split into n_chunks:
    one block per 32 * V columns (V per 16-byte access) and row chunk."""
    return (ceil_div(C, COLUMN_BLOCK[0] * per16(*dtypes)), n_chunks)


def _rows(a):
    """a as (N, C): every kernel here walks rows of the last axis."""
    return a.reshape(-1, a.shape[-1])


def cast(a, dtype, out=None):
    """out = a converted to dtype (rounded to nearest even for bf16), same shape."""
    xp = array_module(a)
    a = kernel_array(a, a.dtype, xp)
    out = xp.empty(a.shape, dtype=dtype) if out is None else out
    if out.shape != a.shape or np.dtype(out.dtype) != np.dtype(dtype):
        raise ValueError(f"cast: out is {out.dtype} {out.shape}, wanted {np.dtype(dtype)} {a.shape}")
    _cu.launch(f"cast<{ctype(a.dtype)}, {ctype(dtype)}>", elementwise_grid(a.size, a.dtype, dtype), (THREADS,),
               (a, out, np.int64(a.size)))
    return out


def bias_add(out, bias):
    """out += bias, broadcast over rows, in place (out: (..., C), contiguous)."""
    xp = array_module(out)
    _cu.launch(f"bias_add<{ctype(out.dtype)}>", elementwise_grid(out.size, out.dtype), (THREADS,),
               (out, kernel_array(bias, accumulate_dtype(out.dtype), xp), np.int64(out.size),
                np.int32(out.shape[-1])))
    return out


def bias_gelu_forward(pre, bias):
    """out = gelu(pre + bias)  (pre: (..., C); the sum is not stored: backward recomputes it)"""
    xp = array_module(pre)
    out = xp.empty_like(pre)
    _cu.launch(f"bias_gelu_forward<{ctype(pre.dtype)}>", elementwise_grid(pre.size, pre.dtype), (THREADS,),
               (pre, kernel_array(bias, accumulate_dtype(pre.dtype), xp), out, np.int64(pre.size),
                np.int32(pre.shape[-1])))
    return out


def n_chunks(N):
    """How many row chunks the column-sum kernels split N rows into (the partials' rows)."""
    return _chunks(N)[1]


def _chunks(N):
    rows_per_chunk = ceil_div(N, min(N, ROW_CHUNKS))
    return rows_per_chunk, ceil_div(N, rows_per_chunk)


def _part(xp, part, n_chunks, C, dtype):
    """(a 1-D array the kernel writes its (n_chunks, stride) partial sums into, stride):
    the caller's slot (reduce.Partials.slot) or a fresh (n_chunks, C) array."""
    if part is not None:
        return part
    return xp.empty(n_chunks * C, dtype=dtype), C


def _summed(part, own, n_chunks, C):
    """The column sums from a fresh partial array; None when the caller's slot took them."""
    return None if own is None else own[0].reshape(n_chunks, C).sum(axis=0)


def bias_gelu_backward(dout, pre, bias, part=None, out=None):
    """dpre = gelu'(pre + bias) * dout  and  dbias = dpre summed over rows.

    part=(array, stride): the partial sums go there (reduce.Partials) and dbias is None.
    out: where dpre goes (dout itself is allowed: the kernel reads each element first)."""
    xp = array_module(dout)
    N, C = _rows(pre).shape
    rows_per_chunk, n_chunks = _chunks(N)
    dpre = xp.empty_like(pre) if out is None else out
    acc = accumulate_dtype(pre.dtype)
    own = None if part is not None else _part(xp, None, n_chunks, C, acc)
    buf, stride = part or own
    _cu.launch(f"bias_gelu_backward<{ctype(pre.dtype)}>", _column_grid(C, n_chunks, pre.dtype), COLUMN_BLOCK,
               (pre, kernel_array(bias, acc, xp), kernel_array(dout, pre.dtype, xp), dpre, buf,
                np.int32(N), np.int32(C), np.int32(rows_per_chunk), np.int32(stride)))
    return dpre, _summed(part, own, n_chunks, C)


def bias_residual(x, a, bias):
    """out = x + a + bias: a block's output projection (a, in the activation dtype)
    plus its bias, added to the residual stream x (float32/float64). A new array."""
    xp = array_module(x)
    out = xp.empty_like(x)
    _cu.launch(f"bias_residual<{ctype(x.dtype)}, {ctype(a.dtype)}>", elementwise_grid(x.size, x.dtype, a.dtype),
               (THREADS,),
               (kernel_array(x, x.dtype, xp), kernel_array(a, a.dtype, xp), kernel_array(bias, x.dtype, xp), out,
                np.int64(x.size), np.int32(x.shape[-1])))
    return out


def cast_column_sums(a, dtype, part=None, out=None):
    """(a converted to dtype, a summed over rows): the residual stream's gradient
    made into a matmul operand, and the bias gradient of that matmul's output.
    part=(array, stride): the partial sums go there and the sum returned is None."""
    xp = array_module(a)
    N, C = _rows(a).shape
    rows_per_chunk, n_chunks = _chunks(N)
    out = xp.empty(a.shape, dtype=dtype) if out is None else out
    own = None if part is not None else _part(xp, None, n_chunks, C, accumulate_dtype(a.dtype))
    buf, stride = part or own
    _cu.launch(f"cast_column_sums<{ctype(a.dtype)}, {ctype(dtype)}>", _column_grid(C, n_chunks, a.dtype, dtype),
               COLUMN_BLOCK, (kernel_array(a, a.dtype, xp), out, buf, np.int32(N), np.int32(C),
                                   np.int32(rows_per_chunk), np.int32(stride)))
    return out, _summed(part, own, n_chunks, C)


def column_sums(a, part=None):
    """a summed over rows, in the accumulate dtype: (..., C) -> (C,); with
    part=(array, stride) the partial sums go there and None is returned."""
    xp = array_module(a)
    N, C = _rows(a).shape
    rows_per_chunk, n_chunks = _chunks(N)
    own = None if part is not None else _part(xp, None, n_chunks, C, accumulate_dtype(a.dtype))
    buf, stride = part or own
    _cu.launch(f"column_sums<{ctype(a.dtype)}>", _column_grid(C, n_chunks, a.dtype), COLUMN_BLOCK,
               (kernel_array(a, a.dtype, xp), buf, np.int32(N), np.int32(C), np.int32(rows_per_chunk),
                np.int32(stride)))
    return _summed(part, own, n_chunks, C)
