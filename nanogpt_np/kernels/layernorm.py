"""LayerNorm through layernorm.cu, with the interface of nanogpt_np/layers/layernorm.py.

The readable formula and its derivation are in that file; the kernels compute the
same thing row by row (one warp per row) and save the same statistics, mean and
rstd, so the cache has the same contents.

Mixed precision (see backend.py): `forward(x, ..., out_dtype=bf16)` normalises the
float32 residual stream and writes its output in bf16 for the matmul that follows;
backward then takes a bf16 dout and returns a float32 dx. `backward(..., dx_out=a)`
adds dx into `a` (the residual stream's gradient) instead of returning a new array.
"""
import numpy as np

from ..backend import array_module
from .fused import ROW_CHUNKS
from .loader import KernelFile, accumulate_dtype, ceil_div, ctype, kernel_array, scalar

# (x, out) type pairs: single precision, and the mixed-precision float32 -> bf16
TYPE_PAIRS = [("float", "float"), ("double", "double"), ("float", "bf16")]
_cu = KernelFile(
    "layernorm.cu",
    [f"layernorm_forward<{tx}, {to}>" for tx, to in TYPE_PAIRS]
    + [f"layernorm_{part}<{to}, {tx}>" for part in ("backward_dx", "backward_params") for tx, to in TYPE_PAIRS]
    + [f"residual_layernorm_forward<{tx}, {to}, {to}>" for tx, to in TYPE_PAIRS]
    + [f"layernorm_backward_fused<{to}, {tx}>" for tx, to in TYPE_PAIRS],
)
FUSED_MAX_C = 32 * 32  # LN_MAX_COLUMNS_PER_LANE lanes' worth: the one-kernel backward's widest row
FUSED_THREADS = 256
ROWS_PER_BLOCK = 8  # one warp per row, so 256 threads per block
PARAM_THREADS = 256  # columns per block in the dweight/dbias kernel
PARAM_CHUNKS = ROW_CHUNKS  # row chunks summed separately for dweight/dbias (a block's kernels share one partials array)


def forward(x, weight, bias, eps=1e-5, out_dtype=None):
    """x: (B, T, C)  weight, bias: (C,)  ->  out: (B, T, C), in out_dtype (default x's)"""
    xp = array_module(x)
    C = x.shape[-1]
    x2 = kernel_array(x, x.dtype, xp).reshape(-1, C)  # (N, C)
    N = x2.shape[0]
    out_dtype = x.dtype if out_dtype is None else np.dtype(out_dtype)
    out = xp.empty((N, C), dtype=out_dtype)
    mean = xp.empty(N, dtype=x.dtype)  # (N,)
    rstd = xp.empty(N, dtype=x.dtype)  # (N,)
    _cu.launch(
        f"layernorm_forward<{ctype(x.dtype)}, {ctype(out_dtype)}>", (ceil_div(N, ROWS_PER_BLOCK),),
        (32 * ROWS_PER_BLOCK,),
        (x2, kernel_array(weight, x.dtype, xp), kernel_array(bias, x.dtype, xp), out, mean, rstd,
         np.int32(N), np.int32(C), scalar(eps, accumulate_dtype(x.dtype))),
    )
    stat_shape = x.shape[:-1] + (1,)
    cache = (x2.reshape(x.shape), weight, mean.reshape(stat_shape), rstd.reshape(stat_shape))
    return out.reshape(x.shape), cache


def residual_forward(x, a, abias, weight, bias, eps=1e-5, out_dtype=None):
    """x_new = x + (a + abias), then LayerNorm of x_new, in one kernel:
    x: (B, T, C) residual stream, a: (B, T, C) a projection's output (out_dtype, or
    x's dtype), abias: its bias (C,)  ->  x_new, out (in out_dtype), cache (as forward's,
    for x_new). The same bits as fused.bias_residual followed by forward."""
    xp = array_module(x)
    C = x.shape[-1]
    out_dtype = x.dtype if out_dtype is None else np.dtype(out_dtype)
    x2 = kernel_array(x, x.dtype, xp).reshape(-1, C)  # (N, C)
    N = x2.shape[0]
    x_new = xp.empty((N, C), dtype=x.dtype)
    out = xp.empty((N, C), dtype=out_dtype)
    mean = xp.empty(N, dtype=x.dtype)  # (N,)
    rstd = xp.empty(N, dtype=x.dtype)  # (N,)
    acc = accumulate_dtype(x.dtype)
    _cu.launch(
        f"residual_layernorm_forward<{ctype(x.dtype)}, {ctype(out_dtype)}, {ctype(out_dtype)}>",
        (ceil_div(N, ROWS_PER_BLOCK),), (32 * ROWS_PER_BLOCK,),
        (x2, kernel_array(a, out_dtype, xp).reshape(-1, C), kernel_array(abias, acc, xp), x_new,
         kernel_array(weight, acc, xp), kernel_array(bias, acc, xp), out, mean, rstd, np.int32(N), np.int32(C),
         scalar(eps, acc)),
    )
    stat_shape = x.shape[:-1] + (1,)
    x_new = x_new.reshape(x.shape)
    return x_new, out.reshape(x.shape), (x_new, weight, mean.reshape(stat_shape), rstd.reshape(stat_shape))


