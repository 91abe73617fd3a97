"""LayerNorm over the channel axis: out = (x - mean) / sqrt(var + eps) * weight + bias.

Key: B batch, T time, C channels. Any leading shape works; statistics are taken
over the last axis, one (mean, rstd) pair per position.

Derivation. Write xhat = (x - mean) * rstd with rstd = 1 / sqrt(var + eps), and
g = dout * weight, the gradient arriving at xhat. Along one row of C values:
    d mean / d x_j = 1/C
    d rstd / d x_j = -rstd^3 * (x_j - mean) / C = -rstd^2 * xhat_j / C
    d xhat_i / d x_j = rstd * (delta_ij - 1/C - xhat_i * xhat_j / C)
so
    dx_j = sum_i g_i * d xhat_i / d x_j
         = rstd * (g_j - mean(g) - xhat_j * mean(g * xhat))
The two means are the whole cost of normalising: the gradient loses its component
along the all-ones direction (the mean was removed) and along xhat (the scale was
removed).

`reference_forward` and `reference_backward` below are this, one NumPy line per
step; the faster `forward` and `backward` after them compute the same numbers.
"""
from ..backend import array_module
from ..cpu import chunk_rows, column_sums, map_chunks


# ---- the lesson: the formula and its derivative, plainly -------------------------------


def reference_forward(x, weight, bias, eps=1e-5):
    """x: (B, T, C)  weight, bias: (C,)  ->  out: (B, T, C)"""
    mean = x.mean(axis=-1, keepdims=True)  # (B, T, 1)
    xc = x - mean
    var = (xc**2).mean(axis=-1, keepdims=True)  # (B, T, 1), biased as in PyTorch
    rstd = 1.0 / (var + eps) ** 0.5  # (B, T, 1)
    xhat = xc * rstd
    out = xhat * weight + bias
    return out


