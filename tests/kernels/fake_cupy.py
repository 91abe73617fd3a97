"""A stand-in for CuPy on the CPU, for dry runs of GPU code paths.

Arrays are a NumPy subclass registered as `cupy.ndarray`, so array_module() sees
"CuPy", the model takes its GPU branches, and `.get()` copies to the host. Kernel
launches go to the CPU emulator (tests/kernels/emulator.py). Nothing here is
fast or faithful beyond what the code under test touches: it exists so that
scripts/gpu_check.py and the CuPy branches run, line by line, in CPU CI.

Capture (CUDA graphs). `Stream.begin_capture()` starts recording into a stand-in
`Graph`: while it records, kernel launches and gemms are noted, not run (wrap the
runners with `capturing_runners`), and whatever a real capture forbids or would
silently get wrong raises CaptureError: a host sync (float(), .item(), .get(),
asnumpy, a synchronize), a pool allocation (an array not from the allocator that
`cuda.using_allocator` installed), a host-to-device copy, CuPy's own elementwise
kernels (NumPy ufuncs here: they would run at once instead of being recorded), and
cuBLAS's setStream through CuPy's binding (what CuPy 14 raises on). `Graph.launch()`
runs the recorded launches again, on whatever the arrays hold by then.
"""
import contextlib
import ctypes
import sys
import types

import numpy as np

from nanogpt_np.gpucheck.counts import PoolStats


class CaptureError(RuntimeError):
    """Something a CUDA graph capture cannot hold happened while capturing."""


_STATE = {"graph": None, "allocator": None}


def capturing():
    return _STATE["graph"] is not None


def refuse_in_capture(what):
    if capturing():
        raise CaptureError(f"{what} while a stream is capturing")


class ndarray(np.ndarray):  # noqa: N801  (the name CuPy uses)
    def get(self, stream=None):
        refuse_in_capture("a device-to-host copy (.get(), a host sync)")
        return np.array(self, copy=True).view(np.ndarray)

    def item(self):
        refuse_in_capture(".item() (a host sync)")
        return super().item()

    def __float__(self):
        refuse_in_capture("float() of a device array (a host sync)")
        return super().__float__()

    def __int__(self):
        refuse_in_capture("int() of a device array (a host sync)")
        return super().__int__()

    def set(self, host, stream=None):
        refuse_in_capture("a host-to-device copy (ndarray.set)")
        self[...] = np.asarray(host)

    def __array_finalize__(self, obj):
        if capturing() and self.base is None:  # a copy or a cast, not a view
            raise CaptureError("a pool allocation (a copy or cast) while a stream is capturing")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        refuse_in_capture(f"CuPy's own kernel {ufunc.__name__}.{method} (not recorded by the stand-in graph)")
        inputs = [i.view(np.ndarray) if isinstance(i, ndarray) else i for i in inputs]
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, ndarray) else o for o in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is not None:  # in place: the caller's own array, as NumPy returns it
            return out[0] if len(out) == 1 else out
        if isinstance(result, tuple):
            return tuple(_wrap(r) for r in result)
        return _wrap(result)


def _wrap(value):
    if isinstance(value, np.ndarray) and not isinstance(value, ndarray):
        if capturing() and value.base is None:
            raise CaptureError("a pool allocation (the result of a CuPy function) while a stream is capturing")
        return value.view(ndarray)
    return value


def _wrapped(fn):
    def call(*args, **kwargs):
        return _wrap(fn(*args, **kwargs))

    return call


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    refuse_in_capture("asarray (a host-to-device copy or a cast)")
    return np.array(a, dtype=dtype).view(ndarray)  # a host -> device copy


def asnumpy(a, stream=None):
    refuse_in_capture("asnumpy (a host sync)")
    return np.array(a, copy=True).view(np.ndarray)


# ---- memory: the pool, a custom allocator (cupy.cuda.using_allocator), pinned memory ----

class MemoryPointer:
    """A device address; `owner` keeps what it points into alive."""

    def __init__(self, mem, offset):
        self.mem, self.ptr = mem, mem.ptr + offset


class UnownedMemory:
    def __init__(self, ptr, size, owner):
        self.ptr, self.size, self.owner = ptr, size, owner