def backward(dout, cache, dx_out=None, part=None, cast=None):
    """dout: (B, T, C)  ->  dx: (B, T, C), dweight: (C,), dbias: (C,)

    dx has x's dtype. With dx_out (an array like x), dx is added into it and
    dx_out is returned as dx. part=(array, offset, stride) (reduce.Partials.place
    of 2C columns): the partial sums of dweight and then dbias go there, and the
    dweight and dbias returned are None. cast=(out, (offset, stride)) (with part,
    in the same array): the same pass writes the resulting dx converted to out's
    dtype into out (N, C) and its column partial sums there: the next matmul's
    operand and bias gradient (fused.cast_column_sums's work, without its pass)."""
    xp = array_module(dout)
    x, weight, mean, rstd = cache
    C = x.shape[-1]
    pair = f"{ctype(dout.dtype)}, {ctype(x.dtype)}"
    x2 = x.reshape(-1, C)  # (N, C), contiguous since forward made it so
    dout2 = kernel_array(dout, dout.dtype, xp).reshape(-1, C)  # (N, C)
    N = x2.shape[0]
    mean1, rstd1 = mean.reshape(-1), rstd.reshape(-1)  # (N,)
    if dx_out is not None:
        if dx_out.shape != x.shape or dx_out.dtype != x.dtype or not dx_out.flags.c_contiguous:
            raise ValueError(f"dx_out must be a contiguous {x.dtype} array of shape {x.shape}")
        dx = dx_out.reshape(N, C)
    else:
        dx = xp.empty((N, C), dtype=x.dtype)
    rows_per_chunk, n_chunks = param_chunks(N)
    if part is None:
        own = xp.empty((n_chunks, 2 * C), dtype=x.dtype)  # dweight's partials, then dbias's
        buf, offset, stride = own.reshape(-1), 0, 2 * C
    else:
        own, (buf, offset, stride) = None, part
    if cast is None:  # unused arguments: arrays of the right types that the kernel only reads
        out, roffset, rstride = dout2, 0, 0
    else:
        out, (roffset, rstride) = cast
        if out.shape != (N, C) or np.dtype(out.dtype) != np.dtype(dout.dtype):
            raise ValueError(f"cast: out must be {np.dtype(dout.dtype)} of shape {(N, C)}")
    weight1 = kernel_array(weight, x.dtype, xp)
    if C <= FUSED_MAX_C:  # dx, the parameters' partial sums (and the cast) in one kernel
        _cu.launch(
            f"layernorm_backward_fused<{pair}>", (n_chunks,), (FUSED_THREADS,),
            (dout2, x2, weight1, mean1, rstd1, dx, np.int32(dx_out is not None), buf, np.int64(offset),
             np.int32(stride), np.int32(N), np.int32(C), np.int32(rows_per_chunk), out, np.int64(roffset),
             np.int32(rstride), np.int32(cast is not None)),
        )
    else:
        _cu.launch(
            f"layernorm_backward_dx<{pair}>", (ceil_div(N, ROWS_PER_BLOCK),), (32 * ROWS_PER_BLOCK,),
            (dout2, x2, weight1, mean1, rstd1, dx, np.int32(N), np.int32(C), np.int32(dx_out is not None)),
        )
        resid = dx if cast is not None else x2
        _cu.launch(
            f"layernorm_backward_params<{pair}>", (ceil_div(C, PARAM_THREADS), n_chunks), (PARAM_THREADS,),
            (dout2, x2, mean1, rstd1, buf, np.int64(offset), np.int32(N), np.int32(C), np.int32(rows_per_chunk),
             np.int32(stride), resid, out, np.int64(roffset), np.int32(rstride), np.int32(cast is not None)),
        )
    if own is None:
        return dx.reshape(x.shape), None, None
    sums = own.sum(axis=0)
    return dx.reshape(x.shape), sums[:C], sums[C:]


def param_chunks(N):
    """(rows per chunk, chunks): how the dweight/dbias kernel splits N rows."""
    rows_per_chunk = ceil_div(N, min(N, PARAM_CHUNKS))
    return rows_per_chunk, ceil_div(N, rows_per_chunk)
