"""Causal multi-head self-attention, the part between c_attn and c_proj.

Key: B batch, T time, C channels, NH heads, hs head size (C = NH * hs).
The input is c_attn's output, qkv: (B, T, 3C), holding q, k and v side by side;
the output y: (B, T, C) goes on to c_proj.

Per head, with S the scores, P their row softmax and Y the output:
    S = q @ k.T / sqrt(hs)            (T, T), S[i, j] = -inf for j > i (causal)
    P = softmax(S)  along each row:   E = exp(S - rowmax(S)),  P = E / rowsum(E)
    Y = P @ v                         (T, hs)

Derivation (per head; i is a query row, j a key row).
    Y = P @ v is a matrix product:     dv = P.T @ dY,  dP = dY @ v.T
    P = softmax(S), one row at a time: d P[i, a] / d S[i, b] = P[i, a] (delta_ab - P[i, b]),
        the Jacobian diag(p) - p p^T of the row p = P[i]. Applied to the row dp = dP[i]:
        dS[i] = (diag(p) - p p^T) dp = p * dp - p (p . dp), that is
    dS[i, j] = P[i, j] * (dP[i, j] - D[i]),  D[i] = sum_j P[i, j] dP[i, j]
        so the T x T Jacobian of each row is never built: one dot product per row.
    The row max gets no gradient: subtracting a constant c from a row multiplies E's
        row and its sum by the same exp(-c), so P does not depend on c at all; the max
        is there only so that exp() cannot overflow.
    The mask adds a constant (0 or -inf): the gradient passes through, and where it is
        -inf, P is 0 and so is dS.
    S = q @ k.T / sqrt(hs) is a product again:
    dq = dS @ k / sqrt(hs)
    dk = dS.T @ q / sqrt(hs)

`reference_forward` and `reference_backward` below compute exactly this, all heads at
once, with the full (B, NH, T, T) matrices. The faster `forward` and `backward` after
them compute the same numbers tile by tile, never holding P (flash attention).
"""
import math

from ..backend import array_module

from ..cpu import blas_threads, parallel_map

# ---- the lesson: the formula and its derivative, plainly -------------------------------


def _to_heads(a, n_head):
    """(B, T, C) -> (B, NH, T, hs): head h is channels [h*hs, (h+1)*hs)"""
    B, T, C = a.shape
    return a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)  # (B, NH, T, hs)


def _split_heads(qkv, n_head):
    """qkv: (B, T, 3C) -> q, k, v: each (B, NH, T, hs)"""
    C = qkv.shape[-1] // 3
    return [_to_heads(qkv[..., i * C : (i + 1) * C], n_head) for i in range(3)]  # q, k, v


def _merge_heads(a):
    """(B, NH, T, hs) -> (B, T, C), the heads side by side"""
    B, NH, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)  # (B, T, C)


def reference_forward(qkv, n_head):
    """qkv: (B, T, 3C)  ->  y: (B, T, C). Builds the full (B, NH, T, T) matrices."""
    xp = array_module(qkv)
    T = qkv.shape[1]
    q, k, v = _split_heads(qkv, n_head)  # each (B, NH, T, hs)
    hs = q.shape[-1]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(hs)  # (B, NH, T, T)
    s = s + xp.triu(xp.full((T, T), -xp.inf, dtype=qkv.dtype), 1)  # causal: no key after the query
    e = xp.exp(s - s.max(axis=-1, keepdims=True))  # the row max keeps exp() <= 1
    p = e / e.sum(axis=-1, keepdims=True)  # softmax along each row
    yh = p @ v  # (B, NH, T, hs)
    y = _merge_heads(yh)  # (B, T, C)
    return y


