"""Causal multi-head self-attention, the part between c_attn and c_proj.

Key: B batch, T time, C channels, NH heads, hs head size (C = NH * hs).
The input is c_attn's output, qkv: (B, T, 3C), holding q, k and v side by side;
the output y: (B, T, C) goes on to c_proj.

Per head, with S the scores, P their row softmax and Y the output:
    S = q @ k.T / sqrt(hs)            (T, T), S[i, j] = -inf for j > i (causal)
    P = softmax(S)  along each row
    Y = P @ v                         (T, hs)
`reference_forward` at the end computes exactly this, all heads at once, for
reading and for the tests; `forward` and `backward` compute the same thing tile
by tile.

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
P = exp(S - L) tile by tile, as flash attention does. The queries are taken in
tiles of `TILE`; a tile [t0, t1) only looks at keys [0, t1), so the masked upper
triangle is (almost all) skipped, and only the diagonal block needs a mask.
Each tile holds every key a query may see, so its softmax is exact in one pass.
(A GPU kernel tiles over keys too, with an online softmax; that tiling gets its
own NumPy mirror beside the kernel.)

Speed on the CPU. Each head is worked on separately, with 2-D matmuls on views
of qkv: the head's q, k and v are (T, hs) column slices of qkv whose rows are 3C
apart, a layout BLAS reads in place, so nothing is copied. A tile of scores is held
*transposed*, St = S[t0:t1, :t1].T with the keys down the rows, (t1, tq): with
hs = 64, BLAS multiplies k (t1, 64) @ q_tile.T (64, tq) about 30% faster than
q_tile (tq, 64) @ k.T (64, t1), and every product of the backward comes out
tall-and-thin the same way. The formulas above then read with the axes swapped:
the softmax runs down each column (axis 0), and P.T @ dY is St @ dY.

On the GPU (head size 64) this formula runs as the flash attention kernels in
nanogpt_np/kernels/attention.cu, tested against this file.
"""
import math

from ..backend import array_module, blas_threads, parallel_map

TILE = 128  # queries per tile: the masked work skipped grows as tiles shrink, while
# the matmuls get slower; a tile's scores (T x TILE floats) stay in the L2 cache


def _tiles(T, tile):
    for t0 in range(0, T, tile):
        yield t0, min(T, t0 + tile)


def _future_mask_t(xp, tile, dtype):
    """(tile, tile), keys down the rows: -inf below the diagonal (a key after the
    query), 0 on and above it. The transpose of S's causal mask."""
    return xp.tril(xp.full((tile, tile), -xp.inf, dtype=dtype), -1)


def _scores_t(q, k, t0, t1, mask_t):
    """Scores of queries [t0, t1) against keys [0, t1), transposed; future keys at -inf.

    q: (T, hs) already scaled by 1/sqrt(hs)  k: (T, hs)  ->  st: (t1, t1 - t0)
    """
    st = k[:t1] @ q[t0:t1].T  # (t1, tq) = S[t0:t1, :t1].T
    tq = t1 - t0
    st[t0:t1] += mask_t[:tq, :tq]  # only the diagonal block sees the future
    return st


def _by_head(work, B, n_head, xp):
    """work(b, h) for every batch row and head. Heads are independent, so they are
    shared out among the CPU threads, each running its small matmuls on one BLAS
    thread (see backend.parallel_map): splitting a (T, 64) @ (64, 128) product over
    cores costs more than it gains."""
    with blas_threads(1):  # also when there is one thread, or one head
        parallel_map(lambda bh: work(*bh), [(b, h) for b in range(B) for h in range(n_head)], xp)


def forward(qkv, n_head, tile=TILE):
    """qkv: (B, T, 3C)  ->  y: (B, T, C)"""
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    mask_t = _future_mask_t(xp, min(tile, T), qkv.dtype)
    y = xp.empty((B, T, C), dtype=qkv.dtype)  # heads side by side, as c_proj wants them
    lse = xp.empty((B, n_head, T), dtype=qkv.dtype)

    def head(b, h):
        cols = slice(h * hs, (h + 1) * hs)
        # (T, hs) views of qkv, rows 3C apart: BLAS reads them in place
        q, k, v = (qkv[b, :, part:][:, cols] for part in (0, C, 2 * C))
        q = q * scale  # (T, hs): scale q once instead of every score tile
        for t0, t1 in _tiles(T, tile):
            pt = _scores_t(q, k, t0, t1, mask_t)  # (t1, tq), still S.T here
            col_max = pt.max(axis=0)  # (tq,), each query's largest score
            pt -= col_max
            xp.exp(pt, out=pt)  # unnormalised P.T; the max keeps exp() <= 1
            col_sum = pt.sum(axis=0)  # (tq,)
            y_tile = pt.T @ v[:t1]  # (tq, hs) = P @ v
            y_tile /= col_sum[:, None]
            y[b, t0:t1, cols] = y_tile
            xp.log(col_sum, out=col_sum)
            col_sum += col_max
            lse[b, h, t0:t1] = col_sum  # L = log(sum_j exp(S)), per query

    _by_head(head, B, n_head, xp)
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
    mask_t = _future_mask_t(xp, min(tile, T), dy.dtype)
    dqkv = xp.empty((B, T, 3 * C), dtype=dy.dtype)

    def head(b, h):
        cols = slice(h * hs, (h + 1) * hs)
        q, k, v = (qkv[b, :, part:][:, cols] for part in (0, C, 2 * C))  # (T, hs) views
        q = q * scale  # (T, hs), as in forward
        dy_h = dy[b, :, cols]  # (T, hs)
        # D[i] = dY[i] . Y[i], the softmax backward's per-row term
        D = xp.einsum("td,td->t", dy_h, y[b, :, cols])  # (T,)
        dq = xp.empty((T, hs), dtype=dy.dtype)
        dk = xp.zeros((T, hs), dtype=dy.dtype)  # dk and dv gather a term from every
        dv = xp.zeros((T, hs), dtype=dy.dtype)  # query tile: contiguous, for fast adds
        for t0, t1 in _tiles(T, tile):
            # forward: P = softmax(S), recomputed from the saved logsumexp
            pt = _scores_t(q, k, t0, t1, mask_t)  # (t1, tq), P.T once exp'd
            pt -= lse[b, h, t0:t1]
            xp.exp(pt, out=pt)
            dy_tile = dy_h[t0:t1]  # (tq, hs)
            # forward: Y = P @ v  ->  dv = P.T @ dY
            dv[:t1] += pt @ dy_tile
            dst = v[:t1] @ dy_tile.T  # dP.T = (dY @ v.T).T, (t1, tq)
            # forward: P = softmax(S)  ->  dS = P * (dP - D)
            dst -= D[t0:t1]
            dst *= pt
            # forward: S = (q / sqrt(hs)) @ k.T   (q here already carries the scale)
            dq[t0:t1] = dst.T @ k[:t1]  # dS @ k
            dk[:t1] += dst @ q[t0:t1]  # dS.T @ q
        dq *= scale
        for part, grad in ((0, dq), (C, dk), (2 * C, dv)):
            dqkv[b, :, part:][:, cols] = grad

    _by_head(head, B, n_head, xp)
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
    s = s + xp.triu(xp.full((T, T), -xp.inf, dtype=qkv.dtype), 1)  # causal mask
    p = xp.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
