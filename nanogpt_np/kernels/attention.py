"""Causal self-attention through attention.cu (flash attention), with the
interface of nanogpt_np/layers/attention.py.

What runs where:
  - head size 64 (GPT-2's), float32 or float64: the fused kernels. Forward keeps
    only the per-row logsumexp; backward recomputes the scores tile by tile. No
    (B, NH, T, T) array exists at any point. Any T up to block_size works.
  - head size 64, bf16: the same algorithm on tensor cores (attention_mma.cu),
    float32 accumulation and softmax, a float32 logsumexp, in FlashAttention-2's
    design (cp.async, ldmatrix, 128-row forward tiles, one backward pass per key
    block with an atomic float32 dq). NANOGPT_BF16_ATTENTION picks another path
    for comparison: "mma" (the first tensor-core kernels: 64-row tiles, a dq pass
    and a dk/dv pass) or "simt" (the float32 kernels, widened, then rounded back).
  - any other head size or dtype: the NumPy-formula layer (layers/attention.py),
    run on the same CuPy arrays. It is exact but materialises (B, NH, 128, T) score
    tiles and runs many small batched matmuls, so it is much slower.
`uses_kernel(qkv, n_head)` says which path a call takes.

The tile sizes below are template arguments of the kernels, so this file, the
launch configuration and the NumPy mirror (flash_reference.py) share them.
"""
import contextlib
import math
import os

import numpy as np

from ..backend import array_module, data_pointer, is_bfloat16
from ..layers import attention as formula
from . import fused
from .loader import KernelFile, ceil_div, ctype, kernel_array, scalar

HEAD_SIZES = (64,)  # head sizes with a kernel instantiation
FWD_BLOCK_Q = 64  # query rows per block (one thread each) in forward and in backward's dq pass
FWD_BLOCK_K = 32  # key rows per shared-memory tile there
BWD_BLOCK_KV = 64  # key rows per block in backward's dk/dv pass (two threads each)
BWD_BLOCK_Q = 32  # query rows per shared-memory tile there

_FLASH, _FORMULA, _WIDENED, _MMA, _FA2 = "flash", "formula", "widened", "mma", "fa2"


def _names():
    for t in ("float", "double"):
        for hs in HEAD_SIZES:
            yield f"flash_attention_forward<{t}, {hs}, {FWD_BLOCK_Q}, {FWD_BLOCK_K}>"
            yield f"flash_attention_backward_dq<{t}, {hs}, {FWD_BLOCK_Q}, {FWD_BLOCK_K}>"
            yield f"flash_attention_backward_dkdv<{t}, {hs}, {BWD_BLOCK_KV}, {BWD_BLOCK_Q}>"


_cu = KernelFile("attention.cu", list(_names()))

# bf16 on tensor cores (attention_mma.cu): head size 64, tiles of 64 rows, 4 warps
MMA_HEAD_SIZE = 64
MMA_TILE = 64  # rows per block and per tile of the other side; flash_reference mirrors it
MMA_THREADS = 128  # = MMA_WARPS * 32 in the .cu, whose tile loads assume exactly this many threads
# FlashAttention-2's design in the same file: 128 query rows per forward block (8
# warps), 64 keys per backward block (4 warps) walking query tiles of 32 rows
FA2_ROWS, FA2_KEYS, FA2_QUERIES = 128, 64, 32
FA2_FWD_THREADS, FA2_BWD_THREADS = 256, 128
FA2_DOT_ROWS = 8  # rows per block (one warp each) of the D = dy . y kernel
FA2_SUM_THREADS = 128  # column pairs per block of the dq store that also sums dqkv's columns
_mma = KernelFile("attention_mma.cu", [f"flash_attention_mma_{part}<{MMA_HEAD_SIZE}>"
                                       for part in ("forward", "backward_dq", "backward_dkdv")]
                  + [f"flash_attention_fa2_{part}<{MMA_HEAD_SIZE}>"
                     for part in ("forward", "backward_dot", "backward", "backward_dq_store", "backward_dq_store_sums")]
                  + ["mma_layout_check"])
LOG2E = 1.4426950408889634
BF16_PATH_ENV = "NANOGPT_BF16_ATTENTION"  # "fa2" (default), "mma" (the first tensor-core kernels) or "simt"
BF16_PATHS = ("fa2", "mma", "simt")


@contextlib.contextmanager
def bf16_path(path):
    """Within the block, bf16 attention takes `path` (one of BF16_PATHS; None: as set);
    the variable is restored after, so old and new kernels can be compared in one run."""
    previous = os.environ.get(BF16_PATH_ENV)
    if path:
        os.environ[BF16_PATH_ENV] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BF16_PATH_ENV, None)
        else:
            os.environ[BF16_PATH_ENV] = previous