def reference_backward(dout, x, weight, bias, eps=1e-5):
    """dout: (B, T, C)  ->  dx: (B, T, C), dweight: (C,), dbias: (C,)

    The chain rule one forward line at a time. Collected, the lines below give the
    closed form of the module docstring, rstd * (g - mean(g) - xhat * mean(g * xhat)),
    which is what `backward` computes."""
    C = x.shape[-1]
    rows = tuple(range(x.ndim - 1))  # every axis but C: weight and bias are shared by all rows
    mean = x.mean(axis=-1, keepdims=True)  # recomputed, as in the forward
    xc = x - mean
    var = (xc**2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / (var + eps) ** 0.5
    xhat = xc * rstd
    # forward: out = xhat * weight + bias
    dbias = dout.sum(axis=rows)  # (C,)
    dweight = (dout * xhat).sum(axis=rows)  # (C,)
    dxhat = dout * weight  # (B, T, C), the g of the docstring
    # forward: xhat = xc * rstd
    dxc = dxhat * rstd
    drstd = (dxhat * xc).sum(axis=-1, keepdims=True)  # (B, T, 1): rstd is shared by a row
    # forward: rstd = 1.0 / (var + eps) ** 0.5
    dvar = drstd * -0.5 * (var + eps) ** -1.5
    # forward: var = (xc**2).mean(axis=-1, keepdims=True)
    dxc = dxc + dvar * 2.0 * xc / C
    # forward: xc = x - mean
    dx = dxc
    dmean = -dxc.sum(axis=-1, keepdims=True)  # (B, T, 1)
    # forward: mean = x.mean(axis=-1, keepdims=True)
    dx = dx + dmean / C
    return dx, dweight, dbias


# ---- the same arithmetic, scheduled for speed ----------------------------------------------
# What differs from the lesson: blocks of rows that stay in the cache, the output
# built in place, and backward using the closed form (two row means instead of the
# chain above), with g and then dx held in the dx buffer and xhat scaled in place.
#
# Why. `reference_forward` is the formula as NumPy expressions: about eight passes
# over (B, T, C) and as many temporaries. forward and backward run the same lines on
# cache-sized blocks of rows (see cpu.map_chunks), so only the first pass over a
# block reads main memory, and build the result in the output array itself.
# On the GPU this formula runs as nanogpt_np/kernels/layernorm.cu, tested against this file.


def forward(x, weight, bias, eps=1e-5):
    """x: (B, T, C)  weight, bias: (C,)  ->  out: (B, T, C)"""
    xp = array_module(x)
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (N, C)
    N = x2.shape[0]
    out = xp.empty(x.shape, dtype=x.dtype)
    out2 = out.reshape(N, C)
    mean = xp.empty((N, 1), dtype=x.dtype)  # (N, 1)
    rstd = xp.empty((N, 1), dtype=x.dtype)  # (N, 1)

    def rows(r0, r1):
        xr, o = x2[r0:r1], out2[r0:r1]  # (n, C)
        xp.mean(xr, axis=1, keepdims=True, out=mean[r0:r1])
        xp.subtract(xr, mean[r0:r1], out=o)  # x - mean, built in the output
        var = xp.einsum("nc,nc->n", o, o)[:, None]  # (n, 1), sum of squares, no temporary
        var /= C  # biased, as in PyTorch
        var += eps
        xp.sqrt(var, out=var)
        xp.divide(1.0, var, out=rstd[r0:r1])
        o *= rstd[r0:r1]  # xhat
        o *= weight
        o += bias

    map_chunks(rows, N, chunk_rows(N, C, x.itemsize, xp))
    # Cache the two cheap per-row statistics; xhat is (B, T, C) and is recomputed
    # from x in backward. x is the residual stream, which is kept anyway.
    lead = x.shape[:-1] + (1,)
    cache = (x, weight, mean.reshape(lead), rstd.reshape(lead))
    return out, cache


def recompute_output(cache, bias):
    """forward's output again, from its cache (x, weight, mean, rstd) and the bias:
    the same operations in the same order, so the same bits (model --recompute)."""
    x, weight, mean, rstd = cache
    out = x - mean  # (B, T, C)
    out *= rstd  # xhat
    out *= weight
    out += bias
    return out


def backward(dout, cache):
    """dout: (B, T, C)  ->  dx: (B, T, C), dweight: (C,), dbias: (C,)"""
    xp = array_module(dout)
    x, weight, mean, rstd = cache
    C = x.shape[-1]
    x2, dout2 = x.reshape(-1, C), dout.reshape(-1, C)  # (N, C)
    N = x2.shape[0]
    mean2, rstd2 = mean.reshape(N, 1), rstd.reshape(N, 1)
    dx = xp.empty(x.shape, dtype=dout.dtype)
    dx2 = dx.reshape(N, C)
    # forward: out = xhat * weight + bias
    dbias = column_sums(dout2)  # (C,), dout summed over rows

    def rows(r0, r1):
        xhat = xp.empty((r1 - r0, C), dtype=dout.dtype)  # (n, C) scratch
        g = dx2[r0:r1]  # (n, C): g, then dx, in the output
        # xhat = (x - mean) * rstd, recomputed
        xp.subtract(x2[r0:r1], mean2[r0:r1], out=xhat)
        xhat *= rstd2[r0:r1]
        dweight = xp.einsum("nc,nc->c", dout2[r0:r1], xhat)  # this block's sum of dout * xhat
        xp.multiply(dout2[r0:r1], weight, out=g)  # dxhat
        # forward: xhat = (x - mean) * rstd, with mean and rstd functions of x too
        mean_g = g.mean(axis=1, keepdims=True)  # (n, 1)
        mean_g_xhat = xp.einsum("nc,nc->n", g, xhat)[:, None] / C  # (n, 1)
        g -= mean_g
        xhat *= mean_g_xhat
        g -= xhat
        g *= rstd2[r0:r1]
        return dweight

    dweight = sum(map_chunks(rows, N, chunk_rows(N, C, x.itemsize, xp)))  # (C,)
    return dx, dweight, dbias