class _PoolBlock:
    def __init__(self, size):
        self.buffer = np.zeros(max(int(size), 1) + 16, dtype=np.uint8)
        self.ptr = -(-self.buffer.ctypes.data // 16) * 16  # 16-byte aligned, as CuPy's pool (512) is
        self.size = size


class MemoryPool(PoolStats):
    def __init__(self):
        self.allocations = 0

    def malloc(self, size):
        refuse_in_capture("a pool allocation (MemoryPool.malloc)")
        self.allocations += 1
        return MemoryPointer(_PoolBlock(size), 0)


_POOL = MemoryPool()


@contextlib.contextmanager
def using_allocator(allocator=None):
    previous = _STATE["allocator"]
    _STATE["allocator"] = allocator
    try:
        yield
    finally:
        _STATE["allocator"] = previous


def empty(shape, dtype=np.float64, order="C"):
    """An array from the current allocator (using_allocator), else the pool."""
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    allocator = _STATE["allocator"]
    if allocator is None:
        refuse_in_capture("a pool allocation (empty)")
        return np.empty(shape, dtype=dtype).view(ndarray)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    pointer = allocator(nbytes)
    raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(pointer.ptr)
    raw.memory = pointer  # every view's base chain ends at raw: the block stays leased while one lives
    flat = np.frombuffer(raw, dtype=np.uint8)[:nbytes].view(dtype)
    return flat.reshape(shape).view(ndarray)


def zeros(shape, dtype=np.float64, order="C"):
    out = empty(shape, dtype)
    out.view(np.ndarray)[...] = 0
    return out


def empty_like(a, dtype=None):
    return empty(a.shape, a.dtype if dtype is None else dtype)


def zeros_like(a, dtype=None):
    return zeros(a.shape, a.dtype if dtype is None else dtype)


def alloc_pinned_memory(nbytes):
    return np.zeros(nbytes, dtype=np.uint8)  # host memory that supports the buffer protocol


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


def _device_synchronize():
    refuse_in_capture("Device.synchronize (a host sync)")


class Event:
    done = True  # everything here has run by the time anyone asks

    def record(self, stream=None):
        pass

    def synchronize(self):
        refuse_in_capture("Event.synchronize (a host sync)")


class Graph:
    """A stand-in CUDA graph: the launches made while its stream captured, run again
    by launch() with the same arguments (so on whatever the arrays hold by then)."""

    def __init__(self):
        self.nodes = []  # (description, callable)

    def launch(self, stream=None):
        refuse_in_capture("Graph.launch inside a capture")
        for _, run in self.nodes:
            run()


class Stream:
    """CUDA streams as the order things run in (here: at once, in order), and capture."""

    def __init__(self, non_blocking=False, ptr=None):
        self.ptr = id(self) if ptr is None else ptr
        self._previous = []

    def record(self, event=None):
        return Event()

    def wait_event(self, event):
        pass

    def synchronize(self):
        refuse_in_capture("Stream.synchronize (a host sync)")

    def begin_capture(self, mode=None):
        if capturing():
            raise CaptureError("begin_capture while another capture runs")
        if not _STATE.get("recording_runners"):  # launches would run now and the graph stay empty
            raise CaptureError("this stand-in records launches only through fake_cupy.capturing_runners")
        _STATE["graph"] = Graph()

    def end_capture(self):
        graph, _STATE["graph"] = _STATE["graph"], None
        return graph

    def __enter__(self):
        self._previous.append(_STATE.get("stream", _CURRENT_STREAM))
        _STATE["stream"] = self
        return self

    def __exit__(self, *exc):
        _STATE["stream"] = self._previous.pop()
        return False


_CURRENT_STREAM = Stream()


def current_stream():
    return _STATE.get("stream", _CURRENT_STREAM)


class capturing_runners:  # noqa: N801 (used like a function)
    """Wrap a kernel runner (kernels.loader) or gemm runner (kernels.gemm): while a
    stream captures, calls are recorded into the graph instead of run."""

    def __init__(self, inner):
        self.inner = inner
        _STATE["recording_runners"] = True

    def __getattr__(self, name):
        method = getattr(self.inner, name)
        if name not in ("launch", "gemm_ex"):
            return method

        def call(*args):
            if capturing():  # a graph keeps addresses, not the arrays: whatever frees them, frees them
                args = tuple(_unowned(a) for a in args)
                _STATE["graph"].nodes.append((f"{name} {args[1] if name == 'launch' else ''}",
                                              lambda: method(*args)))
            else:
                method(*args)

        return call


def _unowned(a):
    """A view of a (contiguous) array's memory that does not keep the memory alive:
    what a CUDA graph holds of its kernels' arguments (a raw address)."""
    if isinstance(a, tuple):  # a kernel launch's argument tuple
        return tuple(_unowned(x) for x in a)
    if not isinstance(a, np.ndarray) or a.nbytes == 0:
        return a
    raw = (ctypes.c_uint8 * a.nbytes).from_address(a.ctypes.data)
    view = np.frombuffer(raw, dtype=np.uint8).view(a.dtype).reshape(a.shape)
    return view.view(type(a))


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
    cupy.empty, cupy.zeros, cupy.empty_like, cupy.zeros_like, cupy.asnumpy = empty, zeros, empty_like, zeros_like, asnumpy
    _STATE.update(graph=None, allocator=None, stream=_CURRENT_STREAM, recording_runners=False)
    props = {"name": b"FakeGPU (CPU emulator)", "major": 9, "minor": 0, "totalGlobalMem": 2**30}
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0, getDeviceProperties=lambda i: props,
                                      runtimeGetVersion=lambda: 13000, memGetInfo=lambda: (2**29, 2**30)),
        memory=types.SimpleNamespace(OutOfMemoryError=MemoryError, MemoryPointer=MemoryPointer,
                                     UnownedMemory=UnownedMemory),
        nvrtc=types.SimpleNamespace(getVersion=lambda: (13, 0)),
        Device=lambda *a: types.SimpleNamespace(synchronize=_device_synchronize, use=_noop),
        get_current_stream=current_stream,
        Stream=Stream, Event=Event, Graph=Graph, get_elapsed_time=lambda start, stop: 0.0,
        using_allocator=using_allocator, alloc_pinned_memory=alloc_pinned_memory,
        compiler=types.SimpleNamespace(CompileException=RuntimeError),
    )
    cupy.random = types.SimpleNamespace(RandomState=RandomState)
    cupy.get_default_memory_pool = lambda: _POOL
    core = types.ModuleType("cupy._core")
    core._routines_linalg = _Linalg("cupy._core._routines_linalg")
    cupy._core = core
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy._core", core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", core._routines_linalg)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", _fake_nccl())
    return cupy


