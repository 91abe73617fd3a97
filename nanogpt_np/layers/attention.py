"""Causal multi-head self-attention, the part between c_attn and c_proj.

Key: B batch, T time, C channels, NH heads, hs head size (C = NH * hs).
The input is c_attn's output, qkv: (B, T, 3C), holding q, k and v side by side;
the output y: (B, T, C) goes on to c_proj.

Per head, with S the scores, P their row softmax and Y the output:
    S = q @ k.T / sqrt(hs)            (T, T), S[i, j] = -inf for j > i (causal)
    P = softmax(S)  along each row
    Y = P @ v                         (T, hs)
`reference_forward` below computes exactly this, all heads at once, for reading
and for the tests; `forward` and `backward` compute the same thing tile by tile.

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

Speed on the CPU. Each head is worked on separately, with 2-D matmuls on views
of qkv: the head's q, k and v are (T, hs) column slices of qkv whose rows are 3C
apart, a layout BLAS reads in place, so nothing is copied or transposed. One
tile's scores, TILE x T floats, then stay in the core's cache while the max,
exp, sum and the backward's products pass over them.
"""
import math

from ..backend import array_module, blas_threads, parallel_map

TILE = 128  # query rows per tile: the masked work skipped grows as tiles shrink,
# while a tile's score block (TILE x T floats) should stay within the L2 cache


def _tiles(T, tile):
    for t0 in range(0, T, tile):
        yield t0, min(T, t0 + tile)


def _future_mask(xp, tile, dtype):
    """(tile, tile): 0 on and below the diagonal, -inf above (keys after the query)."""
    return xp.triu(xp.full((tile, tile), -xp.inf, dtype=dtype), 1)


def _scores(q, k, t0, t1, mask):
    """Scores of query rows [t0, t1) against keys [0, t1), future keys at -inf.

    q: (T, hs) already scaled by 1/sqrt(hs)  k: (T, hs)  ->  s: (t1 - t0, t1)
    """
    s = q[t0:t1] @ k[:t1].T  # (tq, t1); BLAS reads k.T as a transposed operand
    tq = t1 - t0
    s[:, t0:t1] += mask[:tq, :tq]  # only the diagonal block sees the future
    return s


def _by_head(work, B, n_head):
    """work(b, h) for every batch row and head. Heads are independent, so they are
    shared out among the CPU threads, each running its small matmuls on one BLAS
    thread (see backend.parallel_map): splitting a (128, 64) @ (64, T) product over
    cores costs more than it gains."""
    with blas_threads(1):  # also when there is one thread, or one head
        parallel_map(lambda bh: work(*bh), [(b, h) for b in range(B) for h in range(n_head)])


def forward(qkv, n_head, tile=TILE):
    """qkv: (B, T, 3C)  ->  y: (B, T, C)"""
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    mask = _future_mask(xp, min(tile, T), qkv.dtype)
    y = xp.empty((B, T, C), dtype=qkv.dtype)  # heads side by side, as c_proj wants them
    lse = xp.empty((B, n_head, T), dtype=qkv.dtype)

    def head(b, h):
        cols = slice(h * hs, (h + 1) * hs)
        # (T, hs) views of qkv, rows 3C apart: BLAS reads them in place
        q, k, v = (qkv[b, :, part:][:, cols] for part in (0, C, 2 * C))
        q = q * scale  # (T, hs): scale q once instead of every score tile
        for t0, t1 in _tiles(T, tile):
            p = _scores(q, k, t0, t1, mask)  # (tq, t1), still S here
            row_max = p.max(axis=1, keepdims=True)  # (tq, 1)
            p -= row_max
            xp.exp(p, out=p)  # unnormalised P; the max keeps exp() <= 1
            row_sum = p.sum(axis=1, keepdims=True)  # (tq, 1)
            y_tile = p @ v[:t1]  # (tq, hs)
            y_tile /= row_sum
            y[b, t0:t1, cols] = y_tile
            xp.log(row_sum, out=row_sum)
            row_sum += row_max
            lse[b, h, t0:t1] = row_sum[:, 0]

    _by_head(head, B, n_head)
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
    mask = _future_mask(xp, min(tile, T), dy.dtype)
    # D[i] = dY[i] . Y[i], the softmax backward's per-row term
    D = (dy * y).reshape(B, T, n_head, hs).sum(axis=-1)  # (B, T, NH)
    dqkv = xp.empty((B, T, 3 * C), dtype=dy.dtype)

    def head(b, h):
        cols = slice(h * hs, (h + 1) * hs)
        q, k, v = (qkv[b, :, part:][:, cols] for part in (0, C, 2 * C))  # (T, hs) views
        dq, dk, dv = (dqkv[b, :, part:][:, cols] for part in (0, C, 2 * C))
        dk[...] = 0  # dk and dv gather a term from every query tile
        dv[...] = 0
        q = q * scale  # (T, hs), as in forward
        dy_h = dy[b, :, cols]  # (T, hs)
        for t0, t1 in _tiles(T, tile):
            # forward: P = softmax(S), recomputed from the saved logsumexp
            p = _scores(q, k, t0, t1, mask)  # (tq, t1)
            p -= lse[b, h, t0:t1, None]
            xp.exp(p, out=p)
            dy_tile = dy_h[t0:t1]  # (tq, hs)
            # forward: Y = P @ v
            dv[:t1] += p.T @ dy_tile
            ds = dy_tile @ v[:t1].T  # dP, (tq, t1)
            # forward: P = softmax(S)  ->  dS = P * (dP - D)
            ds -= D[b, t0:t1, h, None]
            ds *= p
            # forward: S = (q / sqrt(hs)) @ k.T   (q here already carries the scale)
            dq[t0:t1] = ds @ k[:t1]
            dk[:t1] += ds.T @ q[t0:t1]
        dq *= scale

    _by_head(head, B, n_head)
    return dqkv


def reference_forward(qkv, n_head):
    """The formula in the docstring, untiled: qkv (B, T, 3C) -> y (B, T, C).

    Builds the full (B, NH, T, T) score matrix, so it is for reading and for
    checking the tiled forward, not for training.
    """
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = (qkv[:, :, i * C : (i + 1) * C].reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
               for i in range(3))  # each (B, NH, T, hs)
    s = q @ k.swapaxes(-1, -2) / math.sqrt(hs)  # (B, NH, T, T)
    s = s + _future_mask(xp, T, qkv.dtype)
    p = xp.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
