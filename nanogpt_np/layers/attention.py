"""Causal multi-head self-attention, the part between c_attn and c_proj.

Key: B batch, T time, C channels, NH heads, hs head size (C = NH * hs).
The input is c_attn's output, qkv: (B, T, 3C), holding q, k and v side by side;
the output y: (B, T, C) goes on to c_proj.

Per head, with S the scores, P their row softmax and Y the output:
    S = q @ k.T / sqrt(hs)            (T, T), S[i, j] = -inf for j > i (causal)
    P = softmax(S)  along each row
    Y = P @ v                         (T, hs)

Derivation (per head; i is a query row, j a key row):
    dv = P.T @ dY
    dP = dY @ v.T
    dS[i, j] = P[i, j] * (dP[i, j] - D[i]),  D[i] = sum_j P[i, j] dP[i, j]
    dq = dS @ k / sqrt(hs)
    dk = dS.T @ q / sqrt(hs)
The softmax backward's row term has a cheap form: D[i] = sum_j P[i,j] (dY[i] . v[j])
= dY[i] . Y[i], an (B, NH, T) array from two arrays that already exist.

Memory and work. The (B, NH, T, T) matrix P is never stored. Forward keeps the
per-row logsumexp L = log(sum_j exp(S[i, j])) and backward recomputes
P = exp(S - L) tile by tile, as flash attention does. The query rows are taken in
tiles of `TILE`; a tile [t0, t1) only looks at keys [0, t1), so the masked upper
triangle is (almost all) skipped, and only the diagonal block needs a mask.
Each tile holds a whole key row, so its softmax is exact in one pass. (A GPU
kernel tiles over keys too, with an online softmax; that tiling gets its own NumPy
mirror beside the kernel.)

On the GPU (head size 64) this formula runs as the flash attention kernels in
nanogpt_np/kernels/attention.cu, tested against this file.
"""
import math

from ..backend import array_module

TILE = 128  # query rows per tile; the masked work skipped grows as tiles shrink


def _split_heads(qkv, n_head):
    """qkv: (B, T, 3C) -> q, k, v: each (B, NH, T, hs), contiguous copies.

    Always a copy (not ascontiguousarray, which returns a view when the transpose
    happens to be contiguous): callers scale q in place.
    """
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    qkv5 = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4).copy()  # (3, B, NH, T, hs)
    return qkv5[0], qkv5[1], qkv5[2]


def _causal_scores(q, k, t0, t1):
    """Scores of query rows [t0, t1) against keys [0, t1), future keys at -inf.

    q: (B, NH, T, hs) already scaled by 1/sqrt(hs)  k: (B, NH, T, hs)
    -> s: (B, NH, t1 - t0, t1)
    """
    xp = array_module(q)
    s = q[:, :, t0:t1] @ k[:, :, :t1].swapaxes(-1, -2)  # (B, NH, tq, t1)
    tq = t1 - t0
    # Only the diagonal block [t0:t1, t0:t1] holds keys in the future of a query.
    future = xp.triu(xp.full((tq, tq), -xp.inf, dtype=s.dtype), 1)  # (tq, tq)
    s[..., t0:t1] += future
    return s


def _tiles(T, tile):
    for t0 in range(0, T, tile):
        yield t0, min(T, t0 + tile)


def forward(qkv, n_head, tile=TILE):
    """qkv: (B, T, 3C)  ->  y: (B, T, C)"""
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = _split_heads(qkv, n_head)  # each (B, NH, T, hs)
    q *= 1.0 / math.sqrt(hs)  # scale q once instead of every score tile
    y = xp.empty((B, n_head, T, hs), dtype=qkv.dtype)
    lse = xp.empty((B, n_head, T), dtype=qkv.dtype)
    for t0, t1 in _tiles(T, tile):
        p = _causal_scores(q, k, t0, t1)  # (B, NH, tq, t1), still S here
        row_max = p.max(axis=-1, keepdims=True)  # (B, NH, tq, 1)
        p -= row_max
        xp.exp(p, out=p)  # unnormalised P; the max keeps exp() <= 1
        row_sum = p.sum(axis=-1, keepdims=True)  # (B, NH, tq, 1)
        y_tile = p @ v[:, :, :t1]  # (B, NH, tq, hs)
        y_tile /= row_sum
        y[:, :, t0:t1] = y_tile
        lse[:, :, t0:t1] = (xp.log(row_sum) + row_max)[..., 0]
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C), heads side by side
    # qkv is c_attn's output and y is c_proj's input: both are kept for those
    # layers anyway, so the cache adds only lse, (B, NH, T).
    cache = (qkv, y, lse, n_head, tile)
    return y, cache


def backward(dy, cache):
    """dy: (B, T, C)  ->  dqkv: (B, T, 3C)"""
    xp = array_module(dy)
    qkv, y, lse, n_head, tile = cache
    B, T, C = y.shape
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    q, k, v = _split_heads(qkv, n_head)  # each (B, NH, T, hs), recomputed
    q *= scale
    dy4 = xp.ascontiguousarray(dy.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3))  # (B, NH, T, hs)
    # D[i] = dY[i] . Y[i], the softmax backward's per-row term
    D = (dy * y).reshape(B, T, n_head, hs).sum(axis=-1).transpose(0, 2, 1)  # (B, NH, T)
    dqkv5 = xp.zeros((3, B, n_head, T, hs), dtype=dy.dtype)
    dq, dk, dv = dqkv5[0], dqkv5[1], dqkv5[2]  # each (B, NH, T, hs)
    for t0, t1 in _tiles(T, tile):
        # forward: P = softmax(S), recomputed from the saved logsumexp
        p = _causal_scores(q, k, t0, t1)  # (B, NH, tq, t1)
        p -= lse[:, :, t0:t1, None]
        xp.exp(p, out=p)
        dy_tile = dy4[:, :, t0:t1]  # (B, NH, tq, hs)
        # forward: Y = P @ v
        dv[:, :, :t1] += p.swapaxes(-1, -2) @ dy_tile
        ds = dy_tile @ v[:, :, :t1].swapaxes(-1, -2)  # dP, (B, NH, tq, t1)
        # forward: P = softmax(S)  ->  dS = P * (dP - D)
        ds -= D[:, :, t0:t1, None]
        ds *= p
        # forward: S = (q / sqrt(hs)) @ k.T   (q here already carries the scale)
        dq[:, :, t0:t1] = ds @ k[:, :, :t1]
        dk[:, :, :t1] += ds.swapaxes(-1, -2) @ q[:, :, t0:t1]
    dq *= scale
    dqkv = dqkv5.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)  # (B, T, 3C)
    return dqkv
