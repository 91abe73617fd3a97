"""Causal self-attention through attention.cu (flash attention), with the
interface of nanogpt_np/layers/attention.py.

What runs where:
  - head size 64 (GPT-2's), float32 or float64: the fused kernels. Forward keeps
    only the per-row logsumexp; backward recomputes the scores tile by tile. No
    (B, NH, T, T) array exists at any point. Any T up to block_size works.
  - any other head size or dtype: the NumPy-formula layer (layers/attention.py),
    run on the same CuPy arrays. It is exact but materialises (B, NH, 128, T) score
    tiles and runs many small batched matmuls, so it is much slower.
`uses_kernel(qkv, n_head)` says which path a call takes.

The tile sizes below are template arguments of the kernels, so this file, the
launch configuration and the NumPy mirror (flash_reference.py) share them.
"""
import math

import numpy as np

from ..backend import array_module, is_bfloat16
from ..layers import attention as formula
from . import fused
from .loader import KernelFile, ceil_div, ctype, kernel_array, scalar

HEAD_SIZES = (64,)  # head sizes with a kernel instantiation
FWD_BLOCK_Q = 64  # query rows per block (one thread each) in forward and in backward's dq pass
FWD_BLOCK_K = 32  # key rows per shared-memory tile there
BWD_BLOCK_KV = 64  # key rows per block in backward's dk/dv pass (two threads each)
BWD_BLOCK_Q = 32  # query rows per shared-memory tile there

_FLASH, _FORMULA, _WIDENED = "flash", "formula", "widened"


def _names():
    for t in ("float", "double"):
        for hs in HEAD_SIZES:
            yield f"flash_attention_forward<{t}, {hs}, {FWD_BLOCK_Q}, {FWD_BLOCK_K}>"
            yield f"flash_attention_backward_dq<{t}, {hs}, {FWD_BLOCK_Q}, {FWD_BLOCK_K}>"
            yield f"flash_attention_backward_dkdv<{t}, {hs}, {BWD_BLOCK_KV}, {BWD_BLOCK_Q}>"


_cu = KernelFile("attention.cu", list(_names()))


def uses_kernel(qkv, n_head):
    """True when forward(qkv, n_head) runs the flash kernels, False for the formula layer."""
    hs = qkv.shape[-1] // 3 // n_head
    return hs in HEAD_SIZES and (np.dtype(qkv.dtype) in (np.float32, np.float64) or is_bfloat16(qkv.dtype))


def path_of(cache):
    """Which implementation made this cache: 'flash' (the float32/float64 kernels),
    'formula' (layers/attention.py), or 'widened' (bf16 through the float32 kernels)."""
    return cache[0]


def forward(qkv, n_head):
    """qkv: (B, T, 3C)  ->  y: (B, T, C)"""
    if is_bfloat16(qkv.dtype):
        return _forward_widened(qkv, n_head)
    if not uses_kernel(qkv, n_head):
        y, cache = formula.forward(qkv, n_head)
        return y, (_FORMULA, cache)
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    qkv = kernel_array(qkv, qkv.dtype, xp)
    y = xp.empty((B, T, C), dtype=qkv.dtype)
    lse = xp.empty((B, n_head, T), dtype=qkv.dtype)
    t = ctype(qkv.dtype)
    _cu.launch(
        f"flash_attention_forward<{t}, {hs}, {FWD_BLOCK_Q}, {FWD_BLOCK_K}>",
        (B * n_head, ceil_div(T, FWD_BLOCK_Q)), (FWD_BLOCK_Q,),
        (qkv, y, lse, np.int32(T), np.int32(n_head), scalar(1.0 / math.sqrt(hs), qkv.dtype)),
    )
    # as in the formula layer: qkv and y are kept by c_attn and c_proj anyway
    return y, (_FLASH, qkv, y, lse, n_head)


def _forward_widened(qkv, n_head):
    """bf16 qkv through the float32 kernels: widen, attend, round y back to bf16."""
    y, cache = forward(fused.cast(qkv, np.float32), n_head)
    return fused.cast(y, qkv.dtype), (_WIDENED, cache, qkv.dtype)


def backward(dy, cache):
    """dy: (B, T, C)  ->  dqkv: (B, T, 3C)"""
    if cache[0] == _WIDENED:
        _, inner, dtype = cache
        return fused.cast(backward(fused.cast(dy, np.float32), inner), dtype)
    if cache[0] == _FORMULA:
        return formula.backward(dy, cache[1])
    _, qkv, y, lse, n_head = cache
    xp = array_module(dy)
    B, T, C = y.shape
    hs = C // n_head
    t = ctype(qkv.dtype)
    dy = kernel_array(dy, qkv.dtype, xp)
    scale = scalar(1.0 / math.sqrt(hs), qkv.dtype)
    dqkv = xp.empty_like(qkv)  # every element is written: q part by dq, k and v parts by dkdv
    D = xp.empty((B, n_head, T), dtype=qkv.dtype)  # dy . y per row, written by the dq pass
    _cu.launch(
        f"flash_attention_backward_dq<{t}, {hs}, {FWD_BLOCK_Q}, {FWD_BLOCK_K}>",
        (B * n_head, ceil_div(T, FWD_BLOCK_Q)), (FWD_BLOCK_Q,),
        (qkv, y, dy, lse, D, dqkv, np.int32(T), np.int32(n_head), scale),
    )
    _cu.launch(
        f"flash_attention_backward_dkdv<{t}, {hs}, {BWD_BLOCK_KV}, {BWD_BLOCK_Q}>",
        (B * n_head, ceil_div(T, BWD_BLOCK_KV)), (2 * BWD_BLOCK_KV,),
        (qkv, dy, lse, D, dqkv, np.int32(T), np.int32(n_head), scale),
    )
    return dqkv
