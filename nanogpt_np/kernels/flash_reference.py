"""attention.cu's tiling, step for step, in NumPy: the CPU-testable mirror of the
flash attention kernels.

The CUDA kernels cannot run without a GPU, but their algorithm can: this file
walks the same tiles in the same order, with the same online softmax, the same
rescaling and the same backward recomputation, vectorised over what the kernel
spreads across threads (batch, heads, and the rows of a tile). The tests check it
against plain attention (nanogpt_np/layers/attention.py), forward and backward,
on sizes that are not multiples of the tiles. The tile sizes default to the
kernels' own (kernels/attention.py passes the same constants as template arguments).

The bf16 tensor-core kernels (attention_mma.cu) walk the same tiles with every
tile size MMA_TILE = 64, and round two kinds of operand to bf16 before they are
multiplied: P before P @ v (forward) and P.T @ dy (dv), dS before dS @ k (dq) and
dS.T @ q (dk). `mma_forward` / `mma_backward` run this mirror that way (`operand`
is the rounding), in float64 otherwise, so a test can hold the emulated kernels
to it closely and the mirror itself to plain attention.

`fa2_forward` / `fa2_backward` mirror the FlashAttention-2 kernels of the same
file (the bf16 path now): forward in query blocks of FA2_ROWS over key tiles of
FA2_KEYS, which per row is the same online softmax; backward in FlashAttention-2's
order, key blocks of FA2_KEYS walking query tiles of FA2_QUERIES, dk and dv summed
per block, and each (key block, query tile)'s share of dq, scale * bf16(dS) @ k,
added into dq as the kernel's atomicAdd does.

Key: B batch, T time, C channels, NH heads, hs head size; i a query row, j a key row.
"""
import math

import numpy as np

from .attention import (BWD_BLOCK_KV, BWD_BLOCK_Q, FA2_KEYS, FA2_QUERIES, FA2_ROWS, FWD_BLOCK_K,
                        FWD_BLOCK_Q, MMA_TILE)


def _exact(a):
    return a


