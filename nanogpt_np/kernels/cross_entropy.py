"""Softmax + cross-entropy through cross_entropy.cu, with the interface of
nanogpt_np/layers/cross_entropy.py.

Forward reads each row of logits once (an online logsumexp) and keeps only the
per-row logsumexp; backward reads the row once more and writes dlogits over the
logits, as the formula layer does. Neither allocates anything of the logits' size.
"""
import numpy as np

from ..backend import array_module
from .loader import KernelFile, ctype, kernel_array, scalar

_cu = KernelFile(
    "cross_entropy.cu", [f"cross_entropy_{part}<{t}>" for part in ("forward", "backward") for t in ("float", "double")]
)
THREADS = 256  # per row; a 50304-wide row is ~200 values per thread


def forward(logits, targets):
    """logits: (B, T, V)  targets: (B, T) ints  ->  loss: 0-d array, cache"""
    xp = array_module(logits)
    V = logits.shape[-1]
    logits2 = kernel_array(logits, logits.dtype, xp).reshape(-1, V)  # (N, V)
    targets1 = kernel_array(targets.reshape(-1), np.int32, xp)  # (N,) int32, as the kernel reads it
    N = logits2.shape[0]
    lse = xp.empty(N, dtype=logits.dtype)  # (N,)
    losses = xp.empty(N, dtype=logits.dtype)  # (N,)
    _cu.launch(
        f"cross_entropy_forward<{ctype(logits.dtype)}>", (N,), (THREADS,),
        (logits2, targets1, lse, losses, np.int32(V)),
    )
    cache = (logits2.reshape(logits.shape), targets1, lse)
    return losses.mean(), cache


def backward(dloss, cache):
    """dloss: scalar  ->  dlogits: (B, T, V), written into the logits buffer"""
    logits, targets1, lse = cache
    V = logits.shape[-1]
    dlogits2 = logits.reshape(-1, V)  # (N, V), the same memory as logits
    N = dlogits2.shape[0]
    _cu.launch(
        f"cross_entropy_backward<{ctype(logits.dtype)}>", (N,), (THREADS,),
        (dlogits2, targets1, lse, np.int32(V), scalar(float(dloss) / N, logits.dtype)),
    )
    return dlogits2.reshape(logits.shape)
