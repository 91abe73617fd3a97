"""Compile the CUDA sources in this folder once, on first use, and launch kernels.

Each kernel file (`*.cu`) is wrapped by one `KernelFile`, which lists the template
instantiations Python launches from it (`"layernorm_forward<float>"`, ...). On the
GPU, a file becomes one `cupy.RawModule`, compiled by NVRTC the first time one of
its kernels is launched and cached for the rest of the process (CuPy also caches
the binary on disk, keyed by the source text). NVRTC has no host standard
library, so the sources include nothing but `common.cuh`, which the loader pastes
in place of its `#include` line (so the disk cache sees every byte).

Every launch goes through `KernelFile.launch`, which checks the arguments first:
  - arrays must be C-contiguous, since a kernel receives only a pointer;
  - scalars must be NumPy scalars (np.float32, np.int32, ...). CuPy sends a Python
    float as a double and a Python int as a 64-bit integer, which a kernel taking
    `float` or `int` would misread without any error.
Launch failures raise at once. Errors inside a running kernel (an illegal address)
surface at the next synchronisation; set NANOGPT_CUDA_SYNC=1 (read once, when
this module is first imported; `sync_each_launch(on)` changes it afterwards) to
synchronise after every launch, so the error names the kernel that caused it.

The object that actually launches is swappable (`use_runner`): the tests run
the same wrappers and the same CUDA source on the CPU through an emulator.
"""
import os
import re
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parent
# Compiler options for every file. CuPy adds the -arch flag for the current GPU.
NVRTC_OPTIONS = ("--std=c++17",)
STATIC_SHARED_LIMIT = 48 * 1024  # bytes a block may use without opting in
_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)
_SCALAR_TYPES = frozenset((np.float32, np.float64, np.int32, np.int64))

ALL_FILES = []  # every KernelFile, in import order: the compile tests walk this


class KernelFile:
    """One .cu file and the template instantiations launched from it."""

    def __init__(self, filename, names):
        self.filename = filename
        self.names = tuple(names)
        self._declared = frozenset(self.names)  # a set: the check runs on every launch
        ALL_FILES.append(self)

    @property
    def path(self):
        return KERNEL_DIR / self.filename

    def source(self):
        """The file's text with each `#include "x"` replaced by x's text (once per file)."""
        seen = set()

        def expand(text):
            def paste(match):
                name = match.group(1)
                if name in seen:
                    return ""
                seen.add(name)
                return expand((KERNEL_DIR / name).read_text())

            return _INCLUDE.sub(paste, text)

        return expand(self.path.read_text())

    def launch(self, name, grid, block, args, shared_mem=0):
        """Run kernel `name` (one of self.names) on grid x block threads."""
        if name not in self._declared:
            raise KeyError(f"{name!r} is not declared in {self.filename}'s KernelFile names")
        check_args(name, args)
        _state["runner"].launch(self, name, tuple(grid), tuple(block), tuple(args), int(shared_mem))


def check_args(name, args):
    """Raise unless every argument is a C-contiguous array or a sized NumPy scalar.
    Every launch pays for this, so the common cases come first and cost a type lookup
    (a scalar) or one attribute read (an array's contiguity)."""
    for k, a in enumerate(args):
        if type(a) in _SCALAR_TYPES:
            continue
        if isinstance(a, np.generic):
            raise TypeError(f"{name}: argument {k} has type {type(a).__name__}; use one of "
                            "np.float32, np.float64, np.int32, np.int64")
        try:  # a NumPy or CuPy array (not `__cuda_array_interface__`: CuPy may raise from
            contiguous = a.flags.c_contiguous  # that property for a bf16 array)
            a.dtype, a.shape
        except AttributeError:
            raise TypeError(
                f"{name}: argument {k} is a {type(a).__name__}; pass scalars as np.float32/np.float64/"
                "np.int32/np.int64 so the kernel receives exactly the C type it declares"
            ) from None
        if not contiguous:
            raise ValueError(f"{name}: argument {k} is not C-contiguous; kernels index raw memory")


