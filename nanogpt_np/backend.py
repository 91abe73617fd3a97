"""The one place that chooses the array library: NumPy on the CPU, CuPy on a GPU.

Layer code never imports numpy or cupy to decide where it runs. It asks
`array_module(x)` for the library that owns its input (the idea behind
`cupy.get_array_module`), so one layer file serves both backends. Everything else
that must know the backend (the model allocating its parameters, the optimizer,
checkpoints moving arrays to and from the host) goes through the helpers here.

CuPy is never imported unless a caller asks for it by name, so a CPU-only install
pays nothing for the GPU path.

On the GPU, four layers run as fused CUDA kernels (nanogpt_np/kernels/) instead
of their NumPy formulas: `layer_ops(xp)` hands the model the right set. TF32
matmuls are off unless asked for: `set_tf32(True)`, or CUPY_TF32=1 in the
environment (CuPy's own switch).
"""
import os
import sys

import numpy as np

BACKENDS = ("numpy", "cupy")

_DTYPES = {
    "float32": np.float32,
    "fp32": np.float32,
    "float64": np.float64,
    "fp64": np.float64,
}


def array_module(*arrays):
    """The array library (numpy or cupy) that owns these arrays."""
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return np


def get_xp(name="numpy"):
    """The array module for a backend name; a clear error if it cannot run here."""
    if name == "numpy":
        return np
    if name == "cupy":
        return _import_cupy()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _import_cupy():
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(
            "backend 'cupy' needs CuPy, which is not installed. Install the wheel that "
            "matches your CUDA toolkit, e.g. `pip install cupy-cuda12x` (CUDA 12) or "
            "`pip install cupy-cuda13x` (CUDA 13), or run with --backend numpy."
        ) from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        raise RuntimeError(
            f"backend 'cupy' found CuPy but no usable NVIDIA GPU ({e}). "
            "Run on a machine with a GPU and driver, or use --backend numpy."
        ) from e
    if n == 0:
        raise RuntimeError("backend 'cupy' found no NVIDIA GPU; use --backend numpy.")
    return cupy


def use_gpu(index):
    """Make GPU `index` the current device for CuPy (one GPU per MPI rank: call it
    with the rank's local index before building the model). Returns cupy."""
    cupy = _import_cupy()
    n = cupy.cuda.runtime.getDeviceCount()
    if not 0 <= index < n:
        raise ValueError(f"GPU index {index} is out of range: this machine has {n} GPU(s)")
    cupy.cuda.Device(index).use()
    return cupy


def layer_ops(xp):
    """The layer implementations for array module `xp`: a namespace with modules
    attention, cross_entropy, embedding, gelu, layernorm and linear, each with the
    forward(...) -> (out, cache) / backward(dout, cache) interface.

    NumPy gets nanogpt_np.layers, the readable formulas. CuPy gets
    nanogpt_np.kernels: attention, LayerNorm, GELU and softmax + cross-entropy as
    CUDA kernels, linear (cuBLAS) and embedding as the formula layers on CuPy
    arrays. NANOGPT_KERNELS=0 in the environment gives CuPy the formula layers too
    (slower, but a second opinion when a kernel is in doubt).
    """
    if xp is np or os.environ.get("NANOGPT_KERNELS", "1") == "0":
        from . import layers

        return layers
    from . import kernels

    return kernels


def set_tf32(enabled=True):
    """Let cuBLAS run float32 matmuls on TF32 tensor cores (about 10 bits of mantissa
    in the products, float32 accumulation): several times faster on A100/H100, and
    what PyTorch calls `allow_tf32`. Off by default; CUPY_TF32=1 turns it on too.
    Affects the CuPy backend only."""
    cupy = _import_cupy()
    from cupy._core import _routines_linalg as linalg

    mode = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
    linalg.set_compute_type(cupy.dtype(cupy.float32), mode)


def tf32_enabled():
    """Whether CuPy float32 matmuls use TF32 (False when CuPy is not in use)."""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return False
    from cupy._core import _routines_linalg as linalg

    return linalg.get_compute_type(cupy.dtype(cupy.float32)) == linalg.COMPUTE_TYPE_TF32


def backend_name(xp):
    return "cupy" if xp is not np else "numpy"


def resolve_dtype(dtype):
    """np.float32 / np.float64 from a dtype or a name such as 'float32'."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose float32 or float64")
        return np.dtype(_DTYPES[dtype])
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype {dt} is not supported; use float32 or float64")
    return dt


def to_host(a):
    """A NumPy array with the same values (no copy when it already is one)."""
    get = getattr(a, "get", None)
    if get is not None and array_module(a) is not np:
        return get()
    return np.asarray(a)


def to_device(a, xp, dtype=None):
    """`a` as an array of library `xp`, optionally cast to `dtype`. Moves between
    host and GPU in either direction (a CuPy array to NumPy goes through to_host)."""
    if xp is np:
        return np.asarray(to_host(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


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
