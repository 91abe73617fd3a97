"""A stand-in for CuPy on the CPU, for dry runs of GPU code paths.

Arrays are a NumPy subclass registered as `cupy.ndarray`, so array_module() sees
"CuPy", the model takes its GPU branches, and `.get()` copies to the host. Kernel
launches go to the CPU emulator (tests/kernels/emulator.py). Nothing here is
fast or faithful beyond what the code under test touches: it exists so that
scripts/gpu_check.py and the CuPy branches run, line by line, in CPU CI.
"""
import sys
import types

import numpy as np


class ndarray(np.ndarray):  # noqa: N801  (the name CuPy uses)
    def get(self):
        return np.array(self, copy=True).view(np.ndarray)


def _wrap(value):
    if isinstance(value, np.ndarray) and not isinstance(value, ndarray):
        return value.view(ndarray)
    return value


def _wrapped(fn):
    def call(*args, **kwargs):
        return _wrap(fn(*args, **kwargs))

    return call


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return np.array(a, dtype=dtype).view(ndarray)  # a host -> device copy


def ascontiguousarray(a, dtype=None):
    return _wrap(np.ascontiguousarray(a, dtype=dtype))


class RandomState:
    def __init__(self, seed=None):
        self.rng = np.random.default_rng(seed)

    def standard_normal(self, size=None, dtype=np.float64):
        return _wrap(self.rng.standard_normal(size).astype(dtype))


class _Linalg(types.ModuleType):
    COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32 = 1, 7
    modes = {}

    def set_compute_type(self, dtype, mode):
        self.modes[np.dtype(dtype)] = mode

    def get_compute_type(self, dtype):
        return self.modes.get(np.dtype(dtype), self.COMPUTE_TYPE_DEFAULT)


class _FakeCupy(types.ModuleType):
    def __getattr__(self, name):  # everything else: NumPy's, with array results moved "to the GPU"
        value = getattr(np, name)
        if callable(value) and not isinstance(value, (type, np.ufunc)):
            return _wrapped(value)
        return value


def _noop(*args, **kwargs):
    return None


class Stream:
    """CUDA streams and events as no-ops: everything here runs in order anyway."""

    def __init__(self, non_blocking=False):
        self.ptr = id(self)

    def record(self):
        return types.SimpleNamespace(synchronize=_noop)

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


_CURRENT_STREAM = Stream()


def _fake_nccl():
    """cupy.cuda.nccl for one rank: an allreduce over one rank leaves the buffer as it is."""
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = True
    nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64, nccl.NCCL_FLOAT16, nccl.NCCL_BFLOAT16, nccl.NCCL_SUM = 7, 8, 6, 9, 0
    nccl.get_unique_id = lambda: tuple(range(128))

    class NcclCommunicator:
        def __init__(self, ndev, uid, rank):
            if ndev != 1:
                raise ValueError("the fake NCCL has one rank")

        def allReduce(self, send, recv, count, dtype, op, stream):
            pass

        def bcast(self, buf, count, dtype, root, stream):
            pass

    nccl.NcclCommunicator = NcclCommunicator
    return nccl


def install(monkeypatch):
    """Put the fake at sys.modules['cupy'] (and its submodules) for one test."""
    cupy = _FakeCupy("cupy")
    cupy.__version__ = "fake"
    cupy.ndarray, cupy.asarray, cupy.ascontiguousarray = ndarray, asarray, ascontiguousarray
    props = {"name": b"FakeGPU (CPU emulator)", "major": 9, "minor": 0, "totalGlobalMem": 2**30}
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda i: props,
                                      runtimeGetVersion=lambda: 13000, memGetInfo=lambda: (2**29, 2**30)),
        memory=types.SimpleNamespace(OutOfMemoryError=MemoryError),
        nvrtc=types.SimpleNamespace(getVersion=lambda: (13, 0)),
        Device=lambda *a: types.SimpleNamespace(synchronize=_noop, use=_noop),
        get_current_stream=lambda: _CURRENT_STREAM,
        Stream=Stream,
        compiler=types.SimpleNamespace(CompileException=RuntimeError),
    )
    cupy.random = types.SimpleNamespace(RandomState=RandomState)
    cupy.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=_noop, total_bytes=lambda: 0,
                                                                 free_bytes=lambda: 0)
    core = types.ModuleType("cupy._core")
    core._routines_linalg = _Linalg("cupy._core._routines_linalg")
    cupy._core = core
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy._core", core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", core._routines_linalg)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", _fake_nccl())
    return cupy
