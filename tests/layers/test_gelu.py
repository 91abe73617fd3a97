import numpy as np
import pytest

from nanogpt_np.layers import gelu
from tests.helpers import DTYPES, assert_close, directional_fd_check, needs_torch, randn, to_torch

SHAPES = [(2, 5, 8), (1, 1, 4), (3, 7, 12)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_matches_torch(shape, dtype):
    torch = needs_torch()
    rng = np.random.default_rng(0)
    x = randn(rng, shape, dtype, 3.0)  # wide enough to reach both tails of tanh
    dout = randn(rng, shape, dtype)

    out, cache = gelu.forward(x)
    dx = gelu.backward(dout, cache)

    xt = to_torch(x, True)
    out_t = torch.nn.functional.gelu(xt, approximate="tanh")
    out_t.backward(to_torch(dout))

    assert out.dtype == dtype and dx.dtype == dtype
    assert_close(out, out_t.detach().numpy(), dtype, "out")
    assert_close(dx, xt.grad.numpy(), dtype, "dx")


def test_gelu_large_inputs_are_finite():
    x = np.array([[[-1e4, -50.0, 0.0, 50.0, 1e4]]], dtype=np.float32)
    out, cache = gelu.forward(x)
    dx = gelu.backward(np.ones_like(x), cache)
    np.testing.assert_allclose(out, [[[0, 0, 0, 50, 1e4]]], atol=1e-6)
    np.testing.assert_allclose(dx, [[[0, 0, 0.5, 1, 1]]], atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_gelu_finite_differences(shape):
    rng = np.random.default_rng(1)
    x = randn(rng, shape, np.float64, 2.0)
    R = randn(rng, shape, np.float64)

    def loss(x):
        return float(np.sum(gelu.forward(x)[0] * R))

    _, cache = gelu.forward(x)
    directional_fd_check(loss, [x], [gelu.backward(R, cache)], rng)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_gelu_chunks_and_threads_give_the_same_result(n_threads, monkeypatch):
    from nanogpt_np import cpu

    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 7, 12)) * 3
    dout = rng.standard_normal(x.shape)
    out, cache = gelu.forward(x)
    dx = gelu.backward(dout, cache)
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 8 * 5)  # 5 values per chunk: ragged chunks
    monkeypatch.setattr(cpu, "_num_threads", n_threads)
    out_c, cache_c = gelu.forward(x)
    np.testing.assert_array_equal(out_c, out)  # elementwise: same operations, same bits
    np.testing.assert_array_equal(gelu.backward(dout, cache_c), dx)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_fast(shape):
    from tests.helpers import assert_same_as_reference

    rng = np.random.default_rng(5)
    x, dout = rng.standard_normal(shape) * 3, rng.standard_normal(shape)
    out, cache = gelu.forward(x)
    assert_same_as_reference(out, gelu.reference_forward(x), "forward")
    assert_same_as_reference(gelu.backward(dout, cache), gelu.reference_backward(dout, x), "backward")
