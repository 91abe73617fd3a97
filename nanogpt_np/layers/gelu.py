"""GELU, tanh approximation (GPT-2's "gelu_new"):

    out = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)

Key: B batch, T time, C channels (here the MLP's 4*n_embd). Elementwise, so any
shape works.

Derivation. With t = tanh(u) and d tanh(u)/du = 1 - t^2:
    d out / dx = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * du/dx
    du/dx      = sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)
The first term is the "gate" (how much of x passes); the second is how the gate
itself moves with x.

`reference_forward` and `reference_backward` below are this, one NumPy line per
step; the faster `forward` and `backward` after them compute the same numbers.
"""
import math

from ..backend import array_module

from ..cpu import chunk_rows, map_chunks

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_COEF = 0.044715


# ---- the lesson: the formula and its derivative, plainly -------------------------------


def reference_forward(x):
    """x: (B, T, C)  ->  out: (B, T, C)"""
    xp = array_module(x)
    u = SQRT_2_OVER_PI * (x + GELU_COEF * x**3)
    t = xp.tanh(u)
    out = 0.5 * x * (1 + t)
    return out


def reference_backward(dout, x):
    """dout: (B, T, C)  ->  dx: (B, T, C)"""
    xp = array_module(x)
    u = SQRT_2_OVER_PI * (x + GELU_COEF * x**3)  # recomputed: the forward kept only x
    t = xp.tanh(u)
    # forward: out = 0.5 * x * (1 + t)    (x appears twice: directly, and inside t)
    dx_direct = dout * 0.5 * (1 + t)
    dt = dout * 0.5 * x
    # forward: t = tanh(u)
    du = dt * (1 - t**2)
    # forward: u = SQRT_2_OVER_PI * (x + GELU_COEF * x**3)
    dx_through_t = du * SQRT_2_OVER_PI * (1 + 3 * GELU_COEF * x**2)
    dx = dx_direct + dx_through_t
    return dx


# ---- the same arithmetic, scheduled for speed ----------------------------------------------
# What differs from the lesson: cache-sized chunks, every operation in place on one or
# two scratch buffers, and the constants folded (the 0.5 of out moves into du/dx),
# so each chunk costs a few passes instead of a dozen temporaries.
#
# Why. Written as NumPy expressions, each formula is about ten passes over its
# array, and for GPT-2 124M that array is (1024, 3072) floats, 12 MB, far larger than
# the CPU's cache. So the work is done in cache-sized chunks of the flattened array
# (see cpu.map_chunks): the first operation on a chunk reads it from memory, and
# the rest of the formula runs on data already in the cache. Each chunk function
# below is the plain formula, one operation per line, in place.
# On the GPU this formula runs as nanogpt_np/kernels/gelu.cu, tested against this file.


def _flat(a):
    return a.reshape(-1)  # a view: layer inputs and outputs here are contiguous


def forward(x):
    """x: (B, T, C)  ->  out: (B, T, C)"""
    xp = array_module(x)
    x = xp.ascontiguousarray(x)
    out = xp.empty_like(x)
    x1, out1 = _flat(x), _flat(out)  # (B*T*C,)

    def chunk(lo, hi):
        _gelu(x1[lo:hi], out1[lo:hi])

    map_chunks(chunk, x1.size, chunk_rows(x1.size, 1, x1.itemsize, xp))
    # Only x is cached: tanh is recomputed in backward, which is cheaper than
    # keeping another (B, T, C) array alive until then.
    return out, x


def _gelu(x, out):
    """out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), in place in out."""
    xp = array_module(x)
    # u = x * (sqrt(2/pi) + sqrt(2/pi) * 0.044715 * x^2): the constants folded, one op less
    xp.multiply(x, x, out=out)
    out *= SQRT_2_OVER_PI * GELU_COEF
    out += SQRT_2_OVER_PI
    out *= x  # u
    xp.tanh(out, out=out)  # t
    out += 1.0
    out *= x
    out *= 0.5


def backward(dout, cache):
    """dout: (B, T, C)  ->  dx: (B, T, C)"""
    xp = array_module(dout)
    x = cache
    dx = xp.empty_like(x)
    x1, dout1, dx1 = _flat(x), _flat(xp.ascontiguousarray(dout)), _flat(dx)

    def chunk(lo, hi):
        t, dudx = xp.empty(hi - lo, x1.dtype), xp.empty(hi - lo, x1.dtype)  # scratch
        _gelu_backward(x1[lo:hi], dout1[lo:hi], dx1[lo:hi], t, dudx)

    map_chunks(chunk, x1.size, chunk_rows(x1.size, 1, x1.itemsize, xp))
    return dx


def _gelu_backward(x, dout, dx, t, dudx):
    """dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx), with t and dudx as scratch."""
    xp = array_module(x)
    # forward: u = sqrt(2/pi) * (x + 0.044715 x^3)
    xp.multiply(x, x, out=dudx)  # x^2
    xp.multiply(dudx, SQRT_2_OVER_PI * GELU_COEF, out=t)
    t += SQRT_2_OVER_PI
    t *= x
    xp.tanh(t, out=t)  # t = tanh(u), recomputed
    #   0.5 du/dx = 0.5 sqrt(2/pi) (1 + 3 * 0.044715 x^2)   (the 0.5 of out, folded in)
    dudx *= 1.5 * SQRT_2_OVER_PI * GELU_COEF
    dudx += 0.5 * SQRT_2_OVER_PI
    # forward: out = 0.5 * x * (1 + t)
    #   d out/dx = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * du/dx
    xp.multiply(t, t, out=dx)
    xp.subtract(1.0, dx, out=dx)  # 1 - t^2
    dx *= x
    dx *= dudx  # 0.5 x (1 - t^2) du/dx
    t *= 0.5
    t += 0.5  # 0.5 (1 + t)
    dx += t
    dx *= dout
