"""Token plus position embedding (GPT-2's wte and wpe): x[b, t] = wte[idx[b, t]] + wpe[t].

Key: B batch, T time, C channels, V vocab. wpe has block_size rows; the first T
are used.

Derivation. Each output row is the sum of one row of wte and one row of wpe, so
the gradient of each is dx routed back to the row it came from:
    dwte[v] = sum over (b, t) with idx[b, t] == v of dx[b, t]
    dwpe[t] = sum over b of dx[b, t]
A token that appears twice gets both contributions, which is why dwte is a
scatter-add rather than a plain assignment. There is no gradient for idx: the token
ids are integers that pick rows, not learned values, so backward returns only dwte
and dwpe (dx, its input, is the gradient arriving at x).

`reference_forward` and `reference_backward` below are this in NumPy; the faster
`forward` and `backward` after them compute the same numbers.
"""
from ..backend import array_module
from ..cpu import scatter_add_rows

# ---- the lesson: the formula and its derivative, plainly -------------------------------


def reference_forward(idx, wte, wpe):
    """idx: (B, T) ints  wte: (V, C)  wpe: (block_size, C)  ->  x: (B, T, C)"""
    T = idx.shape[1]
    tok = wte[idx]  # (B, T, C): row idx[b, t] of wte
    pos = wpe[:T]  # (T, C)
    x = tok + pos  # pos is broadcast over B
    return x


def reference_backward(dx, idx, wte, wpe):
    """dx: (B, T, C)  ->  dwte: (V, C), dwpe: (block_size, C)"""
    xp = array_module(dx)
    T = idx.shape[1]
    # forward: x = tok + pos           (pos was broadcast over B: sum over B)
    dtok = dx  # (B, T, C)
    dpos = dx.sum(axis=0)  # (T, C)
    # forward: pos = wpe[:T]
    dwpe = xp.zeros(wpe.shape, dtype=dx.dtype)
    dwpe[:T] = dpos
    # forward: tok = wte[idx]          (a token used twice gets both gradients: add.at
    #                                   adds once per occurrence, where dwte[idx] += dtok
    #                                   would keep only one of them)
    dwte = xp.zeros(wte.shape, dtype=dx.dtype)
    xp.add.at(dwte, idx, dtok)
    return dwte, dwpe


# ---- the same arithmetic, scheduled for speed ----------------------------------------------
# What differs from the lesson: the gradients are added into the model's own buffers
# (dwte already holds lm_head's gradient, since the weight is tied), and the scatter-add
# runs as a sort-and-sum over rows (cpu.scatter_add_rows), much faster than add.at.


def forward(idx, wte, wpe):
    """idx: (B, T) ints  wte: (V, C)  wpe: (block_size, C)  ->  x: (B, T, C)"""
    T = idx.shape[1]
    x = wte[idx]  # (B, T, C), a gather of rows
    x += wpe[:T]  # broadcast over B
    cache = (idx, wte.shape, wpe.shape)
    return x, cache


def backward(dx, cache, dwte=None, dwpe=None):
    """dx: (B, T, C)  ->  dwte: (V, C), dwpe: (block_size, C)

    When `dwte` or `dwpe` arrays are given, the gradients are added into them
    instead of into fresh zeros. The model passes its gradient buffers: wte is
    shared with lm_head, and adding in place avoids a second (V, C) array.
    """
    xp = array_module(dx)
    idx, wte_shape, wpe_shape = cache
    B, T, C = dx.shape
    if dwte is None:
        dwte = xp.zeros(wte_shape, dtype=dx.dtype)
    if dwpe is None:
        dwpe = xp.zeros(wpe_shape, dtype=dx.dtype)
    # forward: x += wpe[:T]
    dwpe[:T] += dx.sum(axis=0)
    # forward: x = wte[idx]   (reference_backward's add.at, as a sort-and-sum)
    scatter_add_rows(dwte, idx.reshape(-1), dx.reshape(B * T, C))
    return dwte, dwpe
