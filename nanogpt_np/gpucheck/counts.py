"""`scripts/gpu_check.py --counts`: what one training step asks of a GPU, counted on a CPU.

A counting stand-in for CuPy takes the place of `cupy` in sys.modules. Its arrays
hold no data: each is a shape, a dtype and a made-up device address (a NumPy
"template" array with the right strides over one element's worth of memory gives
views, reshapes and slices their shapes and offsets without touching any memory),
so GPT-2 124M at B=16, T=1024 "runs" in a few hundred MB of host memory. Every
device operation records itself instead of computing:

    launches      every device operation of any kind: RawKernels (the project's .cu),
                  CuPy's own elementwise / reduction / copy / fill kernels, gemms, and
                  host<->device copies
    gemms         those that are matrix products
    syncs         host waits: float()/int()/.item()/.get() of a device array, a stream
                  or device synchronize
    allocations   memory-pool allocations (xp.empty, zeros, results of CuPy operations)
    gbytes        bytes the kernels read and write, from their shapes: every array
                  argument of a RawKernel once, every gemm operand once, a CuPy
                  operation's inputs and output once each (so an in-place update counts
                  its array once: a lower bound for read-and-write arguments)

Warm-up steps run first (the model's buffers, the step's StepMemory, the CUDA graphs
captured; kernels/graph.py), then the counted, steady-state step. Nothing here needs a GPU, CuPy or a compiler.
"""
import collections
import json
import os
import time
import sys
import types

import numpy as np

_HOST_SCALAR = 3.0  # what a device scalar reads as on the host (a plausible loss; norms too)


class Ledger:
    def __init__(self):
        self.reset()

    def reset(self):
        self.kinds = collections.Counter()
        self.kind_bytes = collections.Counter()
        self.gemms = self.syncs = self.allocations = 0
        self.bytes = 0
        self.events = []  # (what, detail) in order, for tests and the capture check

    def launch(self, kind, nbytes, gemm=False):
        if _CAPTURE["graph"] is not None:  # a capture records; Graph.launch counts them each time
            _CAPTURE["graph"].nodes.append((kind, nbytes, gemm))
            return
        self.kinds[kind] += 1
        self.kind_bytes[kind] += int(nbytes)
        self.bytes += int(nbytes)
        self.gemms += bool(gemm)
        self.events.append(("launch", kind))

    def sync(self, why):
        if _CAPTURE["graph"] is not None:
            raise RuntimeError(f"a host sync ({why}) while a stream captures")
        self.syncs += 1
        self.events.append(("sync", why))

    def allocate(self, nbytes):
        if _CAPTURE["graph"] is not None:
            raise RuntimeError("a pool allocation while a stream captures")
        self.allocations += 1
        self.events.append(("alloc", int(nbytes)))

    def summary(self):
        return {"launches": sum(self.kinds.values()), "gemms": self.gemms, "syncs": self.syncs,
                "allocations": self.allocations, "gbytes": round(self.bytes / 1e9, 2)}


_CAPTURE = {"graph": None, "allocator": None}
LEDGER = Ledger()
_next_address = [1 << 40]


def _nbytes(a):
    return a.size * a.dtype.itemsize if isinstance(a, (CountingArray, np.ndarray)) else 0


_TEMPLATES = {}  # (shape, dtype) -> template: read-only, so arrays of one shape share one


def _template(shape, dtype):
    """A NumPy array of this shape and dtype, C-contiguous, over one element of memory:
    indexing and reshaping it computes views' shapes and strides and never reads."""
    key = (tuple(shape), dtype)
    template = _TEMPLATES.get(key)
    if template is None:
        dtype = np.dtype(dtype)
        strides, step = [], dtype.itemsize
        for n in reversed(shape):
            strides.append(step)
            step *= max(int(n), 1)
        template = _TEMPLATES[key] = np.lib.stride_tricks.as_strided(
            np.zeros(1, dtype), shape=tuple(shape), strides=tuple(reversed(strides)), writeable=False)
    return template