def _heads(a, n_head, parts):
    """(B, T, parts*C) -> (parts, B, NH, T, hs), a transposed view."""
    B, T, PC = a.shape
    return a.reshape(B, T, parts, n_head, PC // parts // n_head).transpose(2, 0, 3, 1, 4)


def _causal(rows, keys):
    """(len(rows), len(keys)) boolean: key j is visible to query i when j <= i."""
    return keys[None, :] <= rows[:, None]


def forward(qkv, n_head, block_q=FWD_BLOCK_Q, block_k=FWD_BLOCK_K, operand=_exact):
    """qkv: (B, T, 3C) -> y: (B, T, C), cache (qkv, y, lse, n_head); flash_attention_forward.
    operand(p) is what P @ v multiplies (the identity; a rounding for the bf16 kernels)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = _heads(qkv, n_head, 3)  # each (B, NH, T, hs)
    q = q * (1.0 / math.sqrt(C // n_head))  # each thread scales its q row once
    y = np.empty(q.shape, dtype=qkv.dtype)  # (B, NH, T, hs)
    lse = np.empty(q.shape[:3], dtype=qkv.dtype)  # (B, NH, T)
    for q0 in range(0, T, block_q):  # one CUDA block per (b, h) and query tile
        q1 = min(T, q0 + block_q)
        rows = np.arange(q0, q1)
        m = np.full(q.shape[:2] + (q1 - q0,), -np.inf, dtype=qkv.dtype)  # running max, (B, NH, nq)
        l = np.zeros_like(m)  # running sum of exp(s - m)
        o = np.zeros(q.shape[:2] + (q1 - q0, q.shape[-1]), dtype=qkv.dtype)  # (B, NH, nq, hs)
        for k0 in range(0, q1, block_k):  # key tiles up to the block's last row
            k1 = min(T, k0 + block_k)
            s = q[:, :, q0:q1] @ k[:, :, k0:k1].swapaxes(-1, -2)  # (B, NH, nq, nk)
            s = np.where(_causal(rows, np.arange(k0, k1)), s, -np.inf)
            m_new = np.maximum(m, s.max(axis=-1))  # finite: key 0 is in the first tile
            alpha = np.exp(m - m_new)  # rescales what the earlier tiles summed
            p = np.exp(s - m_new[..., None])  # 0 where masked
            l = l * alpha + p.sum(axis=-1)
            o = o * alpha[..., None] + operand(p) @ v[:, :, k0:k1]
            m = m_new
        y[:, :, q0:q1] = o / l[..., None]
        lse[:, :, q0:q1] = m + np.log(l)
    y = np.ascontiguousarray(y.transpose(0, 2, 1, 3)).reshape(B, T, C)  # (B, T, C)
    return y, (qkv, y, lse, n_head)


def backward(dy, cache, block_q=FWD_BLOCK_Q, block_k=FWD_BLOCK_K, block_kv=BWD_BLOCK_KV,
             block_q_bwd=BWD_BLOCK_Q, operand=_exact):
    """dy: (B, T, C) -> dqkv: (B, T, 3C); flash_attention_backward_dq, then _dkdv.
    operand(x) is applied to P and dS where they enter a product (see the top)."""
    qkv, y, lse, n_head = cache
    B, T, C = y.shape
    scale = 1.0 / math.sqrt(C // n_head)
    q, k, v = _heads(qkv, n_head, 3)  # each (B, NH, T, hs)
    q = q * scale
    (dy4,) = _heads(dy, n_head, 1)  # (B, NH, T, hs)
    dqkv = np.empty((3,) + q.shape, dtype=qkv.dtype)  # (3, B, NH, T, hs)

    # Part 1, as flash_attention_backward_dq: query tiles of block_q rows over key
    # tiles of block_k; D = dy . y is computed here and kept for part 2.
    (y4,) = _heads(y, n_head, 1)
    D = (dy4 * y4).sum(axis=-1)  # (B, NH, T)
    for q0 in range(0, T, block_q):
        q1 = min(T, q0 + block_q)
        rows = np.arange(q0, q1)
        dq = np.zeros(q.shape[:2] + (q1 - q0, q.shape[-1]), dtype=qkv.dtype)  # (B, NH, nq, hs)
        for k0 in range(0, q1, block_k):
            k1 = min(T, k0 + block_k)
            s = q[:, :, q0:q1] @ k[:, :, k0:k1].swapaxes(-1, -2)  # (B, NH, nq, nk)
            p = np.where(_causal(rows, np.arange(k0, k1)), np.exp(s - lse[:, :, q0:q1, None]), 0.0)
            dp = dy4[:, :, q0:q1] @ v[:, :, k0:k1].swapaxes(-1, -2)  # (B, NH, nq, nk)
            ds = p * (dp - D[:, :, q0:q1, None])
            dq += operand(ds) @ k[:, :, k0:k1]
        dqkv[0, :, :, q0:q1] = dq * scale

    # Part 2, as flash_attention_backward_dkdv: key blocks of block_kv rows, query
    # tiles of block_q_bwd rows from the tile holding the block's first key onward.
    for j0 in range(0, T, block_kv):
        j1 = min(T, j0 + block_kv)
        keys = np.arange(j0, j1)
        dk = np.zeros(q.shape[:2] + (j1 - j0, q.shape[-1]), dtype=qkv.dtype)  # (B, NH, nk, hs)
        dv = np.zeros_like(dk)
        for i0 in range((j0 // block_q_bwd) * block_q_bwd, T, block_q_bwd):
            i1 = min(T, i0 + block_q_bwd)
            s = q[:, :, i0:i1] @ k[:, :, j0:j1].swapaxes(-1, -2)  # (B, NH, nq, nk)
            p = np.where(_causal(np.arange(i0, i1), keys), np.exp(s - lse[:, :, i0:i1, None]), 0.0)
            dv += operand(p).swapaxes(-1, -2) @ dy4[:, :, i0:i1]
            dp = dy4[:, :, i0:i1] @ v[:, :, j0:j1].swapaxes(-1, -2)
            ds = p * (dp - D[:, :, i0:i1, None])
            dk += operand(ds).swapaxes(-1, -2) @ q[:, :, i0:i1]  # q carries the scale already
        dqkv[1, :, :, j0:j1] = dk
        dqkv[2, :, :, j0:j1] = dv
    return np.ascontiguousarray(dqkv.transpose(1, 3, 0, 2, 4)).reshape(B, T, 3 * C)  # (B, T, 3C)


def _round_bf16(a):
    """a rounded to bf16 and back to float64 (ml_dtypes rounds to nearest even, as the kernels do)."""
    from ..backend import bfloat16

    return a.astype(np.float32).astype(bfloat16()).astype(np.float64)


def mma_forward(qkv, n_head):
    """The bf16 tensor-core forward's arithmetic: qkv (bf16 values) -> y rounded to
    bf16 (as float64), cache. Tiles of MMA_TILE, P rounded before P @ v."""
    y, (qkv, _, lse, n_head) = forward(qkv.astype(np.float64), n_head, MMA_TILE, MMA_TILE, _round_bf16)
    y = _round_bf16(y)
    return y, (qkv, y, lse, n_head)


def mma_backward(dy, cache):
    """The bf16 tensor-core backward's arithmetic: dqkv rounded to bf16 (as float64).
    The dk/dv pass's query tiles start at the key block, as the kernel's do."""
    dqkv = backward(dy.astype(np.float64), cache, MMA_TILE, MMA_TILE, MMA_TILE, MMA_TILE, _round_bf16)
    return _round_bf16(dqkv)


def fa2_forward(qkv, n_head):
    """flash_attention_fa2_forward's arithmetic: qkv (bf16 values) -> y rounded to
    bf16 (as float64), cache. Query blocks of FA2_ROWS, key tiles of FA2_KEYS, P
    rounded before P @ v. (A warp skips the key tiles wholly after its rows; they
    add exactly nothing here either: p = 0, alpha = 1.)"""
    y, (qkv, _, lse, n_head) = forward(qkv.astype(np.float64), n_head, FA2_ROWS, FA2_KEYS, _round_bf16)
    y = _round_bf16(y)
    return y, (qkv, y, lse, n_head)


def fa2_backward(dy, cache):
    """flash_attention_fa2_backward's arithmetic: dy (bf16 values) -> dqkv rounded to
    bf16 (as float64). D = dy . y first; then per key block of FA2_KEYS, the query
    tiles of FA2_QUERIES from the block's first key on: dv += bf16(p^T) @ dy,
    dk += bf16(ds^T) @ q, and dq[tile] += scale * bf16(ds) @ k (the atomicAdd)."""
    qkv, y, lse, n_head = cache
    B, T, C = y.shape
    scale = 1.0 / math.sqrt(C // n_head)
    q, k, v = _heads(qkv.astype(np.float64), n_head, 3)  # each (B, NH, T, hs)
    (dy4,) = _heads(dy.astype(np.float64), n_head, 1)  # (B, NH, T, hs)
    (y4,) = _heads(y.astype(np.float64), n_head, 1)
    D = (dy4 * y4).sum(axis=-1)  # (B, NH, T), the pre-kernel
    dqkv = np.zeros((3,) + q.shape)  # (3, B, NH, T, hs); dq's part is the float32 sum buffer
    for j0 in range(0, T, FA2_KEYS):  # one CUDA block per (b, h) and key block
        j1 = min(T, j0 + FA2_KEYS)
        keys = np.arange(j0, j1)
        for i0 in range(j0, T, FA2_QUERIES):
            i1 = min(T, i0 + FA2_QUERIES)
            s = (q[:, :, i0:i1] @ k[:, :, j0:j1].swapaxes(-1, -2)) * scale  # (B, NH, nq, nk)
            p = np.where(_causal(np.arange(i0, i1), keys), np.exp(s - lse[:, :, i0:i1, None]), 0.0)
            dqkv[2, :, :, j0:j1] += _round_bf16(p).swapaxes(-1, -2) @ dy4[:, :, i0:i1]  # dv
            ds = p * (dy4[:, :, i0:i1] @ v[:, :, j0:j1].swapaxes(-1, -2) - D[:, :, i0:i1, None])
            dqkv[1, :, :, j0:j1] += _round_bf16(ds).swapaxes(-1, -2) @ q[:, :, i0:i1]  # dk, scaled at the end
            dqkv[0, :, :, i0:i1] += scale * (_round_bf16(ds) @ k[:, :, j0:j1])  # dq
    dqkv[1] *= scale
    return _round_bf16(np.ascontiguousarray(dqkv.transpose(1, 3, 0, 2, 4)).reshape(B, T, 3 * C))  # (B, T, 3C)
