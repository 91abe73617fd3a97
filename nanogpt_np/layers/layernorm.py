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

On the GPU this formula runs as nanogpt_np/kernels/layernorm.cu, tested against this file.
"""


def forward(x, weight, bias, eps=1e-5):
    """x: (B, T, C)  weight, bias: (C,)  ->  out: (B, T, C)"""
    mean = x.mean(axis=-1, keepdims=True)  # (B, T, 1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (B, T, 1), biased as in PyTorch
    rstd = 1.0 / (var + eps) ** 0.5  # (B, T, 1)
    xc *= rstd  # xc is now xhat, normalised in place to save a temporary
    out = xc * weight
    out += bias
    # Cache the two cheap per-row statistics; xhat is (B, T, C) and is recomputed
    # from x in backward. x is the residual stream, which is kept anyway.
    cache = (x, weight, mean, rstd)
    return out, cache


def backward(dout, cache):
    """dout: (B, T, C)  ->  dx: (B, T, C), dweight: (C,), dbias: (C,)"""
    x, weight, mean, rstd = cache
    C = x.shape[-1]
    xhat = (x - mean) * rstd  # (B, T, C), recomputed
    dout2 = dout.reshape(-1, C)  # (B*T, C)
    # forward: out = xhat * weight + bias
    dbias = dout2.sum(axis=0)
    dweight = (dout * xhat).reshape(-1, C).sum(axis=0)
    dxhat = dout * weight
    # forward: xhat = (x - mean) * rstd, with mean and rstd functions of x too
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)  # (B, T, 1)
    mean_dxhat_xhat = (dxhat * xhat).mean(axis=-1, keepdims=True)  # (B, T, 1)
    dx = dxhat
    dx -= mean_dxhat
    xhat *= mean_dxhat_xhat
    dx -= xhat
    dx *= rstd
    return dx, dweight, dbias