def uses_kernel(qkv, n_head):
    """True when forward(qkv, n_head) runs the flash kernels, False for the formula layer."""
    hs = qkv.shape[-1] // 3 // n_head
    return hs in HEAD_SIZES and (np.dtype(qkv.dtype) in (np.float32, np.float64) or is_bfloat16(qkv.dtype))


def path_of(cache):
    """Which implementation made this cache: 'flash' (the float32/float64 kernels),
    'fa2' (bf16 on tensor cores, FlashAttention-2's design), 'mma' (the first bf16
    tensor-core kernels, NANOGPT_BF16_ATTENTION=mma), 'formula' (layers/attention.py),
    or 'widened' (bf16 through the float32 kernels: other head sizes, or
    NANOGPT_BF16_ATTENTION=simt)."""
    return cache[0]


def lse_of(cache):
    """The per-row logsumexp (B, NH, T) that the forward behind `cache` kept."""
    if cache[0] == _WIDENED:
        return lse_of(cache[1])
    return cache[1][2] if cache[0] == _FORMULA else cache[3]


def forward(qkv, n_head):
    """qkv: (B, T, 3C)  ->  y: (B, T, C)"""
    if is_bfloat16(qkv.dtype):
        hs = qkv.shape[-1] // 3 // n_head
        path = os.environ.get(BF16_PATH_ENV, "fa2")
        if path not in BF16_PATHS:
            raise ValueError(f"{BF16_PATH_ENV}={path!r}: use one of {', '.join(BF16_PATHS)}")
        if hs == MMA_HEAD_SIZE and path in (_FA2, _MMA):
            return _forward_tensor_cores(qkv, n_head, path)
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


def _aligned16(a, xp):
    """`a`, copied if it starts off a 16-byte boundary: the tensor-core kernels
    move tiles 16 bytes at a time (a fresh array is always aligned; a view into
    the middle of one may not be)."""
    return a if data_pointer(a) % 16 == 0 else xp.array(a, copy=True)


def _forward_tensor_cores(qkv, n_head, path):
    """bf16 qkv -> bf16 y on tensor cores, by the first mma kernel (path _MMA: 64 query
    rows per block) or FlashAttention-2's (_FA2: 128 rows); the cache keeps lse in float32."""
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    qkv = _aligned16(kernel_array(qkv, qkv.dtype, xp), xp)
    y = xp.empty((B, T, C), dtype=qkv.dtype)
    lse = xp.empty((B, n_head, T), dtype=np.float32)
    kernel, rows, threads = {_MMA: ("mma_forward", MMA_TILE, MMA_THREADS),
                             _FA2: ("fa2_forward", FA2_ROWS, FA2_FWD_THREADS)}[path]
    _mma.launch(
        f"flash_attention_{kernel}<{MMA_HEAD_SIZE}>", (B * n_head, ceil_div(T, rows)), (threads,),
        (qkv, y, lse, np.int32(T), np.int32(n_head), np.float32(LOG2E / math.sqrt(MMA_HEAD_SIZE))),
    )
    return y, (path, qkv, y, lse, n_head)


def _backward_mma(dy, cache):
    _, qkv, y, lse, n_head = cache
    xp = array_module(dy)
    B, T, C = y.shape
    dy = _aligned16(kernel_array(dy, qkv.dtype, xp), xp)  # qkv and y: aligned by forward
    scale = 1.0 / math.sqrt(MMA_HEAD_SIZE)
    dqkv = xp.empty_like(qkv)  # q part written by the dq pass, k and v parts by the dk/dv pass
    D = xp.empty((B, n_head, T), dtype=np.float32)  # dy . y per row, from the dq pass
    grid = (B * n_head, ceil_div(T, MMA_TILE))
    scales = (np.float32(scale), np.float32(scale * LOG2E))
    _mma.launch(f"flash_attention_mma_backward_dq<{MMA_HEAD_SIZE}>", grid, (MMA_THREADS,),
                (qkv, y, dy, lse, D, dqkv, np.int32(T), np.int32(n_head)) + scales)
    _mma.launch(f"flash_attention_mma_backward_dkdv<{MMA_HEAD_SIZE}>", grid, (MMA_THREADS,),
                (qkv, dy, lse, D, dqkv, np.int32(T), np.int32(n_head)) + scales)
    return dqkv


