import numpy as np
import pytest

from nanogpt_np.layers import linear
from tests.helpers import DTYPES, assert_close, directional_fd_check, needs_torch, randn, to_torch

SHAPES = [  # (B, T, C, OC)
    (2, 5, 8, 12),
    (1, 1, 3, 7),  # B=1, T=1
    (3, 7, 16, 48),  # odd T, 3C output like c_attn
    (1, 9, 13, 101),  # vocab-like output that is not a multiple of 64
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,OC", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_torch(B, T, C, OC, dtype, with_bias):
    torch = needs_torch()
    rng = np.random.default_rng(0)
    x = randn(rng, (B, T, C), dtype)
    w = randn(rng, (OC, C), dtype, 0.3)
    b = randn(rng, (OC,), dtype) if with_bias else None
    dout = randn(rng, (B, T, OC), dtype)

    out, cache = linear.forward(x, w, b)
    dx, dw, db = linear.backward(dout, cache)

    xt, wt = to_torch(x, True), to_torch(w, True)
    bt = to_torch(b, True) if with_bias else None
    out_t = torch.nn.functional.linear(xt, wt, bt)
    out_t.backward(to_torch(dout))

    assert out.shape == (B, T, OC) and out.dtype == dtype
    assert_close(out, out_t.detach().numpy(), dtype, "out")
    assert_close(dx, xt.grad.numpy(), dtype, "dx")
    assert_close(dw, wt.grad.numpy(), dtype, "dweight")
    if with_bias:
        assert_close(db, bt.grad.numpy(), dtype, "dbias")
    else:
        assert db is None


@pytest.mark.parametrize("B,T,C,OC", SHAPES)
def test_linear_finite_differences(B, T, C, OC):
    rng = np.random.default_rng(1)
    x = randn(rng, (B, T, C), np.float64)
    w = randn(rng, (OC, C), np.float64)
    b = randn(rng, (OC,), np.float64)
    R = randn(rng, (B, T, OC), np.float64)

    def loss(x, w, b):
        return float(np.sum(linear.forward(x, w, b)[0] * R))

    _, cache = linear.forward(x, w, b)
    dx, dw, db = linear.backward(R, cache)
    directional_fd_check(loss, [x, w, b], [dx, dw, db], rng)


@pytest.mark.parametrize("B,T,C,OC", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_equals_fast(B, T, C, OC, with_bias):
    from tests.helpers import assert_same_as_reference

    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((B, T, C)), rng.standard_normal((OC, C))
    b = rng.standard_normal(OC) if with_bias else None
    dout = rng.standard_normal((B, T, OC))
    out, cache = linear.forward(x, w, b)
    assert_same_as_reference(out, linear.reference_forward(x, w, b), "forward")
    assert_same_as_reference(linear.backward(dout, cache), linear.reference_backward(dout, x, w, b), "backward")