class FakeCublasLib:
    """libcublas as kernels/gemm.CublasRunner calls it through ctypes (create, workspace,
    stream, GemmEx), computed by emulator.NumpyCublas on the raw addresses. While a
    stream captures, GemmEx is recorded into the graph (cuBLAS supports capture given a
    fixed workspace: `workspace_set` says whether one was)."""

    def __init__(self):
        from tests.kernels.emulator import NumpyCublas

        self.numpy = NumpyCublas()
        self.handles, self.streams_set, self.workspace_set = 0, [], False

    def cublasCreate_v2(self, handle_ref):
        self.handles += 1
        ctypes.cast(handle_ref, ctypes.POINTER(ctypes.c_void_p))[0] = 0x1000 + self.handles
        return 0

    def cublasSetWorkspace_v2(self, handle, ptr, size):
        self.workspace_set = True
        return 0

    def cublasSetStream_v2(self, handle, stream):
        refuse_in_capture("cublas setStream (the stream is set once, before any capture)")
        self.streams_set.append(stream.value)
        return 0

    def cublasGemmEx(self, handle, transa, transb, m, n, k, alpha, A, a_type, lda, B, b_type, ldb, beta, C, c_type,
                     ldc, compute, algo):
        if capturing() and not self.workspace_set:
            raise CaptureError("cublasGemmEx without a workspace while capturing (cuBLAS would allocate)")
        v = lambda c: c.value  # noqa: E731
        args = [v(a) for a in (transa, transb, m, n, k)]
        alpha_v = ctypes.c_double.from_address(alpha.value).value if compute.value == 70 else \
            ctypes.c_float.from_address(alpha.value).value
        beta_v = ctypes.c_double.from_address(beta.value).value if compute.value == 70 else \
            ctypes.c_float.from_address(beta.value).value
        ta, tb, M, N, K = args

        def matrix(ptr, cuda_type, ld, rows, cols):
            dtype = self.numpy.TYPES[cuda_type]
            extent = ((cols - 1) * ld + rows) * dtype.itemsize
            return types.SimpleNamespace(dtype=dtype, nbytes=extent, data=types.SimpleNamespace(ptr=ptr))

        a = matrix(A.value, a_type.value, lda.value, *((M, K) if ta == 0 else (K, M)))
        b = matrix(B.value, b_type.value, ldb.value, *((K, N) if tb == 0 else (N, K)))
        c = matrix(C.value, c_type.value, ldc.value, M, N)

        def run():
            self.numpy.gemm_ex(ta, tb, M, N, K, alpha_v, a, a_type.value, lda.value, b, b_type.value, ldb.value,
                               beta_v, c, c_type.value, ldc.value, compute.value)

        if capturing():
            _STATE["graph"].nodes.append(("cublasGemmEx", run))
        else:
            run()
        return 0