def _backward_fa2(dy, cache, part):
    """FlashAttention-2's backward: D = dy . y (and dq's float32 sums zeroed), one
    pass over key blocks (dk, dv; dq by atomicAdd), dq rounded into dqkv; with part,
    that last kernel also writes dqkv's column partial sums (_store_dq_and_sums)."""
    _, qkv, y, lse, n_head = cache
    xp = array_module(dy)
    B, T, C = y.shape
    dy = _aligned16(kernel_array(dy, qkv.dtype, xp), xp)
    scale = 1.0 / math.sqrt(MMA_HEAD_SIZE)
    dqkv = xp.empty_like(qkv)  # q part by the dq store, k and v parts by the main pass
    D = xp.empty((B, n_head, T), dtype=np.float32)
    dq_sum = xp.empty((B, n_head, T, MMA_HEAD_SIZE), dtype=np.float32)  # zeroed by the dot kernel
    rows = B * T * n_head
    _mma.launch(f"flash_attention_fa2_backward_dot<{MMA_HEAD_SIZE}>", (ceil_div(rows, FA2_DOT_ROWS),), (256,),
                (y, dy, D, dq_sum, np.int32(T), np.int32(n_head), np.int32(rows)))
    _mma.launch(f"flash_attention_fa2_backward<{MMA_HEAD_SIZE}>", (B * n_head, ceil_div(T, FA2_KEYS)),
                (FA2_BWD_THREADS,), (qkv, dy, lse, D, dq_sum, dqkv, np.int32(T), np.int32(n_head),
                                     np.float32(scale), np.float32(scale * LOG2E)))
    if part is not None:
        _store_dq_and_sums(dq_sum, dqkv, part, n_head)
        return dqkv
    pairs = rows * MMA_HEAD_SIZE // 2
    _mma.launch(f"flash_attention_fa2_backward_dq_store<{MMA_HEAD_SIZE}>", (min(ceil_div(pairs, 256), 4096),), (256,),
                (dq_sum, dqkv, np.int32(T), np.int32(n_head), np.int64(pairs)))
    return dqkv


def _store_dq_and_sums(dq_sum, dqkv, part, n_head):
    """dq_sum (B, NH, T, hs) float32 rounded into dqkv's q part, and dqkv (B, T, 3C)
    summed over rows as fused.column_sums sums it, into part=(array, stride):

        dqkv[:, :, :C] = dq_sum.transpose(0, 2, 1, 3).reshape(B, T, C).astype(bf16)
        rows = dqkv.reshape(-1, 3 * C).astype(float32)      # N = B * T rows
        for k in range(n_chunks):                            # fused._chunks(N)
            array[k * stride : k * stride + 3 * C] = rows[k * rows_per_chunk : (k + 1) * rows_per_chunk].sum(0)

    each column's rows added in order from 0.0 in float32, as column_sums does: the
    same bits, and one launch fewer (no pass that reads dqkv back)."""
    B, T, C3 = dqkv.shape
    N = B * T
    rows_per_chunk, n_chunks = fused._chunks(N)
    array, stride = part
    _mma.launch(f"flash_attention_fa2_backward_dq_store_sums<{MMA_HEAD_SIZE}>",
                (ceil_div(C3 // 2, FA2_SUM_THREADS), n_chunks), (FA2_SUM_THREADS,),
                (dq_sum, dqkv, array, np.int32(T), np.int32(n_head), np.int32(N), np.int32(rows_per_chunk),
                 np.int32(stride)))


def mma_layout_check(a, b):
    """D = a @ b for a (16, 16) and b (16, 8) bf16 arrays through one tensor-core
    mma, filled by the fragment layout the attention kernels assume -> (16, 8) float32."""
    xp = array_module(a)
    d = xp.empty((16, 8), dtype=np.float32)
    _mma.launch("mma_layout_check", (1,), (32,), (kernel_array(a, a.dtype, xp), kernel_array(b, b.dtype, xp), d))
    return d


def _forward_widened(qkv, n_head):
    """bf16 qkv through the float32 kernels: widen, attend, round y back to bf16."""
    y, cache = forward(fused.cast(qkv, np.float32), n_head)
    return fused.cast(y, qkv.dtype), (_WIDENED, cache, qkv.dtype)


def backward(dy, cache, part=None):
    """dy: (B, T, C)  ->  dqkv: (B, T, 3C)

    part=(array, stride): dqkv's column partial sums (fused.column_sums' layout, a
    slot of reduce.Partials: the bias gradient of the c_attn that made qkv) are
    written there too: by FlashAttention-2's last kernel on the way (the bf16 path),
    by fused.column_sums after the others."""
    if cache[0] == _FA2:
        return _backward_fa2(dy, cache, part)
    dqkv = _backward_unfused(dy, cache)
    if part is not None:
        fused.column_sums(dqkv, part=part)
    return dqkv


def _backward_unfused(dy, cache):
    """backward on every path but FlashAttention-2's: dqkv alone."""
    if cache[0] == _MMA:
        return _backward_mma(dy, cache)
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
