"""Softmax + cross-entropy through cross_entropy.cu, with the interface of
nanogpt_np/layers/cross_entropy.py.

Forward reads each row of logits once (an online logsumexp) and keeps only the
per-row logsumexp; backward reads the row once more and writes dlogits over the
logits, as the formula layer does. Neither allocates anything of the logits' size.

A training step, whose backward always follows its forward, calls forward_backward
instead: both in one launch, the same losses and dlogits bit for bit (formula:
reference_forward_backward below), dlogits written over the logits at once. The
logits are then never seen by anyone, so evaluation and sampling, which return
them, keep the separate forward.

bf16 logits (the mixed-precision path) are read and widened to float32: the
logsumexp, the loss and the gradient are float32 arithmetic, and dlogits is
rounded to bf16 as it is written back. Keeping the logits in bf16 rather than
float32 halves the largest array of the model (B*T x 50304: 1.6 GB instead of
3.3 GB at B=16, T=1024) and the bytes both passes move; the rounding of the
logits (a relative 2^-9) is the same one PyTorch's autocast applies.
"""
import numpy as np

from ..backend import array_module
from ..layers import cross_entropy as formula
from .loader import KernelFile, accumulate_dtype, ctype, kernel_array, scalar

_cu = KernelFile(
    "cross_entropy.cu",
    [f"cross_entropy_{part}<{t}>" for part in ("forward", "backward", "forward_backward")
     for t in ("float", "double", "bf16")],
)
THREADS = 256  # per row; a 50304-wide row is ~200 values per thread


def forward(logits, targets):
    """logits: (B, T, V)  targets: (B, T) ints  ->  loss: 0-d array, cache"""
    losses, cache = forward_losses(logits, targets)
    return losses.mean(), cache


def _rows(logits, targets, xp):
    """logits: (B, T, V)  targets: (B, T)  ->  logits2: (N, V) (the same memory when
    already contiguous), targets1: (N,) int32, as the kernels read them"""
    V = logits.shape[-1]
    logits2 = kernel_array(logits, logits.dtype, xp).reshape(-1, V)  # (N, V)
    targets1 = kernel_array(targets.reshape(-1), np.int32, xp)  # (N,)
    return logits2, targets1


def forward_losses(logits, targets):
    """logits: (B, T, V)  targets: (B, T) ints  ->  losses: (N,) per position, cache
    (the training step reduces them on the device: kernels/reduce.loss_mean)"""
    xp = array_module(logits)
    logits2, targets1 = _rows(logits, targets, xp)  # (N, V), (N,)
    N, V = logits2.shape
    acc = accumulate_dtype(logits.dtype)  # bf16 logits: softmax and loss in float32
    lse = xp.empty(N, dtype=acc)  # (N,)
    losses = xp.empty(N, dtype=acc)  # (N,)
    _cu.launch(
        f"cross_entropy_forward<{ctype(logits.dtype)}>", (N,), (THREADS,),
        (logits2, targets1, lse, losses, np.int32(V)),
    )
    cache = (logits2.reshape(logits.shape), targets1, lse)
    return losses, cache


def backward(dloss, cache):
    """dloss: scalar  ->  dlogits: (B, T, V), written into the logits buffer"""
    logits, targets1, lse = cache
    V = logits.shape[-1]
    dlogits2 = logits.reshape(-1, V)  # (N, V), the same memory as logits
    N = dlogits2.shape[0]
    _cu.launch(
        f"cross_entropy_backward<{ctype(logits.dtype)}>", (N,), (THREADS,),
        (dlogits2, targets1, lse, np.int32(V), scalar(float(dloss) / N, lse.dtype)),
    )
    return dlogits2.reshape(logits.shape)


def reference_forward_backward(dloss, logits, targets):
    """What forward_backward computes, in plain NumPy: the formula layer's forward with
    the per-position losses kept, and its backward.
    logits: (B, T, V)  targets: (B, T) ints  dloss: scalar
    ->  losses: (N,), dlogits: (B, T, V), a new array"""
    xp = array_module(logits)
    V = logits.shape[-1]
    logits2 = logits.reshape(-1, V)  # (N, V)
    targets1 = targets.reshape(-1)  # (N,)
    row_max = logits2.max(axis=1, keepdims=True)  # (N, 1), so that exp() cannot overflow
    lse = xp.log(xp.exp(logits2 - row_max).sum(axis=1)) + row_max[:, 0]  # (N,)
    losses = lse - logits2[xp.arange(logits2.shape[0]), targets1]  # (N,)
    # dlogits = (softmax(logits) - onehot(targets)) * dloss / N
    return losses, formula.reference_backward(dloss, logits, targets)


def forward_backward(logits, targets, dloss):
    """forward_losses, then backward(dloss, cache), in one launch, for a training step
    (its backward always follows): the same losses and dlogits, bit for bit.
    logits: (B, T, V)  targets: (B, T) ints  dloss: scalar
    ->  losses: (N,) per position, dlogits: (B, T, V) written over the logits
    (afterwards the logits are gone: evaluation calls forward_losses)"""
    xp = array_module(logits)
    logits2, targets1 = _rows(logits, targets, xp)  # (N, V), (N,)
    N, V = logits2.shape
    acc = accumulate_dtype(logits.dtype)  # bf16 logits: softmax, loss and gradient in float32
    losses = xp.empty(N, dtype=acc)  # (N,)
    _cu.launch(
        f"cross_entropy_forward_backward<{ctype(logits.dtype)}>", (N,), (THREADS,),
        (logits2, targets1, losses, np.int32(V), scalar(float(dloss) / N, acc)),
    )
    return losses, logits2.reshape(logits.shape)
