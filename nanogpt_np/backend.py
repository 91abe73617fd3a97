"""The one place that chooses the array library: NumPy on the CPU, CuPy on a GPU.

A leaf: it imports no other part of nanogpt_np. What it holds:
  - the array module: `array_module(x)` for the library that owns an input (the
    idea behind `cupy.get_array_module`), so one layer file serves both backends;
    `get_xp(name)` and `use_gpu(index)` for callers that choose one;
  - the dtype policy: float32 / float64, and bf16 mixed precision on the GPU
    (`resolve_precision`); TF32 matmuls, off unless asked for (`set_tf32(True)`, or
    CUPY_TF32=1 in the environment, CuPy's own switch);
  - host and device transfers: `to_host`, `to_device`, `data_pointer`.

CuPy is never imported unless a caller asks for it by name, so a CPU-only install
pays nothing for the GPU path. The CPU's speed helpers (threads, cache-sized
chunks, the threaded matmul) are in cpu.py; which layers run as fused GPU kernels
is decided in ops.py.
"""
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


# ---- precision ------------------------------------------------------------------------
#
# The dtype policy. A model has a parameter dtype (its master weights, gradients and
# AdamW moments) and a compute dtype (activations and matmul inputs):
#   float64  float64 / float64   NumPy or CuPy; the gradient checks
#   float32  float32 / float32   NumPy (the CPU default) or CuPy
#   bf16     float32 / bf16      CuPy only (its default): mixed precision
# In bf16 the matmuls read bf16 and accumulate in float32 on tensor cores (cuBLAS
# gemmEx), attention runs on tensor cores with a float32 softmax, and LayerNorm
# statistics, the residual stream, the loss and every gradient that reaches a
# parameter stay float32. bf16 keeps float32's exponent range, so unlike float16 it
# needs no loss scaling. NumPy has no bf16 arithmetic worth using on a CPU, so the
# NumPy backend refuses it; NumPy code never sees a bf16 array.

BF16_NAMES = ("bf16", "bfloat16")
PRECISIONS = ("float32", "float64", "bf16")


def bfloat16():
    """The NumPy/CuPy dtype of bf16 arrays, ml_dtypes.bfloat16 (CuPy 14 takes bf16
    through it). A clear error when ml_dtypes is missing."""
    try:
        import ml_dtypes
    except ImportError as e:
        raise RuntimeError(
            "dtype bf16 needs the ml_dtypes package, which gives NumPy and CuPy (>= 14) their "
            "bfloat16 dtype: `pip install ml_dtypes`, or run with --dtype float32"
        ) from e
    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype):
    return dtype is not None and not isinstance(dtype, str) and np.dtype(dtype).name == "bfloat16"


def default_precision(backend):
    """bf16 on a GPU (what build-nanogpt trains in), float32 on the CPU."""
    return "bf16" if backend == "cupy" else "float32"


def resolve_precision(dtype, backend="numpy"):
    """(parameter dtype, compute dtype) for a precision name or dtype (see above).

    float32/float64 give the same dtype twice; bf16 gives (float32, bfloat16) and is
    refused on the NumPy backend with a message saying what to use instead."""
    if (isinstance(dtype, str) and dtype.lower() in BF16_NAMES) or is_bfloat16(dtype):
        if backend != "cupy":
            raise ValueError(
                "dtype bf16 (mixed precision) runs on the GPU only: use --backend cupy, or "
                "--dtype float32 on the NumPy backend"
            )
        return np.dtype(np.float32), bfloat16()
    dt = resolve_dtype(dtype)
    return dt, dt


def resolve_dtype(dtype):
    """np.float32 / np.float64 from a dtype or a name such as 'float32'."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose float32, float64 or (with the cupy backend) bf16")
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


def data_pointer(a):
    """The address of a's first element: host memory for a NumPy array (and for
    the CPU stand-ins of CuPy arrays the tests use, NumPy subclasses), device
    memory for a CuPy array. (Not through NumPy's .data: a memoryview refuses
    ml_dtypes' bf16.)"""
    if isinstance(a, np.ndarray):
        return int(a.ctypes.data)
    return int(a.data.ptr)


def to_device(a, xp, dtype=None):
    """`a` as an array of library `xp`, optionally cast to `dtype`. Moves between
    host and GPU in either direction (a CuPy array to NumPy goes through to_host)."""
    if xp is np:
        return np.asarray(to_host(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def on_cpu(xp):
    """True for NumPy, False for CuPy."""
    return xp is np


class PinnedUpload:
    """A device array that host arrays are copied into, again and again, through pinned
    (page-locked) host memory: the copy is queued on the current stream and the host
    goes on at once (a copy from pageable memory would wait for it). The device array
    is allocated once, so a training step reads its batch from the same address every
    time (what a CUDA graph needs).

    A few pinned staging buffers take turns, so the host never overwrites one whose
    copy may still be queued; it waits only if all of them are (an event per buffer
    says). NumPy: upload() just returns the values as an array of the dtype."""

    def __init__(self, xp, shape, dtype, slots=4):
        self.xp, self.shape, self.dtype = xp, tuple(shape), np.dtype(dtype)
        self.device = None if on_cpu(xp) else xp.empty(self.shape, dtype=self.dtype)
        self._staging = [None] * slots
        self._copied = [None] * slots  # the event after each staging buffer's last copy
        self._turn = 0

    def _pinned(self, slot):
        if self._staging[slot] is None:
            memory = self.xp.cuda.alloc_pinned_memory(max(1, int(np.prod(self.shape)) * self.dtype.itemsize))
            self._staging[slot] = np.ndarray(self.shape, dtype=self.dtype, buffer=memory)
        return self._staging[slot]

    def upload(self, host):
        """host: an array of this buffer's shape, or a tuple of arrays, one per index of
        its first axis (copied side by side into the staging buffer: no host stack)."""
        parts = host if isinstance(host, tuple) else None
        if parts is not None:
            if len(parts) != self.shape[0] or any(np.shape(p) != self.shape[1:] for p in parts):
                raise ValueError(f"upload: parts of shapes {[np.shape(p) for p in parts]}; this buffer takes "
                                 f"{self.shape[0]} parts of shape {self.shape[1:]}")
        elif tuple(np.shape(host)) != self.shape:
            raise ValueError(f"upload: shape {tuple(np.shape(host))} is not this buffer's {self.shape}")
        if self.device is None:
            return np.asarray(host, dtype=self.dtype)
        slot = self._turn % len(self._staging)
        self._turn += 1
        event = self._copied[slot]
        if event is not None and not event.done:
            event.synchronize()  # only when every staging buffer is still queued
        staging = self._pinned(slot)
        for k, part in enumerate(parts if parts is not None else (host,)):
            np.copyto(staging[k] if parts is not None else staging, part, casting="unsafe")
        stream = self.xp.cuda.get_current_stream()
        self.device.set(staging, stream=stream)
        self._copied[slot] = stream.record()
        return self.device