class CupyRunner:
    """Compiles each KernelFile into a cupy.RawModule on first use and launches on the GPU."""

    def __init__(self):
        self._modules = {}
        self._functions = {}
        self.sync_each_launch = os.environ.get("NANOGPT_CUDA_SYNC", "0") not in ("", "0")  # read once

    def function(self, kernel_file, name):
        key = (kernel_file.filename, name)
        fn = self._functions.get(key)
        if fn is None:
            import cupy

            module = self._modules.get(kernel_file.filename)
            if module is None:
                module = cupy.RawModule(
                    code=kernel_file.source(), options=NVRTC_OPTIONS, name_expressions=kernel_file.names
                )
                self._modules[kernel_file.filename] = module
            try:
                fn = module.get_function(name)  # compiles the module the first time
            except cupy.cuda.compiler.CompileException as e:
                raise RuntimeError(
                    f"{kernel_file.filename} failed to compile with NVRTC: {e}\n"
                    "Set NANOGPT_KERNELS=0 to run the NumPy-formula layers on CuPy instead."
                ) from e
            self._functions[key] = fn
        return fn

    def launch(self, kernel_file, name, grid, block, args, shared_mem):
        import cupy

        fn = self.function(kernel_file, name)
        if shared_mem > STATIC_SHARED_LIMIT:
            # more than 48 KB of dynamic shared memory must be requested explicitly
            fn.max_dynamic_shared_size_bytes = shared_mem
        fn(grid, block, args, shared_mem=shared_mem)
        if self.sync_each_launch:
            try:
                cupy.cuda.get_current_stream().synchronize()
            except Exception as e:
                raise RuntimeError(f"kernel {name} ({kernel_file.filename}) failed: {e}") from e


_state = {"runner": CupyRunner()}


def sync_each_launch(on):
    """Synchronise after every launch (so an error inside a kernel names it) or not:
    NANOGPT_CUDA_SYNC, read once when the runner is made (at this module's import);
    this changes it later, for this process's runner and for processes started from
    now on. Code sets it only through here: the environment variable alone would no
    longer reach a runner that exists."""
    os.environ["NANOGPT_CUDA_SYNC"] = "1" if on else "0"
    if hasattr(_state["runner"], "sync_each_launch"):
        _state["runner"].sync_each_launch = bool(on)


def use_runner(runner):
    """Launch kernels through `runner` from now on; returns the previous one."""
    previous = _state["runner"]
    _state["runner"] = runner
    return previous


_CTYPES = {}  # dtype -> its C name: every launch names a kernel by it


def ctype(dtype):
    """The C name of a float dtype, as it appears in a kernel's template arguments:
    float, double, or bf16 (common.cuh's type, laid out as ml_dtypes.bfloat16)."""
    found = _CTYPES.get(dtype)
    if found is not None:
        return found
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        found = "float"
    elif dtype == np.float64:
        found = "double"
    elif dtype.name == "bfloat16":
        found = "bf16"
    else:
        raise TypeError(f"no kernel instantiation for dtype {dtype}")
    _CTYPES[dtype] = found
    return found


def accumulate_dtype(dtype):
    """The dtype a kernel computes in for storage dtype `dtype` (acc_t in common.cuh):
    float32 for bf16, the dtype itself otherwise."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.name == "bfloat16" else dtype


def scalar(value, dtype):
    """`value` as the NumPy scalar type a kernel expects for its T parameters."""
    return np.dtype(dtype).type(value)


def ceil_div(a, b):
    return -(-a // b)


def per16(*dtypes):
    """Elements per 16-byte access of the narrowest of dtypes: common.cuh's per16 (a
    kernel's elements per thread step on its vector path)."""
    return 16 // min(np.dtype(d).itemsize for d in dtypes)


def kernel_array(a, dtype, xp):
    """`a` as a C-contiguous array of `dtype` (a copy only when it is not one already;
    that case, the common one, returns before asking the array module)."""
    if a.dtype == dtype and a.flags.c_contiguous and isinstance(a, xp.ndarray):
        return a
    return xp.ascontiguousarray(a, dtype=dtype)
