import numpy as np
import pytest

from nanogpt_np.layers import layernorm
from tests.helpers import DTYPES, assert_close, directional_fd_check, needs_torch, randn, to_torch

SHAPES = [(2, 5, 8), (1, 1, 4), (3, 7, 13), (1, 9, 64)]  # B, T, C


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_layernorm_matches_torch(B, T, C, dtype):
    torch = needs_torch()
    rng = np.random.default_rng(0)
    # an offset and a spread per row, so the mean and variance both matter
    x = randn(rng, (B, T, C), dtype, 2.0) + randn(rng, (B, T, 1), dtype, 3.0)
    w = randn(rng, (C,), dtype) + 1
    b = randn(rng, (C,), dtype)
    dout = randn(rng, (B, T, C), dtype)

    out, cache = layernorm.forward(x, w, b)
    dx, dw, db = layernorm.backward(dout, cache)

    xt, wt, bt = to_torch(x, True), to_torch(w, True), to_torch(b, True)
    out_t = torch.nn.functional.layer_norm(xt, (C,), wt, bt, eps=1e-5)
    out_t.backward(to_torch(dout))

    assert out.dtype == dtype
    assert_close(out, out_t.detach().numpy(), dtype, "out")
    assert_close(dx, xt.grad.numpy(), dtype, "dx", factor=10)
    assert_close(dw, wt.grad.numpy(), dtype, "dweight")
    assert_close(db, bt.grad.numpy(), dtype, "dbias")


def test_layernorm_caches_only_statistics():
    x = np.random.default_rng(0).standard_normal((2, 3, 8))
    _, (x_cached, _, mean, rstd) = layernorm.forward(x, np.ones(8), np.zeros(8))
    assert x_cached is x
    assert mean.shape == (2, 3, 1) and rstd.shape == (2, 3, 1)


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_layernorm_finite_differences(B, T, C):
    rng = np.random.default_rng(1)
    x = randn(rng, (B, T, C), np.float64) + 1.5
    w = randn(rng, (C,), np.float64)
    b = randn(rng, (C,), np.float64)
    R = randn(rng, (B, T, C), np.float64)

    def loss(x, w, b):
        return float(np.sum(layernorm.forward(x, w, b)[0] * R))

    _, cache = layernorm.forward(x, w, b)
    dx, dw, db = layernorm.backward(R, cache)
    directional_fd_check(loss, [x, w, b], [dx, dw, db], rng)


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_chunked_forward_equals_the_readable_formula(B, T, C, monkeypatch):
    from nanogpt_np import cpu

    monkeypatch.setattr(cpu, "CHUNK_BYTES", 8 * C * 2)  # two rows per chunk: many chunks
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, T, C)) * 2 + 1
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    out, _ = layernorm.forward(x, w, b)
    np.testing.assert_allclose(out, layernorm.reference_forward(x, w, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_layernorm_chunks_and_threads_agree(n_threads, monkeypatch):
    from nanogpt_np import cpu

    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 7, 13)) + 2
    w, b = rng.standard_normal(13), rng.standard_normal(13)
    dout = rng.standard_normal(x.shape)
    out, cache = layernorm.forward(x, w, b)
    dx, dw, db = layernorm.backward(dout, cache)
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 8 * 13 * 3)  # 3 rows per chunk, 7 chunks
    monkeypatch.setattr(cpu, "_num_threads", n_threads)
    out_c, cache_c = layernorm.forward(x, w, b)
    dx_c, dw_c, db_c = layernorm.backward(dout, cache_c)
    np.testing.assert_array_equal(out_c, out)  # row by row: same operations, same bits
    np.testing.assert_array_equal(dx_c, dx)
    np.testing.assert_allclose(dw_c, dw, rtol=1e-13)  # a sum over chunks: rounding may differ
    np.testing.assert_allclose(db_c, db, rtol=1e-13)


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_reference_equals_fast(B, T, C):
    from tests.helpers import assert_same_as_reference

    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, T, C)) * 2 + rng.standard_normal((B, T, 1)) * 3
    w, b, dout = rng.standard_normal(C) + 1, rng.standard_normal(C), rng.standard_normal((B, T, C))
    out, cache = layernorm.forward(x, w, b)
    assert_same_as_reference(out, layernorm.reference_forward(x, w, b), "forward")
    assert_same_as_reference(layernorm.backward(dout, cache), layernorm.reference_backward(dout, x, w, b),
                             "backward")
