"""NumPy-side speed: the CPU thread pool, cache-sized chunks, BLAS thread control,
the threaded matmul, and a fast scatter-add.

Layers call these on whatever arrays they hold. On NumPy arrays they split the
work over the CPU's cores and into cache-sized pieces; on CuPy arrays they do the
plain thing (one chunk, one thread, the library's own call), because a GPU kernel
already covers the whole array. Nothing here changes arithmetic in a way the
layers can see, except the order of a few float sums (column sums by chunk).
"""
import ctypes
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from .backend import array_module, on_cpu


def scatter_add_rows(target, indices, rows):
    """target[indices[n]] += rows[n] for every n, with repeated indices adding up.

    target: (V, C)  indices: (N,) ints  rows: (N, C)

    The readable formula is `np.add.at(target, indices, rows)`, but NumPy's add.at
    is unbuffered and slow. On the CPU we sort the rows by index and add each run
    of equal indices with one `add.reduceat`, which is vectorised. CuPy's add.at
    is a fast atomic scatter on the GPU, so it is used there as is.
    """
    xp = array_module(target, rows)
    if xp is not np:
        xp.add.at(target, indices, rows)
        return target
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    # starts of each run of equal indices in the sorted order
    is_start = np.empty(sorted_idx.shape, dtype=bool)
    is_start[:1] = True
    np.not_equal(sorted_idx[1:], sorted_idx[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    sums = np.add.reduceat(rows[order], starts, axis=0)  # (number of unique ids, C)
    target[sorted_idx[starts]] += sums
    return target


# ---- memory that stays with the process ----------------------------------------------
#
# A training step allocates the same arrays every time: hundreds of MB of activations
# in forward, freed again in backward. glibc's malloc hands freed memory at the top
# of its heap back to the kernel, and serves arrays above a size threshold with
# fresh mmap()s, so every step pays the page faults (and the kernel's zeroing) for
# all of it again: about 4% of a GPT-2 124M step on one core, more on two, since the
# faults run serially. Two malloc settings keep the memory instead. The process's
# peak resident memory does not change; it is just not given back between steps.

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_memory_kept = None


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse (Linux/glibc only; returns
    False elsewhere). Arrays up to 32 MiB, glibc's largest allowed threshold, then
    come from the reused heap; the model keeps its few bigger arrays itself.
    Set NANOGPT_NP_KEEP_MEMORY=0 to leave malloc alone."""
    global _memory_kept
    if _memory_kept is None:
        _memory_kept = False
        if os.environ.get("NANOGPT_NP_KEEP_MEMORY", "1") != "0" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                _memory_kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                                    and libc.mallopt(_M_TRIM_THRESHOLD, -1))  # -1: never trim
            except (OSError, AttributeError):  # not glibc
                pass
    return _memory_kept


# ---- cache-sized chunks -------------------------------------------------------------
#
# An elementwise formula written as NumPy expressions makes one pass over memory per
# operation. Over a large array every pass streams from main memory; over a chunk
# that fits in the core's L2 cache the later passes are nearly free. Layers therefore
# run their formulas chunk by chunk on the CPU. On a GPU the whole array is one
# chunk: its kernels are launched once over everything.

CHUNK_BYTES = 1 << 20  # per operand: big enough that one NumPy call does ~0.1 ms of
# work (threads hand the GIL back and forth between calls), small enough for L2/L3



def chunk_rows(n_rows, row_elements, itemsize, xp=np):
    """Rows per chunk so that one chunk of a (n_rows, row_elements) array is about
    CHUNK_BYTES (at least one row); all rows at once on a GPU."""
    if not on_cpu(xp):
        return max(1, n_rows)
    return max(1, CHUNK_BYTES // max(1, row_elements * itemsize))


def map_chunks(fn, n, chunk):
    """[fn(lo, hi) for consecutive [lo, hi) covering range(n)], in chunks of at most
    `chunk`, shared out among the CPU threads (see parallel_map). The chunks are
    evened out so that every thread gets the same number. fn must write only to
    its own [lo, hi) and allocate its own scratch."""
    count = -(-n // max(1, chunk))  # ceil(n / chunk)
    threads = num_threads()
    if threads > 1 and count > 1:
        count = min(n, -(-count // threads) * threads)  # a multiple of the thread count
    bounds = [(n * k // count, n * (k + 1) // count) for k in range(count)]  # sizes differ by <= 1
    return parallel_map(lambda b: fn(*b), bounds)


# ---- threads on the CPU -------------------------------------------------------------
#
# NumPy runs every operation on the calling thread, except matmuls, which OpenBLAS
# splits over threads of its own. Left like that, a 2-core CPU sits half idle through
# GELU, softmax or AdamW, and worse: after each matmul OpenBLAS's threads spin for
# about 0.1 s waiting for the next one, holding the very cores that any other work
# wants. So nanogpt_np does its own threading. Work that falls into independent
# pieces (row blocks of a matmul, chunks of an elementwise formula, heads of
# attention) runs on a small pool of Python threads; NumPy releases the GIL inside
# its loops and BLAS calls, so the pieces truly run in parallel. While they do,
# OpenBLAS is held to one thread (blas_threads), so nothing spins. The pieces write
# to disjoint slices, so no locks are needed, and results come back in order, so
# sums over them do not depend on the scheduling.

_POOL_PREFIX = "nanogpt_np-worker"
_pool = None
_pool_lock = threading.Lock()
_num_threads = None


def num_threads():
    """Threads that nanogpt_np's own CPU work uses: set_num_threads(n), else the
    NANOGPT_NP_THREADS environment variable, else the CPUs this process may use."""
    if _num_threads is not None:
        return _num_threads
    env = os.environ.get("NANOGPT_NP_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_num_threads(n):
    """Use n threads (n >= 1) for nanogpt_np's own CPU parallelism."""
    global _num_threads
    if int(n) < 1:
        raise ValueError(f"set_num_threads needs n >= 1, got {n}")
    _num_threads = int(n)


def parallel_map(fn, items, xp=np):
    """[fn(item) for item in items], with the items cut into num_threads() runs
    of neighbours, one run per thread; the calling thread takes the first run.
    BLAS calls inside fn run on one thread each (see above). For GPU arrays
    (xp is cupy) the items simply run in order: the GPU is the parallel machine."""
    items = list(items)
    n = min(num_threads(), len(items))
    if n <= 1 or not on_cpu(xp) or threading.current_thread().name.startswith(_POOL_PREFIX):
        return [fn(item) for item in items]  # one thread, or already inside a worker
    runs = [items[len(items) * k // n : len(items) * (k + 1) // n] for k in range(n)]
    pool = _thread_pool(n - 1)
    with blas_threads(1):
        futures = [pool.submit(lambda run: [fn(item) for item in run], run) for run in runs[1:]]
        results = [fn(item) for item in runs[0]]
        for f in futures:
            results.extend(f.result())
    return results


def _thread_pool(workers):
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix=_POOL_PREFIX)
        return _pool


MIN_SPLIT_FLOPS = 1 << 23  # below this a matmul takes ~0.1 ms: not worth splitting


def matmul(a, b, out=None, bias=None):
    """a @ b (+ bias) for 2-D a (M, K), b (K, N) and bias (N,), written into `out`
    (M, N) if given.

    On the CPU the result's rows (or, when it has fewer rows than columns, its
    columns) are cut into one block per thread, and each thread multiplies its block
    with single-threaded BLAS and adds the bias to it while it is still in cache.
    A transposed operand (`w.T`) is read in place.
    """
    xp = array_module(a, b)
    (M, K), N = a.shape, b.shape[1]
    threads = num_threads()
    if not on_cpu(xp) or threads == 1 or 2 * M * K * N < MIN_SPLIT_FLOPS:
        out = xp.matmul(a, b, out=out)
        if bias is not None:
            out += bias
        return out
    if out is None:
        out = xp.empty((M, N), dtype=xp.result_type(a, b))
    if M >= N:
        blocks = [(slice(M * k // threads, M * (k + 1) // threads), slice(None)) for k in range(threads)]
    else:
        blocks = [(slice(None), slice(N * k // threads, N * (k + 1) // threads)) for k in range(threads)]

    def block(rows_cols):
        rows, cols = rows_cols
        part = xp.matmul(a[rows], b[:, cols], out=out[rows, cols])
        if bias is not None:
            part += bias[cols]

    parallel_map(block, blocks)
    return out


def column_sums(a, out=None):
    """a.sum(axis=0) for a 2-D array (N, M), written into `out` (M,) if given. On
    the CPU the rows are shared among the threads and the partial sums added in order."""
    xp = array_module(a)
    N, M = a.shape
    if not on_cpu(xp) or num_threads() == 1 or N * M < (1 << 18):
        return a.sum(axis=0, out=out)
    parts = map_chunks(lambda r0, r1: a[r0:r1].sum(axis=0), N, max(1, N // num_threads()))
    total = sum(parts[1:], parts[0])
    if out is None:
        return total
    out[...] = total
    return out


def fill(a, value):
    """a[...] = value, the work shared among the CPU threads (a: contiguous)."""
    flat = a.reshape(-1)
    if not on_cpu(array_module(a)):
        flat.fill(value)
        return a
    map_chunks(lambda lo, hi: flat[lo:hi].fill(value), flat.size, 1 << 22)
    return a


# OpenBLAS has no Python API, so the OpenBLAS library that NumPy loaded is found in
# the process's memory map and asked directly (threadpoolctl does the same). Where
# it cannot be found (another BLAS, another OS), blas_threads does nothing.

_OPENBLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads")
_openblas = None  # (get, set) once looked up; () when there is no OpenBLAS to control


def _openblas_functions():
    global _openblas
    if _openblas is not None:
        return _openblas
    _openblas = ()
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return _openblas
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _OPENBLAS_SETTERS:
            get_name = name.replace("set_num", "get_num")
            if hasattr(lib, name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, name), getattr(lib, get_name)
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                _openblas = (getter, setter)
                return _openblas
    return _openblas


def blas_threads_available():
    """True when blas_threads() can change NumPy's OpenBLAS thread count here."""
    return bool(_openblas_functions())


@contextmanager
def blas_threads(n):
    """Run the block with NumPy's OpenBLAS using at most n threads, then restore
    the previous count. Does nothing where OpenBLAS cannot be found."""
    functions = _openblas_functions()
    if not functions:
        yield
        return
    get, set_ = functions
    before = get()
    if before <= n:
        yield
        return
    set_(n)
    try:
        yield
    finally:
        set_(before)