def _address(t):
    return t.__array_interface__["data"][0]


class CountingArray:
    """A device array with no data: shape, dtype, strides and an address."""

    __array_priority__ = 100

    __slots__ = ("_t", "shape", "dtype", "size", "ndim", "base", "_memory", "_addr", "__weakref__")

    def __init__(self, template, owner=None, memory=None):
        self._t = template
        # read as often as CuPy's own attributes are: plain attributes, not properties
        self.shape, self.dtype, self.size, self.ndim = template.shape, template.dtype, template.size, template.ndim
        if owner is None:  # a new array: from the current allocator (memory), else from the pool
            self.base = None
            self._memory = memory if memory is not None else _pool_malloc(_nbytes(template))
            self._addr = self._memory.ptr
        else:
            self.base, self._addr = owner, owner._addr

    # ---- what the code under test reads ----
    strides = property(lambda self: self._t.strides)
    itemsize = property(lambda self: self._t.itemsize)
    nbytes = property(lambda self: _nbytes(self))
    flags = property(lambda self: self._t.flags)
    T = property(lambda self: self.transpose())

    @property
    def data(self):  # a view's address: the owner's, plus the view's offset into the owner's template
        origin = (self.base if self.base is not None else self)._t
        return types.SimpleNamespace(ptr=self._addr + _address(self._t) - _address(origin))

    def __len__(self):
        return self.shape[0]

    def _view(self, template):
        return CountingArray(template, owner=self.base if self.base is not None else self)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        view = self._t.view()
        try:
            view.shape = shape  # raises instead of copying when a view cannot do it
        except AttributeError:
            return _new_result("copy", [self], _template(_reshaped(self.shape, shape), self.dtype))
        return self._view(view)

    def ravel(self):
        return self.reshape(-1)

    def view(self, dtype=None):
        return self._view(self._t.view() if dtype is None else self._t.view(dtype))

    def transpose(self, *axes):
        return self._view(self._t.transpose(*axes))

    def __getitem__(self, key):
        if _is_fancy(key):  # a gather: a new array
            keys = key if isinstance(key, tuple) else (key,)
            shape = _template(self.shape, np.bool_)[tuple(_host_like(k) for k in keys)].shape
            return _new_result("gather", [self, *[k for k in keys if isinstance(k, CountingArray)]],
                               _template(shape, self.dtype))
        return self._view(self._t[key])

    def __setitem__(self, key, value):
        target = self[key]
        _record("copy" if isinstance(value, CountingArray) else "fill", [target, value])

    def fill(self, value):
        _record("fill", [self])

    def copy(self):
        return _new_result("copy", [self], _template(self.shape, self.dtype))

    def astype(self, dtype, copy=True):
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        return _new_result("astype", [self], _template(self.shape, dtype))

    # ---- reductions ----
    def _reduce(self, kind, axis=None, out=None, dtype=None, keepdims=False):
        shape = _reduced_shape(self.shape, axis, keepdims)
        if out is not None:
            _record(kind, [self, out])
            return out
        return _new_result(kind, [self], _template(shape, dtype or self.dtype))

    def sum(self, axis=None, dtype=None, out=None, keepdims=False):
        return self._reduce("sum", axis, out, dtype, keepdims)

    def mean(self, axis=None, dtype=None, out=None, keepdims=False):
        return self._reduce("mean", axis, out, dtype, keepdims)

    def min(self, axis=None, out=None, keepdims=False):
        return self._reduce("min", axis, out, None, keepdims)

    def max(self, axis=None, out=None, keepdims=False):
        return self._reduce("max", axis, out, None, keepdims)

    # ---- arithmetic: a CuPy elementwise kernel each ----
    def _binary(self, other, kind):
        shape = np.broadcast_shapes(self.shape, getattr(other, "shape", ()))
        return _new_result(kind, [self, other], _template(shape, self.dtype))

    def _inplace(self, other, kind):
        _record(kind, [self, other])
        return self

    __add__ = __radd__ = lambda self, o: self._binary(o, "add")
    __sub__ = __rsub__ = lambda self, o: self._binary(o, "subtract")
    __mul__ = __rmul__ = lambda self, o: self._binary(o, "multiply")
    __truediv__ = __rtruediv__ = lambda self, o: self._binary(o, "divide")
    __neg__ = lambda self: self._binary(0, "negative")
    __lt__ = __gt__ = __le__ = __ge__ = lambda self, o: self._binary(o, "compare")
    __iadd__ = lambda self, o: self._inplace(o, "add")
    __isub__ = lambda self, o: self._inplace(o, "subtract")
    __imul__ = lambda self, o: self._inplace(o, "multiply")
    __itruediv__ = lambda self, o: self._inplace(o, "divide")

    # ---- host reads: each one a sync ----
    def get(self, stream=None, out=None):
        LEDGER.sync("get")
        return np.full(self.shape, _HOST_SCALAR, dtype=self.dtype)

    def item(self):
        LEDGER.sync("item")
        return _HOST_SCALAR

    def __float__(self):
        LEDGER.sync("float")
        return _HOST_SCALAR

    def __int__(self):
        LEDGER.sync("int")
        return 0

    def __bool__(self):
        LEDGER.sync("bool")
        return True

    def __array__(self, dtype=None, copy=None):
        raise TypeError("a counting device array cannot become a NumPy array; use .get() (a host sync)")

    def set(self, host, stream=None):
        if _CAPTURE["graph"] is not None:
            raise RuntimeError("a host-to-device copy while a stream captures")
        LEDGER.launch("copy H2D", self.nbytes)


