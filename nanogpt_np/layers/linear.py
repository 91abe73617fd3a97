"""Linear layer: out = x @ weight.T + bias.

GPT-2 uses it for attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj and, with no bias
and the token embedding as its weight, for lm_head.

Key: N rows (every position of every sequence, B*T flattened), C input channels,
OC output channels. The weight is (OC, C), PyTorch's layout, so GPT-2 checkpoints
load without transposes.

Derivation, one element at a time:
    out[n, o] = sum_c x[n, c] * weight[o, c] + bias[o]
so
    dx[n, c]      = sum_o dout[n, o] * weight[o, c]   ->  dx      = dout @ weight
    dweight[o, c] = sum_n dout[n, o] * x[n, c]        ->  dweight = dout.T @ x
    dbias[o]      = sum_n dout[n, o]
Each gradient is one matrix product, as big as the forward one: a linear layer's
backward costs twice its forward. A matrix product's gradient with respect to one
factor is the incoming gradient times the other factor, transposed to fit.

`reference_forward` and `reference_backward` below are this in NumPy; the faster
`forward` and `backward` after them compute the same numbers.
"""
from ..cpu import column_sums, matmul

# ---- the lesson: the formula and its derivative, plainly -------------------------------


def reference_forward(x, weight, bias=None):
    """x: (..., C)  weight: (OC, C)  bias: (OC,) or None  ->  out: (..., OC)"""
    out = x @ weight.T
    if bias is not None:
        out = out + bias
    return out


def reference_backward(dout, x, weight, bias=None):
    """dout: (..., OC)  ->  dx: (..., C), dweight: (OC, C), dbias: (OC,) or None"""
    C, OC = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, C)  # (N, C): the weight sees every position as one row
    dout2 = dout.reshape(-1, OC)  # (N, OC)
    # forward: out = out + bias        (bias is broadcast over the N rows: sum them)
    dbias = dout2.sum(axis=0) if bias is not None else None  # (OC,)
    # forward: out = x @ weight.T
    dx = dout @ weight  # (..., C)
    dweight = dout2.T @ x2  # (OC, C)
    return dx, dweight, dbias


# ---- the same arithmetic, scheduled for speed ----------------------------------------------
# What differs from the lesson: one 2-D GEMM over all rows, the bias added inside the
# matmul call, and the gradients written into buffers the caller passes (out=), so
# the model's gradients land in place with no temporary. BLAS reads `weight.T` as a
# flag, not as a copy, so the (OC, C) layout costs nothing.


def forward(x, weight, bias=None, out=None):
    """x: (..., C)  weight: (OC, C)  bias: (OC,) or None  ->  out: (..., OC)

    `out`, when given, is a (..., OC) array that receives the result (the model
    reuses one buffer for the big lm_head logits instead of a fresh one each step).
    """
    C = x.shape[-1]
    OC = weight.shape[0]
    x2 = x.reshape(-1, C)  # (N, C): one 2-D GEMM instead of a batched one
    out2 = None if out is None else out.reshape(-1, OC)  # (N, OC), a view of out
    out = matmul(x2, weight.T, out=out2, bias=bias)  # (N, OC); BLAS reads weight.T in place
    # x is kept because dweight needs it; it is the previous layer's output, which
    # exists anyway, so the cache costs no memory.
    cache = (x, weight, bias is not None)
    return out.reshape(*x.shape[:-1], OC), cache


def backward(dout, cache, dweight_out=None, dbias_out=None):
    """dout: (..., OC)  ->  dx: (..., C), dweight: (OC, C), dbias: (OC,) or None

    dweight_out / dbias_out, when given, receive the gradients (overwritten, as
    NumPy's `out=`) and are returned. The model passes its freshly zeroed gradient
    buffers this way, so the largest products land where they belong without a
    temporary and a second pass to add them.
    """
    x, weight, has_bias = cache
    OC, C = weight.shape
    x2 = x.reshape(-1, C)  # (N, C)
    dout2 = dout.reshape(-1, OC)  # (N, OC)
    # forward: out = x @ weight.T + bias
    dbias = column_sums(dout2, out=dbias_out) if has_bias else None  # (OC,), over rows
    dweight = matmul(dout2.T, x2, out=dweight_out)  # (OC, C); BLAS reads dout2.T in place
    dx = matmul(dout2, weight)  # (N, C)
    return dx.reshape(x.shape), dweight, dbias

