import numpy as np
import pytest

from nanogpt_np.layers import embedding
from tests.helpers import DTYPES, assert_close, directional_fd_check, needs_torch, randn, to_torch

SHAPES = [(2, 5, 8, 11, 16), (1, 1, 4, 3, 1), (3, 7, 6, 101, 9)]  # B, T, C, V, block_size


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,V,block", SHAPES)
def test_embedding_matches_torch(B, T, C, V, block, dtype):
    torch = needs_torch()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, V, (B, T))
    idx[0, 0] = idx[-1, -1]  # make sure some token repeats, so the scatter must add
    wte = randn(rng, (V, C), dtype)
    wpe = randn(rng, (block, C), dtype)
    dx = randn(rng, (B, T, C), dtype)

    x, cache = embedding.forward(idx, wte, wpe)
    dwte, dwpe = embedding.backward(dx, cache)

    wte_t, wpe_t = to_torch(wte, True), to_torch(wpe, True)
    x_t = wte_t[torch.from_numpy(idx)] + wpe_t[:T]
    x_t.backward(to_torch(dx))

    assert x.dtype == dtype and dwte.dtype == dtype
    assert_close(x, x_t.detach().numpy(), dtype, "x")
    assert_close(dwte, wte_t.grad.numpy(), dtype, "dwte")
    assert_close(dwpe, wpe_t.grad.numpy(), dtype, "dwpe")


def test_embedding_backward_adds_into_given_buffers():
    rng = np.random.default_rng(0)
    idx = np.array([[1, 2, 1]])
    wte, wpe = rng.standard_normal((4, 2)), rng.standard_normal((5, 2))
    dx = rng.standard_normal((1, 3, 2))
    _, cache = embedding.forward(idx, wte, wpe)
    fresh_wte, fresh_wpe = embedding.backward(dx, cache)
    dwte, dwpe = np.ones((4, 2)), np.ones((5, 2))
    out_wte, out_wpe = embedding.backward(dx, cache, dwte=dwte, dwpe=dwpe)
    assert out_wte is dwte and out_wpe is dwpe
    np.testing.assert_allclose(dwte, fresh_wte + 1)
    np.testing.assert_allclose(dwpe, fresh_wpe + 1)
    np.testing.assert_allclose(fresh_wte[1], dx[0, 0] + dx[0, 2])


@pytest.mark.parametrize("B,T,C,V,block", SHAPES)
def test_embedding_finite_differences(B, T, C, V, block):
    rng = np.random.default_rng(1)
    idx = rng.integers(0, V, (B, T))
    wte = randn(rng, (V, C), np.float64)
    wpe = randn(rng, (block, C), np.float64)
    R = randn(rng, (B, T, C), np.float64)

    def loss(wte, wpe):
        return float(np.sum(embedding.forward(idx, wte, wpe)[0] * R))

    _, cache = embedding.forward(idx, wte, wpe)
    dwte, dwpe = embedding.backward(R, cache)
    directional_fd_check(loss, [wte, wpe], [dwte, dwpe], rng)


@pytest.mark.parametrize("B,T,C,V,block", SHAPES)
def test_reference_equals_fast(B, T, C, V, block):
    from tests.helpers import assert_same_as_reference

    rng = np.random.default_rng(5)
    idx = rng.integers(0, V, (B, T))
    idx[0, 0] = idx[-1, -1]  # a repeated token, whose gradient rows must add
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((block, C))
    dx = rng.standard_normal((B, T, C))
    x, cache = embedding.forward(idx, wte, wpe)
    assert_same_as_reference(x, embedding.reference_forward(idx, wte, wpe), "forward")
    assert_same_as_reference(embedding.backward(dx, cache), embedding.reference_backward(dx, idx, wte, wpe),
                             "backward")
