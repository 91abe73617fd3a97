"""Fused softmax + cross-entropy, averaged over every position.

Key: B batch, T time, V vocab; N = B*T rows.

    loss = mean over n of ( logsumexp(logits[n]) - logits[n, targets[n]] )

Derivation. For one row, with p = softmax(logits[n]):
    d/dlogits[n, v] ( logsumexp(logits[n]) - logits[n, y] ) = p[v] - [v == y]
and the mean over N rows divides by N:
    dlogits = (softmax(logits) - onehot(targets)) / N        (times dloss)
Fusing the two layers is what makes this cheap: the softmax's own Jacobian is a
V x V matrix per row, but composed with the log and the one-hot target it
collapses to a subtraction.

Stability: logsumexp subtracts the row max before exp(), so large logits cannot
overflow; backward computes exp(logits - logsumexp) <= 1 for the same reason. The
max gets no gradient: it is subtracted inside the log and added back outside it, so
the loss does not depend on it.

`reference_forward` and `reference_backward` below are this in NumPy; the faster
`forward` and `backward` after them compute the same numbers. Note that `backward`
writes dlogits into the logits array: callers that want the logits copy them first.
"""
from ..backend import array_module, on_cpu
from ..cpu import map_chunks

# ---- the lesson: the formula and its derivative, plainly -------------------------------


def reference_forward(logits, targets):
    """logits: (B, T, V)  targets: (B, T) ints  ->  loss: 0-d array"""
    xp = array_module(logits)
    V = logits.shape[-1]
    logits2 = logits.reshape(-1, V)  # (N, V)
    targets1 = targets.reshape(-1)  # (N,)
    N = logits2.shape[0]
    row_max = logits2.max(axis=1, keepdims=True)  # (N, 1), so that exp() cannot overflow
    lse = xp.log(xp.exp(logits2 - row_max).sum(axis=1)) + row_max[:, 0]  # (N,) logsumexp
    losses = lse - logits2[xp.arange(N), targets1]  # (N,)
    loss = losses.mean()
    return loss


def reference_backward(dloss, logits, targets):
    """dloss: scalar  ->  dlogits: (B, T, V), a new array"""
    xp = array_module(logits)
    V = logits.shape[-1]
    logits2 = logits.reshape(-1, V)  # (N, V)
    targets1 = targets.reshape(-1)  # (N,)
    N = logits2.shape[0]
    row_max = logits2.max(axis=1, keepdims=True)  # recomputed, as in the forward
    lse = xp.log(xp.exp(logits2 - row_max).sum(axis=1)) + row_max[:, 0]
    # forward: loss = losses.mean()
    dlosses = xp.full(N, dloss / N, dtype=logits.dtype)  # (N,)
    # forward: losses = lse - logits2[xp.arange(N), targets1]
    dlse = dlosses
    dlogits2 = xp.zeros_like(logits2)  # (N, V)
    dlogits2[xp.arange(N), targets1] -= dlosses  # one target per row: no index repeats
    # forward: lse = log(sum(exp(logits2 - row_max))) + row_max
    #   d lse / d logits2 = exp(logits2 - lse) = softmax; row_max's two terms cancel
    softmax = xp.exp(logits2 - lse[:, None])  # (N, V)
    dlogits2 = dlogits2 + dlse[:, None] * softmax
    return dlogits2.reshape(logits.shape)  # (B, T, V)


# ---- the same arithmetic, scheduled for speed ----------------------------------------------
# What differs from the lesson: rows in cache-sized chunks shared among threads,
# only the logsumexp kept, and backward writing dlogits *into the logits buffer*
# (softmax recomputed there, the scale applied while the chunk is in the cache), so
# two (B, T, V) arrays never exist at once.
#
# Why. The logits are the largest array in GPT-2 (B*T x 50257). Two copies must
# never be alive at once, so
#   - forward walks the rows in chunks: exp() needs a temporary, and a chunk of rows
#     keeps that temporary small;
#   - forward keeps only the per-row logsumexp (a cheap statistic), not the softmax;
#   - backward writes dlogits *into the logits buffer*, recomputing softmax there.
# After backward the logits array holds dlogits. A chunk of CHUNK_ELEMENTS values
# stays in the cache, so of the passes each chunk needs (max, subtract, exp, sum;
# subtract, exp, scale) only the first reads main memory; the chunks are shared among
# the CPU threads (cpu.map_chunks).
# On the GPU this formula runs as nanogpt_np/kernels/cross_entropy.cu, tested against this file.

CHUNK_ELEMENTS = 1 << 18  # values per chunk (1 MB in float32), at least one row


def _rows_per_chunk(N, V, xp):
    """CHUNK_ELEMENTS worth of rows (at least one) on the CPU; all N on a GPU."""
    return max(1, CHUNK_ELEMENTS // V) if on_cpu(xp) else N


def forward(logits, targets):
    """logits: (B, T, V)  targets: (B, T) ints  ->  loss: 0-d array, cache"""
    xp = array_module(logits)
    V = logits.shape[-1]
    logits2 = logits.reshape(-1, V)  # (N, V)
    targets1 = targets.reshape(-1)  # (N,)
    N = logits2.shape[0]
    lse = xp.empty(N, dtype=logits.dtype)  # (N,)

    def rows(start, stop):
        chunk = logits2[start:stop]  # (n, V)
        row_max = chunk.max(axis=1, keepdims=True)  # (n, 1)
        shifted = chunk - row_max  # the one temporary, (n, V)
        xp.exp(shifted, out=shifted)
        lse[start:stop] = xp.log(shifted.sum(axis=1)) + row_max[:, 0]

    map_chunks(rows, N, _rows_per_chunk(N, V, xp))
    target_logits = logits2[xp.arange(N), targets1]  # (N,)
    losses = lse - target_logits  # (N,)
    loss = losses.mean()
    cache = (logits, targets, lse)
    return loss, cache


def backward(dloss, cache):
    """dloss: scalar  ->  dlogits: (B, T, V), written into the logits buffer"""
    xp = array_module(cache[0])
    logits, targets, lse = cache
    V = logits.shape[-1]
    dlogits2 = logits.reshape(-1, V)  # (N, V), the same memory as logits
    N = dlogits2.shape[0]
    scale = dloss / N

    def rows(start, stop):
        chunk = dlogits2[start:stop]
        # forward: lse = log(sum(exp(logits)))  ->  softmax = exp(logits - lse)
        chunk -= lse[start:stop, None]
        xp.exp(chunk, out=chunk)
        # forward: loss = mean over N rows  (scaled while the chunk is in cache)
        chunk *= scale

    map_chunks(rows, N, _rows_per_chunk(N, V, xp))
    # forward: loss_n = lse_n - logits[n, targets[n]]
    dlogits2[xp.arange(N), targets.reshape(-1)] -= scale
    return dlogits2.reshape(logits.shape)