def _reshaped(shape, new):
    """The shape `new` (which may hold a -1) resolves to for an array of `shape`."""
    return _template(shape, np.bool_).reshape(new).shape  # contiguous: a view, nothing read


def _reduced_shape(shape, axis, keepdims):
    axes = range(len(shape)) if axis is None else [a % len(shape) for a in np.atleast_1d(axis)]
    return tuple(1 if i in axes else n for i, n in enumerate(shape) if keepdims or i not in axes)


def _is_fancy(key):
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (CountingArray, np.ndarray, list)) for k in keys)


def _host_like(k):
    return np.zeros(k.shape, dtype=np.intp) if isinstance(k, CountingArray) else k


def _record(kind, operands):
    LEDGER.launch("cupy:" + kind, sum(_nbytes(a) for a in operands))


def _new_result(kind, operands, template):
    out = CountingArray(template)
    _record(kind, [*operands, out])
    return out


# ---- the module-level API the package uses -------------------------------------------------------

class MemoryPointer:
    def __init__(self, mem, offset):
        self.mem, self.ptr = mem, mem.ptr + offset


class UnownedMemory:
    def __init__(self, ptr, size, owner):
        self.ptr, self.size, self.owner = ptr, size, owner


def _pool_malloc(nbytes):
    """A pool allocation: counted, and a made-up address (no memory behind it)."""
    LEDGER.allocate(nbytes)
    ptr = _next_address[0]
    _next_address[0] += -(-max(int(nbytes), 1) // 512) * 512  # CuPy's pool rounds to 512 bytes
    return UnownedMemory(ptr, nbytes, None)


def empty(shape, dtype=np.float64, order="C"):
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    template = _template(shape, dtype)
    allocator = _CAPTURE["allocator"]
    return CountingArray(template, memory=None if allocator is None else allocator(_nbytes(template)))


def zeros(shape, dtype=np.float64):
    out = empty(shape, dtype)
    _record("fill", [out])
    return out


def ones(shape, dtype=np.float64):
    return zeros(shape, dtype)


def full(shape, value, dtype=np.float64):
    return zeros(shape, dtype)


def empty_like(a, dtype=None):
    return empty(a.shape, dtype or a.dtype)


def zeros_like(a, dtype=None):
    return zeros(a.shape, dtype or a.dtype)


def asarray(a, dtype=None):
    if isinstance(a, CountingArray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = np.asarray(a, dtype=dtype)
    out = empty(host.shape, host.dtype)
    LEDGER.launch("copy H2D", host.nbytes)
    return out


def ascontiguousarray(a, dtype=None):
    if isinstance(a, CountingArray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return asarray(a, dtype).copy() if isinstance(a, CountingArray) else asarray(a, dtype)


def array(a, dtype=None, copy=True):
    return a.astype(dtype or a.dtype) if isinstance(a, CountingArray) else asarray(a, dtype)


def asnumpy(a, stream=None):
    return a.get() if isinstance(a, CountingArray) else np.asarray(a)


def _ufunc(kind):
    def call(*args, out=None, **kwargs):
        arrays = [a for a in args if isinstance(a, CountingArray)]
        if out is not None:
            _record(kind, [*arrays, out])
            return out
        shape = np.broadcast_shapes(*[a.shape for a in arrays])
        return _new_result(kind, arrays, _template(shape, arrays[0].dtype))

    call.at = lambda target, indices, values: _record(kind + ".at", [target, indices, values])
    return call


def dot(a, b, out=None):
    LEDGER.launch("gemm (cupy.dot)", _nbytes(a) + _nbytes(b), gemm=True)
    return CountingArray(_template((), a.dtype)) if out is None else out


class Graph:
    """What a capture recorded; each launch() counts every recorded operation again."""

    def __init__(self):
        self.nodes = []

    def launch(self, stream=None):
        for kind, nbytes, gemm in self.nodes:
            LEDGER.launch(kind, nbytes, gemm)


class Stream:
    null = None

    def __init__(self, non_blocking=False, ptr=0):
        self.ptr = id(self)

    def begin_capture(self, mode=None):
        _CAPTURE["graph"] = Graph()

    def end_capture(self):
        graph, _CAPTURE["graph"] = _CAPTURE["graph"], None
        return graph

    def synchronize(self):
        LEDGER.sync("stream.synchronize")

    def record(self, event=None):
        return Event()

    def wait_event(self, event):
        pass

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Event:
    done = True

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        LEDGER.sync("event.synchronize")


_STREAM = Stream()


class _Device:
    def __init__(self, index=0):
        self.id = index

    def use(self):
        pass

    def synchronize(self):
        LEDGER.sync("device.synchronize")


class PoolStats:
    """What the package asks of CuPy's memory pool besides malloc, for a stand-in pool
    with no memory of its own to account for (this one and tests/kernels/fake_cupy.py's)."""

    def free_all_blocks(self):
        pass

    def total_bytes(self):
        return 0

    def used_bytes(self):
        return 0

    def free_bytes(self):
        return 0


class _Pool(PoolStats):
    def malloc(self, size):
        return MemoryPointer(_pool_malloc(size), 0)


class _Linalg(types.ModuleType):
    COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32 = 1, 7

    def set_compute_type(self, dtype, mode):
        pass

    def get_compute_type(self, dtype):
        return self.COMPUTE_TYPE_DEFAULT


class CountingCupy(types.ModuleType):
    """The `cupy` module: array functions above, dtypes and constants from NumPy."""

    def __getattr__(self, name):
        value = getattr(np, name)
        if isinstance(value, type) or not callable(value):
            return value  # dtypes (float32, ...) and constants
        raise AttributeError(f"the counting stand-in for CuPy has no cupy.{name}; add it to gpucheck/counts.py")


class using_allocator:  # noqa: N801 (cupy.cuda.using_allocator)
    def __init__(self, allocator=None):
        self.allocator = allocator

    def __enter__(self):
        self.previous, _CAPTURE["allocator"] = _CAPTURE["allocator"], self.allocator

    def __exit__(self, *exc):
        _CAPTURE["allocator"] = self.previous
        return False


def _alloc_pinned_memory(nbytes):
    return np.zeros(nbytes, dtype=np.uint8)  # host memory (small: token ids, hyperparameters)


def make_module():
    cupy = CountingCupy("cupy")
    cupy.__version__ = "counting"
    cupy.ndarray = CountingArray
    for fn in (empty, zeros, ones, full, empty_like, zeros_like, array, asarray, ascontiguousarray, asnumpy, dot):
        setattr(cupy, fn.__name__, fn)
    for name in ("add", "subtract", "multiply", "divide", "sqrt", "maximum", "minimum", "exp", "log"):
        setattr(cupy, name, _ufunc(name))
    cupy.dtype = np.dtype
    props = {"name": b"counting stand-in", "major": 9, "minor": 0, "totalGlobalMem": 141 * 2**30,
             "multiProcessorCount": 132}
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda i: props,
                                      runtimeGetVersion=lambda: 13000, memGetInfo=lambda: (140 * 2**30, 141 * 2**30)),
        memory=types.SimpleNamespace(OutOfMemoryError=MemoryError, MemoryPointer=MemoryPointer,
                                     UnownedMemory=UnownedMemory),
        Device=_Device, Stream=Stream, Event=Event, Graph=Graph, get_current_stream=lambda: _STREAM,
        using_allocator=using_allocator, alloc_pinned_memory=_alloc_pinned_memory,
        compiler=types.SimpleNamespace(CompileException=RuntimeError),
    )
    pool = _Pool()
    cupy.get_default_memory_pool = lambda: pool
    cupy.get_default_pinned_memory_pool = lambda: pool
    core = types.ModuleType("cupy._core")
    core._routines_linalg = _Linalg("cupy._core._routines_linalg")
    cupy._core = core
    return cupy


def _finish_partials_bytes(args):
    part, n_chunks = args[0], int(args[4])
    return _nbytes(part) + _nbytes(part) // n_chunks  # the partials, and one row of gradients written


def _layernorm_params_bytes(args):
    """The partials array (args[4]) is shared by every gradient: count the columns written."""
    C, with_cast = int(args[7]), int(args[14])
    n_chunks = -(-int(args[6]) // int(args[8]))  # ceil(N / rows per chunk)
    others = sum(_nbytes(a) for k, a in enumerate(args) if k != 4 and not (k in (10, 11) and not with_cast))
    return others + n_chunks * (2 + with_cast) * C * args[4].itemsize


def _layernorm_fused_bytes(args):
    """dout, x, the statistics, dx (read too when adding), the cast; the partials written."""
    C, with_cast, accumulate = int(args[11]), int(args[16]), int(args[6])
    n_chunks = -(-int(args[10]) // int(args[12]))
    read_write = sum(_nbytes(args[k]) for k in (0, 1, 2, 3, 4)) + _nbytes(args[5]) * (1 + accumulate)
    return read_write + with_cast * _nbytes(args[13]) + n_chunks * (2 + with_cast) * C * args[7].itemsize


def _dq_store_sums_bytes(args):
    """dq_sum read, dqkv (q written, k and v read: each element once), and the
    (n_chunks, 3C) partial sums written into a slot that spans its whole block's."""
    dq_sum, dqkv, part = args[:3]
    n_chunks = -(-int(args[5]) // int(args[6]))  # ceil(N / rows per chunk)
    return _nbytes(dq_sum) + _nbytes(dqkv) + n_chunks * dqkv.shape[-1] * part.itemsize


def _cross_entropy_forward_backward_bytes(args):
    """The logits (args[0]): read twice (the logsumexp, then the gradient) and written
    once (dlogits, in place); the targets read, the losses written."""
    return 3 * _nbytes(args[0]) + _nbytes(args[1]) + _nbytes(args[2])


# kernels that touch a small part of an array argument, or an argument more than
# once: the bytes they do move
_SPARSE = {"finish_partials": _finish_partials_bytes, "layernorm_backward_params": _layernorm_params_bytes,
           "layernorm_backward_fused": _layernorm_fused_bytes,
           "flash_attention_fa2_backward_dq_store_sums": _dq_store_sums_bytes,
           "cross_entropy_forward_backward": _cross_entropy_forward_backward_bytes}


class CountingKernels:
    """kernels.loader's runner: records each RawKernel launch (name, bytes of its array
    arguments, each once; _SPARSE says what the few kernels that index a large array
    sparsely, or read an array twice, really move)."""

    def launch(self, kernel_file, name, grid, block, args, shared_mem):
        kind = name.split("<")[0]
        nbytes = _SPARSE[kind](args) if kind in _SPARSE else sum(_nbytes(a) for a in args)
        LEDGER.launch(kind, nbytes)


class CountingGemm:
    """kernels.gemm's runner: records each matrix product (each operand once)."""

    def gemm_ex(self, transa, transb, m, n, k, alpha, A, a_type, lda, B, b_type, ldb, beta, C, c_type, ldc,
                compute):
        LEDGER.launch("gemm", _nbytes(A) + _nbytes(B) + _nbytes(C), gemm=True)


class NoopKernels:
    """A kernel runner that does nothing: what remains of a launch is the host's own
    work (the wrappers, the argument checks), which host_cost times."""

    def launch(self, kernel_file, name, grid, block, args, shared_mem):
        pass


class NoopGemm:
    def gemm_ex(self, *args):
        pass


def installed(counting=True):
    """Install the stand-in (sys.modules['cupy'], the kernel and gemm runners: counting,
    or no-op ones); returns an undo function."""
    from nanogpt_np.kernels import gemm, loader

    saved = {k: sys.modules.get(k) for k in ("cupy", "cupy._core", "cupy._core._routines_linalg")}
    cupy = make_module()
    sys.modules["cupy"], sys.modules["cupy._core"] = cupy, cupy._core
    sys.modules["cupy._core._routines_linalg"] = cupy._core._routines_linalg
    previous_kernels = loader.use_runner(CountingKernels() if counting else NoopKernels())
    previous_gemm = gemm.use_runner(CountingGemm() if counting else NoopGemm())

    def undo():
        loader.use_runner(previous_kernels)
        gemm.use_runner(previous_gemm)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v

    return undo


class _Batches:
    """next_batch() -> host (B, T) int64 token ids, like data.DataLoader."""

    def __init__(self, B, T, vocab_size, seed=0):
        self.rng, self.B, self.T, self.V = np.random.default_rng(seed), B, T, vocab_size

    def next_batch(self):
        buf = self.rng.integers(0, self.V, self.B * self.T + 1)
        return buf[:-1].reshape(self.B, self.T), buf[1:].reshape(self.B, self.T)


def _trainer_step(config, B, T, accum, dtype, recompute, cuda_graphs):
    """step(i): what Trainer.train_one_step runs on one rank without ZeRO: the GPU
    kernels' GpuTrainStep (kernels/graph.py), on a 124M model whose weights are never
    initialised (nothing to compute them with)."""
    from nanogpt_np import distributed
    from nanogpt_np.kernels.graph import GpuTrainStep
    from nanogpt_np.model import GPT
    from nanogpt_np.optim import AdamW, cosine_lr
    from nanogpt_np.resilience import StepGuard

    model = GPT(config, dtype=dtype, backend="cupy", init_weights=False)
    model.recompute = recompute
    optimizer = AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    lines = []
    gpu_step = GpuTrainStep(model, optimizer, accum, 1.0, distributed.Single(), cuda_graphs=cuda_graphs,
                            log=lines.append)
    batches, guard = _Batches(B, T, config.vocab_size), StepGuard()

    def step(i):
        gpu_step(batches, cosine_lr(i), guard)
        return gpu_step, lines

    return step


WARM_UP_STEPS = 3  # eager, eager recording StepMemory, capturing the graphs


def count_step(config=None, B=16, T=1024, accum=1, dtype="bf16", recompute=False, cuda_graphs=True, counting=True,
               profile=None):
    """(ledger summary, launches by kind, bytes by kind) of one steady-state training
    step, after the warm-up steps, on the counting stand-in. Every operation a graph
    launch runs counts as one launch. counting=False: the kernel and gemm runners do
    nothing, not even count (LEDGER.host_seconds, the step's CPU time, is then the
    host's own work). profile: a cProfile.Profile to run over the counted step."""
    from nanogpt_np.config import GPTConfig

    config = config or GPTConfig(vocab_size=50304)
    undo = installed(counting)
    try:
        step = _trainer_step(config, B, T, accum, dtype, recompute, cuda_graphs)
        for i in range(WARM_UP_STEPS):
            step(i)
        LEDGER.reset()
        t0 = time.thread_time()  # CPU time: what the step costs the host, whatever else the machine runs
        if profile is not None:
            profile.enable()
        gpu_step, lines = step(WARM_UP_STEPS)
        if profile is not None:
            profile.disable()
        LEDGER.host_seconds = time.thread_time() - t0
        for line in lines:  # a fallback to eager, and why
            print(line)
        return LEDGER.summary(), dict(LEDGER.kinds), dict(LEDGER.kind_bytes)
    finally:
        undo()


def host_cost(B=16, T=1024, repeats=5):
    """(host seconds of one eager steady-state step, of one with graphs, launches of the
    eager step), the fastest of `repeats`: the kernel and gemm runners do nothing, so a
    step's time is the host's own work (our wrappers and argument checks, StepMemory,
    and the stand-in's arrays, which cost about what CuPy's do). What CuPy's own launch
    path adds (argument packing, cuLaunchKernel) is not in it: gpu_check's host rows
    measure that on a GPU."""
    launches = count_step(B=B, T=T, cuda_graphs=False)[0]["launches"]
    eager, graphs = [], []
    for _ in range(repeats):
        count_step(B=B, T=T, cuda_graphs=False, counting=False)
        eager.append(LEDGER.host_seconds)
        count_step(B=B, T=T, cuda_graphs=True, counting=False)
        graphs.append(LEDGER.host_seconds)
    return min(eager), min(graphs), launches


def package_share(B=16, T=1024):
    """The fraction of an eager no-op step's host time spent in the package's own code
    (nanogpt_np, this stand-in excluded), by cProfile with a CPU-time clock: each
    function's own time, plus the time of the builtins and library functions it calls
    directly (cProfile keeps, per caller, what a function spent on its behalf). The
    rest is the stand-in's arrays and what they call. cProfile adds a fixed cost to
    every call, so the share is an estimate; the seconds under the profiler are not
    used."""
    import cProfile
    import pstats

    profile = cProfile.Profile(time.thread_time)
    count_step(B=B, T=T, cuda_graphs=False, counting=False, profile=profile)
    stats = pstats.Stats(profile).stats
    stand_in = os.path.abspath(__file__)

    def ours(func):
        return "nanogpt_np" in func[0] and os.path.abspath(func[0]) != stand_in

    package = total = 0.0
    for func, (_, _, own, _, callers) in stats.items():
        total += own
        if ours(func):
            package += own
        elif os.path.abspath(func[0]) != stand_in:  # a builtin or a library function: the time our code called it for
            package += sum(entry[2] for caller, entry in callers.items() if ours(caller))
    return package / total if total else 0.0


def main(B=16, T=1024, accum=1):
    eager, graphs, eager_launches = host_cost(B, T)
    share = package_share(B, T)
    summary, kinds, kind_bytes = count_step(B=B, T=T, accum=accum)
    per_launch = eager / eager_launches * 1e6
    print(f"one steady-state step: GPT-2 124M, bf16, B={B}, T={T}, accumulation {accum} (counting stand-in)")
    print(f"host time per step, no-op launches: eager {eager * 1e3:.1f} ms ({per_launch:.1f} us per launch), "
          f"CUDA graphs {graphs * 1e3:.1f} ms; of the eager time the package's own code {share:.0%} "
          f"(~{share * per_launch:.0f} us per launch, by cProfile), the rest the stand-in's arrays")
    print(f"{'launches':>8}  {'GB':>7}  kind")
    for kind, n in sorted(kinds.items(), key=lambda kv: (-kind_bytes[kv[0]], kv[0])):
        print(f"{n:8d}  {kind_bytes[kind] / 1e9:7.3f}  {kind}")
    print(json.dumps(summary))
    return summary
