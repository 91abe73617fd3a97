import math

import numpy as np
import pytest

from nanogpt_np.layers import attention
from tests.helpers import DTYPES, assert_close, directional_fd_check, needs_torch, randn, to_torch

SHAPES = [  # B, T, NH, hs
    (2, 5, 2, 4),
    (1, 1, 1, 8),  # T=1, one head, B=1
    (3, 7, 1, 16),  # odd T, one head
    (2, 9, 3, 4),
    (1, 33, 2, 8),
]
TILES = [attention.TILE, 4, 3]  # one tile, and several with a ragged last one


def torch_attention(qkv, n_head):
    torch = needs_torch()
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.split(C, dim=2)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, C)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,NH,hs", SHAPES)
@pytest.mark.parametrize("tile", TILES)
def test_attention_matches_torch(B, T, NH, hs, tile, dtype):
    rng = np.random.default_rng(0)
    C = NH * hs
    qkv = randn(rng, (B, T, 3 * C), dtype)
    dy = randn(rng, (B, T, C), dtype)

    y, cache = attention.forward(qkv, NH, tile=tile)
    dqkv = attention.backward(dy, cache)

    qkv_t = to_torch(qkv, True)
    y_t = torch_attention(qkv_t, NH)
    y_t.backward(to_torch(dy))

    assert y.shape == (B, T, C) and y.dtype == dtype and dqkv.dtype == dtype
    assert_close(y, y_t.detach().numpy(), dtype, "y")
    assert_close(dqkv, qkv_t.grad.numpy(), dtype, "dqkv", factor=10)


def test_attention_keeps_logsumexp_not_the_score_matrix():
    B, T, NH, hs = 2, 6, 2, 4
    qkv = np.random.default_rng(0).standard_normal((B, T, 3 * NH * hs))
    y, (qkv_cached, y_cached, lse, n_head, tile) = attention.forward(qkv, NH)
    assert qkv_cached is qkv and y_cached is y
    assert lse.shape == (B, NH, T)
    # row 0 attends only to itself: its logsumexp is its own score
    q0, k0 = qkv[:, 0, : NH * hs], qkv[:, 0, NH * hs : 2 * NH * hs]
    own = (q0.reshape(B, NH, hs) * k0.reshape(B, NH, hs)).sum(-1) / math.sqrt(hs)
    np.testing.assert_allclose(lse[:, :, 0], own, rtol=1e-12)


def test_attention_is_causal():
    """Changing a later token must not change any earlier output."""
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((1, 10, 12))
    y1, _ = attention.forward(qkv, 2, tile=3)
    qkv[:, 6:] += rng.standard_normal((1, 4, 12))
    y2, _ = attention.forward(qkv, 2, tile=3)
    np.testing.assert_array_equal(y1[:, :6], y2[:, :6])
    assert not np.allclose(y1[:, 6:], y2[:, 6:])


def test_attention_large_scores_are_stable():
    qkv = np.zeros((1, 4, 6), dtype=np.float32)
    qkv[..., :2] = 300.0  # q
    qkv[..., 2:4] = 300.0  # k: scores of 300*300*2/sqrt(2) overflow exp() unless shifted
    qkv[..., 4:] = np.arange(8, dtype=np.float32).reshape(1, 4, 2)
    y, cache = attention.forward(qkv, 1)
    dqkv = attention.backward(np.ones((1, 4, 2), np.float32), cache)
    assert np.isfinite(y).all() and np.isfinite(dqkv).all()


@pytest.mark.parametrize("B,T,NH,hs", SHAPES)
def test_attention_finite_differences(B, T, NH, hs):
    rng = np.random.default_rng(1)
    qkv = randn(rng, (B, T, 3 * NH * hs), np.float64)
    R = randn(rng, (B, T, NH * hs), np.float64)

    def loss(qkv):
        return float(np.sum(attention.forward(qkv, NH, tile=4)[0] * R))

    _, cache = attention.forward(qkv, NH, tile=4)
    directional_fd_check(loss, [qkv], [attention.backward(R, cache)], rng)


@pytest.mark.parametrize("B,T,NH,hs", SHAPES)
def test_attention_leaves_its_inputs_alone(B, T, NH, hs):
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((B, T, 3 * NH * hs))
    dy = rng.standard_normal((B, T, NH * hs))
    qkv0, dy0 = qkv.copy(), dy.copy()
    _, cache = attention.forward(qkv, NH)
    attention.backward(dy, cache)
    np.testing.assert_array_equal(qkv, qkv0)
    np.testing.assert_array_equal(dy, dy0)


@pytest.mark.parametrize("B,T,NH,hs", SHAPES)
@pytest.mark.parametrize("tile", TILES)
def test_tiled_forward_equals_the_readable_formula(B, T, NH, hs, tile):
    qkv = np.random.default_rng(3).standard_normal((B, T, 3 * NH * hs))
    y, _ = attention.forward(qkv, NH, tile=tile)
    np.testing.assert_allclose(y, attention.reference_forward(qkv, NH), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B,T,NH,hs", SHAPES)
@pytest.mark.parametrize("tile", [attention.TILE, 3])
def test_reference_equals_fast(B, T, NH, hs, tile):
    from tests.helpers import assert_same_as_reference

    rng = np.random.default_rng(5)
    qkv, dy = rng.standard_normal((B, T, 3 * NH * hs)), rng.standard_normal((B, T, NH * hs))
    y, cache = attention.forward(qkv, NH, tile=tile)
    assert_same_as_reference(y, attention.reference_forward(qkv, NH), "forward")
    assert_same_as_reference(attention.backward(dy, cache), attention.reference_backward(dy, qkv, NH), "backward")