def reference_backward(dy, qkv, n_head):
    """dy: (B, T, C)  ->  dqkv: (B, T, 3C)"""
    xp = array_module(qkv)
    T = qkv.shape[1]
    q, k, v = _split_heads(qkv, n_head)  # recomputed, as in the forward
    hs = q.shape[-1]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(hs)
    s = s + xp.triu(xp.full((T, T), -xp.inf, dtype=qkv.dtype), 1)
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    # forward: y = _merge_heads(yh)
    dyh = _to_heads(dy, n_head)  # (B, NH, T, hs)
    # forward: yh = p @ v
    dp = dyh @ v.swapaxes(-1, -2)  # (B, NH, T, T)
    dv = p.swapaxes(-1, -2) @ dyh  # (B, NH, T, hs)
    # forward: p = e / e.sum(axis=-1, keepdims=True)
    # forward: e = xp.exp(s - s.max(axis=-1, keepdims=True))
    #   together p = softmax(s) along each row, whose Jacobian is diag(p) - p p^T:
    #   ds = p * dp - p * sum(p * dp), one dot product per row instead of a T x T matrix.
    #   The max gets no gradient: e and e.sum are scaled alike by exp(-max), so p does not
    #   depend on it (it only keeps exp() <= 1).
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))  # (B, NH, T, T)
    # forward: s = s + mask            (p is 0 where masked, so ds is 0 there too)
    # forward: s = q @ k.swapaxes(-1, -2) / math.sqrt(hs)
    dq = ds @ k / math.sqrt(hs)  # (B, NH, T, hs)
    dk = ds.swapaxes(-1, -2) @ q / math.sqrt(hs)  # (B, NH, T, hs)
    # forward: q, k, v = _split_heads(qkv, n_head)
    dqkv = xp.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)  # (B, T, 3C)
    return dqkv


# ---- the same arithmetic, scheduled for speed ----------------------------------------------
# What differs from the lesson: query tiles that skip the masked keys, P recomputed
# from the saved logsumexp instead of kept (flash attention's trade), D = rowsum(P*dP)
# taken as dY . Y, each head's matmuls on in-place views of qkv, and score tiles held
# transposed (St, keys down the rows) because BLAS runs that shape faster: below,
# the softmax runs down columns and P.T @ dY is St @ dY.
#
# Memory and work. The (B, NH, T, T) matrix P is never stored. Forward keeps the
# per-row logsumexp L = log(sum_j exp(S[i, j])) and backward recomputes
# P = exp(S - L) tile by tile, as flash attention does. The softmax backward's row
# term has a cheap form: D[i] = sum_j P[i,j] (dY[i] . v[j]) = dY[i] . Y[i], a
# (B, NH, T) array from two arrays that already exist. The queries are taken in
# tiles of `TILE`; a tile [t0, t1) only looks at keys [0, t1), so the masked upper
# triangle is (almost all) skipped, and only the diagonal block needs a mask.
# Each tile holds every key a query may see, so its softmax is exact in one pass.
# (A GPU kernel tiles over keys too, with an online softmax; that tiling gets its
# own NumPy mirror beside the kernel.)
#
# Speed on the CPU. Each head is worked on separately, with 2-D matmuls on views
# of qkv: the head's q, k and v are (T, hs) column slices of qkv whose rows are 3C
# apart, a layout BLAS reads in place, so nothing is copied. A tile of scores is held
# *transposed*, St = S[t0:t1, :t1].T with the keys down the rows, (t1, tq): with
# hs = 64, BLAS multiplies k (t1, 64) @ q_tile.T (64, tq) about 30% faster than
# q_tile (tq, 64) @ k.T (64, t1), and every product of the backward comes out
# tall-and-thin the same way. The formulas of the lesson then read with the axes
# swapped: the softmax runs down each column (axis 0), and P.T @ dY is St @ dY.
#
# On the GPU (head size 64) this formula runs as the flash attention kernels in
# nanogpt_np/kernels/attention.cu, tested against this file.

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
    thread (see cpu.parallel_map): splitting a (T, 64) @ (64, 128) product over
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
