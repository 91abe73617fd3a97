"""GELU, tanh approximation (GPT-2's "gelu_new"):

    out = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)

Key: B batch, T time, C channels (here the MLP's 4*n_embd). Elementwise, so any
shape works.

Derivation. With t = tanh(u) and d tanh(u)/du = 1 - t^2:
    d out / dx = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * du/dx
    du/dx      = sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)
The first term is the "gate" (how much of x passes); the second is how the gate
itself moves with x.

On the GPU this formula runs as nanogpt_np/kernels/gelu.cu, tested against this file.
"""
import math

from ..backend import array_module

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_COEF = 0.044715


def _inner(x):
    """u = sqrt(2/pi) * (x + 0.044715 x^3), built in place in one temporary."""
    u = x * x
    u *= GELU_COEF
    u += 1.0
    u *= x
    u *= SQRT_2_OVER_PI
    return u


def forward(x):
    """x: (B, T, C)  ->  out: (B, T, C)"""
    xp = array_module(x)
    out = xp.tanh(_inner(x))
    out += 1.0
    out *= x
    out *= 0.5
    # Only x is cached: tanh is recomputed in backward, which is cheaper than
    # keeping another (B, T, C) array alive until then.
    return out, x


def backward(dout, cache):
    """dout: (B, T, C)  ->  dx: (B, T, C)"""
    xp = array_module(dout)
    x = cache
    # forward: u = sqrt(2/pi) * (x + 0.044715 x^3)
    t = xp.tanh(_inner(x))  # recomputed
    dudx = x * x
    dudx *= 3.0 * GELU_COEF * SQRT_2_OVER_PI
    dudx += SQRT_2_OVER_PI
    # forward: out = 0.5 * x * (1 + t)
    #   d out/dx = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * du/dx
    dx = 1.0 - t * t
    dx *= x
    dx *= dudx
    t += 1.0
    dx += t
    dx *= 0.5
    dx *= dout
    return dx
