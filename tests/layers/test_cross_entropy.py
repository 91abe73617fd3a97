import numpy as np
import pytest

from nanogpt_np.layers import cross_entropy
from tests.helpers import DTYPES, assert_close, directional_fd_check, needs_torch, randn, to_torch

SHAPES = [(2, 5, 11), (1, 1, 3), (3, 7, 101), (2, 3, 50)]  # B, T, V


def torch_ce(logits, targets):
    torch = needs_torch()
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,V", SHAPES)
@pytest.mark.parametrize("chunk_elements", [cross_entropy.CHUNK_ELEMENTS, 7])
def test_cross_entropy_matches_torch(B, T, V, dtype, chunk_elements, monkeypatch):
    torch = needs_torch()
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(0)
    logits = randn(rng, (B, T, V), dtype, 3.0)
    targets = rng.integers(0, V, (B, T))

    logits_t = to_torch(logits.copy(), True)
    loss_t = torch_ce(logits_t, torch.from_numpy(targets))
    loss_t.backward()

    loss, cache = cross_entropy.forward(logits, targets)
    dlogits = cross_entropy.backward(1.0, cache)

    assert_close(float(loss), loss_t.item(), dtype, "loss")
    assert_close(dlogits, logits_t.grad.numpy(), dtype, "dlogits")
    assert dlogits.dtype == dtype


def test_backward_reuses_the_logits_buffer():
    logits = np.random.default_rng(0).standard_normal((2, 3, 7)).astype(np.float32)
    _, cache = cross_entropy.forward(logits, np.zeros((2, 3), dtype=np.int64))
    dlogits = cross_entropy.backward(1.0, cache)
    assert np.shares_memory(dlogits, logits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_are_stable(dtype):
    logits = np.array([[[1e4, 0.0, -1e4], [-3e4, 3e4, 3e4]]], dtype=dtype)
    targets = np.array([[0, 1]])
    loss, cache = cross_entropy.forward(logits.copy(), targets)
    dlogits = cross_entropy.backward(2.0, cache)
    # row 0 is certain and right (loss 0); row 1 splits 50/50 (loss log 2).
    # float32 holds 3e4 + log 2 only to its ulp there, 2e-3.
    atol = 1e-12 if dtype == np.float64 else 4e-3
    np.testing.assert_allclose(float(loss), np.log(2) / 2, rtol=0, atol=atol)
    expected = np.array([[[0, 0, 0], [0, -0.5, 0.5]]]) * 2.0 / 2
    np.testing.assert_allclose(dlogits, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("B,T,V", SHAPES)
def test_cross_entropy_finite_differences(B, T, V):
    rng = np.random.default_rng(1)
    logits = randn(rng, (B, T, V), np.float64)
    targets = rng.integers(0, V, (B, T))

    def loss(logits):
        return float(cross_entropy.forward(logits.copy(), targets)[0])

    _, cache = cross_entropy.forward(logits.copy(), targets)
    directional_fd_check(loss, [logits], [cross_entropy.backward(1.0, cache)], rng)


@pytest.mark.parametrize("B,T,V", SHAPES)
@pytest.mark.parametrize("chunk_elements", [cross_entropy.CHUNK_ELEMENTS, 7])
def test_reference_equals_fast(B, T, V, chunk_elements, monkeypatch):
    from tests.helpers import assert_same_as_reference

    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(5)
    logits, targets = rng.standard_normal((B, T, V)) * 4, rng.integers(0, V, (B, T))
    loss, cache = cross_entropy.forward(logits.copy(), targets)
    assert_same_as_reference(loss, cross_entropy.reference_forward(logits, targets), "forward")
    assert_same_as_reference(cross_entropy.backward(0.7, cache),
                             cross_entropy.reference_backward(0.7, logits, targets), "backward")
