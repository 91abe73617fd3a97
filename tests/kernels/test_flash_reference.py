"""The NumPy mirror of the flash attention kernels' tiling against plain attention."""
import numpy as np
import pytest

from nanogpt_np.kernels import flash_reference
from nanogpt_np.layers import attention
from tests.helpers import DTYPES, assert_close, randn

SHAPES = [  # B, T, NH, hs
    (1, 1, 1, 64),  # T=1
    (2, 7, 2, 64),  # shorter than one tile
    (1, 64, 1, 64),  # exactly one forward tile
    (2, 65, 2, 64),  # one row into a second tile
    (1, 150, 3, 16),  # several tiles, ragged last one, another head size
    (3, 33, 1, 8),
]
SMALL_TILES = dict(block_q=5, block_k=3, block_kv=7, block_q_bwd=4)  # many boundaries, none aligned


def _run(B, T, NH, hs, dtype, tiles):
    rng = np.random.default_rng(T * 7 + NH)
    qkv = randn(rng, (B, T, 3 * NH * hs), dtype, scale=1.5)
    dy = randn(rng, (B, T, NH * hs), dtype)
    fwd = {k: v for k, v in tiles.items() if k in ("block_q", "block_k")}
    y, cache = flash_reference.forward(qkv, NH, **fwd)
    dqkv = flash_reference.backward(dy, cache, **tiles)
    y_ref, cache_ref = attention.forward(qkv, NH)
    dqkv_ref = attention.backward(dy, cache_ref)
    return (y, cache[2], dqkv), (y_ref, cache_ref[2], dqkv_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,NH,hs", SHAPES)
@pytest.mark.parametrize("tiles", [{}, SMALL_TILES], ids=["kernel_tiles", "small_tiles"])
def test_flash_mirror_matches_plain_attention(B, T, NH, hs, dtype, tiles):
    (y, lse, dqkv), (y_ref, lse_ref, dqkv_ref) = _run(B, T, NH, hs, dtype, tiles)
    assert y.dtype == dtype and dqkv.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(lse, lse_ref, dtype, "lse")
    assert_close(dqkv, dqkv_ref, dtype, "dqkv", factor=10)


def test_online_softmax_rescales_when_later_keys_score_higher():
    """Scores that grow along the keys force a rescale at every tile; a missing or
    wrong alpha would show up as a large error here."""
    T, hs = 40, 64
    qkv = np.zeros((1, T, 3 * hs))
    qkv[0, :, :hs] = 1.0  # q
    qkv[0, :, hs : 2 * hs] = np.linspace(0, 3, T)[:, None]  # k: score grows with j
    qkv[0, :, 2 * hs :] = np.random.default_rng(0).standard_normal((T, hs))
    y, cache = flash_reference.forward(qkv, 1, block_q=8, block_k=3)
    y_ref, cache_ref = attention.forward(qkv, 1)
    assert_close(y, y_ref, np.float64, "y")
    dy = np.ones((1, T, hs))
    assert_close(flash_reference.backward(dy, cache, 8, 3, 5, 4), attention.backward(dy, cache_ref), np.float64, "dqkv")
