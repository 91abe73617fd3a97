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

Memory. The logits are the largest array in GPT-2 (B*T x 50257). Two copies must
never be alive at once, so
  - forward walks the rows in chunks: exp() needs a temporary, and a chunk of rows
    keeps that temporary small;
  - forward keeps only the per-row logsumexp (a cheap statistic), not the softmax;
  - backward writes dlogits *into the logits buffer*, recomputing softmax there.
After backward the logits array holds dlogits; callers that want logits must copy
them first.
Stability: logsumexp subtracts the row max before exp(), so large logits cannot
overflow; backward computes exp(logits - logsumexp) <= 1 for the same reason.

On the GPU this formula runs as nanogpt_np/kernels/cross_entropy.cu, tested against this file.
"""
from ..backend import array_module

CHUNK_ELEMENTS = 1 << 22  # ~4M values per temporary (16 MB in float32)


def _row_chunks(N, V):
    step = max(1, CHUNK_ELEMENTS // V)
    for start in range(0, N, step):
        yield start, min(N, start + step)


def forward(logits, targets):
    """logits: (B, T, V)  targets: (B, T) ints  ->  loss: 0-d array, cache"""
    xp = array_module(logits)
    V = logits.shape[-1]
    logits2 = logits.reshape(-1, V)  # (N, V)
    targets1 = targets.reshape(-1)  # (N,)
    N = logits2.shape[0]
    lse = xp.empty(N, dtype=logits.dtype)  # (N,)
    for start, stop in _row_chunks(N, V):
        rows = logits2[start:stop]  # (n, V)
        row_max = rows.max(axis=1, keepdims=True)  # (n, 1)
        shifted = rows - row_max  # the one temporary, (n, V)
        xp.exp(shifted, out=shifted)
        lse[start:stop] = xp.log(shifted.sum(axis=1)) + row_max[:, 0]
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
    for start, stop in _row_chunks(N, V):
        rows = dlogits2[start:stop]
        # forward: lse = log(sum(exp(logits)))  ->  softmax = exp(logits - lse)
        rows -= lse[start:stop, None]
        xp.exp(rows, out=rows)
    # forward: loss_n = lse_n - logits[n, targets[n]]
    dlogits2[xp.arange(N), targets.reshape(-1)] -= 1.0
    # forward: loss = mean over N rows
    dlogits2 *= scale
    return dlogits2.reshape(logits.shape)
