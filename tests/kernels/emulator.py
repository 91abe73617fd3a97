"""Run the package's CUDA kernels on the CPU: build the emulator library with g++
and launch through it in place of CuPy (loader.use_runner).

The library is built from tests/kernels/cuda_emulation.h, every kernels/*.cu file
(the very source NVRTC compiles on the GPU) and a registry generated from the
KernelFile name lists, so every instantiation Python can launch exists here.
Launches take NumPy arrays where the GPU takes CuPy arrays. Each launch checks
every argument against the kernel's C signature: an array's dtype against the
pointer type, and each scalar's exact NumPy type against the parameter type (a
Python int or float, or an np.float64 where the kernel takes float, is an error).

Every array is handed to the kernel inside a larger buffer with guard zones on
both sides: NaN for float arrays (a read past either end poisons the result the
tests compare) and a sentinel for int arrays, different for every argument (so a
NaN read from one array's guard and written into another's is still caught). After the launch the guards must be
intact (a write past either end is an error naming the argument), and the
interior is copied back into the caller's array.
"""
import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np

from nanogpt_np.backend import bfloat16, data_pointer
from nanogpt_np.kernels import gemm, loader

HERE = Path(__file__).resolve().parent
POINTER_DTYPES = {"F": np.float32, "D": np.float64, "I": np.int32, "Q": np.int64, "H": bfloat16()}
GUARD = 256  # elements of guard zone on each side of every array argument
ALIGN = 16  # the copies keep their arrays' addresses modulo this (a 16-byte vector access's alignment)
SCALAR_TYPES = {"f": (np.float32, ctypes.c_float), "d": (np.float64, ctypes.c_double),
                "i": (np.int32, ctypes.c_int32), "q": (np.int64, ctypes.c_int64)}


def generated_source(kernel_dir=None, files=None):
    """The C++ translation unit: the emulator, the kernel files (from kernel_dir,
    the package's kernels/ folder unless a test hands a modified copy; all of
    them unless `files` names some) and the registry of every instantiation
    Python can launch from them."""
    import nanogpt_np.kernels  # noqa: F401  (imports every wrapper, so ALL_FILES is complete)

    kernel_dir = Path(kernel_dir) if kernel_dir else loader.KERNEL_DIR
    chosen = [kf for kf in loader.ALL_FILES if files is None or kf.filename in files]
    lines = ['#include "cuda_emulation.h"']
    lines += [f'#include "{kernel_dir / kf.filename}"' for kf in chosen]
    # common.cuh's bf16 (2 bytes, ml_dtypes.bfloat16's layout) as an argument type
    lines.append("template <> struct EmuCode<bf16> { static constexpr char value = 'h'; };")
    lines.append("const std::map<std::string, EmuEntry>& emu_registry() {")
    lines.append("    static const std::map<std::string, EmuEntry> registry = {")
    for kf in chosen:
        lines += [f'        {{"{name}", emu_entry(&{name})}},' for name in kf.names]
    lines += ["    };", "    return registry;", "}"]
    return "\n".join(lines) + "\n"


# -fsanitize=thread instruments every load and store with a call to the race
# detector's hooks in cuda_emulation.h (the library is linked without
# ThreadSanitizer's runtime); -g gives addr2line the source lines a race report
# names. Hidden visibility and no STB_GNU_UNIQUE symbols keep each library's
# __shared__ arrays its own when a test loads a second (modified) library.
COMPILE_FLAGS = ("-std=c++17", "-O1", "-g", "-fPIC", "-pthread", "-w", "-fsanitize=thread",
                 "--param", "tsan-instrument-func-entry-exit=0", "-fvisibility=hidden", "-fno-gnu-unique",
                 "-U_FORTIFY_SOURCE")  # cuda_emulation.h: its fibers longjmp between stacks
# The same kernels without the race detector, optimised: for the model-level tests
# (a whole step, gpu_check's dry run), which run kernels the kernel-level tests have
# already run under the detector at awkward shapes, and pay for it only in time.
FAST_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-pthread", "-w", "-fvisibility=hidden", "-fno-gnu-unique",
              "-U_FORTIFY_SOURCE")


def build(directory, extra_flags=(), replace=None, files=None, race_detector=True):
    """Compile the emulator library into `directory`; returns its path.
    replace: {kernel file name: new text}, for tests that break a kernel on
    purpose (the library is then built from a modified copy of kernels/);
    files: the .cu files to build (default all), to keep such builds short;
    race_detector: False builds FAST_FLAGS (no race reports, several times faster)."""
    directory = Path(directory)
    kernel_dir = None
    if replace:
        kernel_dir = directory / "kernels"
        kernel_dir.mkdir(exist_ok=True)
        for path in loader.KERNEL_DIR.iterdir():
            if path.suffix in (".cu", ".cuh"):
                (kernel_dir / path.name).write_text(replace.get(path.name, path.read_text()))
    folder = kernel_dir or loader.KERNEL_DIR
    texts = "".join(path.read_text() for path in sorted(folder.iterdir()) if path.suffix in (".cu", ".cuh"))
    flags = COMPILE_FLAGS if race_detector else FAST_FLAGS
    return build_source(directory, generated_source(kernel_dir, files), extra_flags, texts, flags)


def build_source(directory, source, extra_flags=(), included="", flags=COMPILE_FLAGS):
    """Compile one C++ translation unit that includes cuda_emulation.h (and
    defines emu_registry) into an emulator library in `directory`; returns its
    path. `included`: the text of the files it includes, which the library's
    name (a digest, so a rebuilt source gets a new library) depends on too."""
    gxx = shutil.which("g++")
    if gxx is None:
        raise RuntimeError("g++ not found")
    directory = Path(directory)
    inputs = source + included + (HERE / "cuda_emulation.h").read_text() + " ".join(tuple(flags) + tuple(extra_flags))
    digest = hashlib.sha256(inputs.encode()).hexdigest()[:16]
    lib = directory / f"libcuda_emulation_{digest}.so"
    if not lib.exists():
        cpp, obj = directory / f"emulation_{digest}.cpp", directory / f"emulation_{digest}.o"
        cpp.write_text(source)
        steps = ([gxx, *flags, f"-I{HERE}", *extra_flags, "-c", str(cpp), "-o", str(obj)],
                 [gxx, "-shared", "-pthread", str(obj), "-o", str(lib)])
        for cmd in steps:
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"building the CUDA emulator failed:\n{result.stderr[-8000:]}")
    return lib


class EmulatedRunner:
    """A loader runner that executes kernels on CPU threads, on NumPy arrays."""

    def __init__(self, lib_path):
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.emu_launch.restype = ctypes.c_int
        self.launches = []  # names, in order, for tests that check which kernels ran

    def signature(self, name):
        out = ctypes.create_string_buffer(256)
        if self.lib.emu_signature(name.encode(), out, 256) != 0:
            raise KeyError(f"the emulator has no kernel {name!r}")
        return out.value.decode()

    def launch(self, kernel_file, name, grid, block, args, shared_mem):
        sig = self.signature(name)
        if len(sig) != len(args):
            raise TypeError(f"{name} takes {len(sig)} arguments, got {len(args)}")
        holders, guarded = [], []
        params = (ctypes.c_void_p * len(args))()
        for k, (code, a) in enumerate(zip(sig, args)):
            if code.isupper():
                want = POINTER_DTYPES[code]
                if not isinstance(a, np.ndarray):
                    raise TypeError(f"{name}: argument {k} must be an array, got {type(a).__name__}")
                if a.dtype != want:
                    raise TypeError(f"{name}: argument {k} is a {a.dtype} array but the kernel reads {np.dtype(want)}")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{name}: argument {k} is not C-contiguous")
                padded = _guarded_copy(a, k)
                guarded.append((k, a, padded))
                holder = ctypes.c_void_p(padded.ctypes.data + GUARD * a.itemsize)
            else:
                want, ctype = SCALAR_TYPES[code]
                if type(a) is not want:
                    raise TypeError(f"{name}: argument {k} is {type(a).__name__} but the kernel takes {want.__name__}")
                holder = ctype(a)
            holders.append(holder)
            params[k] = ctypes.cast(ctypes.pointer(holder), ctypes.c_void_p)
        grid3 = (tuple(grid) + (1, 1))[:3]
        block3 = (tuple(block) + (1, 1))[:3]
        if min(grid3) < 1 or min(block3) < 1:
            raise ValueError(f"{name}: empty launch grid={grid3} block={block3}")
        if block3[0] * block3[1] * block3[2] > 1024 or max(grid3[1:]) > 65535:
            raise ValueError(f"{name}: launch exceeds CUDA limits grid={grid3} block={block3}")
        if shared_mem:
            raise ValueError(f"{name}: dynamic shared memory is not emulated")
        err = ctypes.create_string_buffer(8192)
        self.launches.append(name)
        rc = self.lib.emu_launch(name.encode(), *[ctypes.c_uint(v) for v in grid3 + block3], params, err, 8192)
        if rc != 0:
            raise RuntimeError(err.value.decode())
        for k, a, padded in guarded:
            guard = _guarded_copy(np.zeros(0, a.dtype), k)
            if not (_bits(padded[:GUARD]) == _bits(guard[:GUARD])).all() or \
                    not (_bits(padded[GUARD + a.size:]) == _bits(guard[GUARD:])).all():
                raise RuntimeError(f"{name}: wrote outside argument {k} (shape {a.shape})")
            a.reshape(-1)[...] = padded[GUARD:GUARD + a.size]


def _guarded_copy(a, k):
    """a's values, flattened, between two guard zones of GUARD elements that
    depend on the argument index k. The copy starts at the same address modulo 16
    as `a` (a view that starts mid-vector stays misaligned), so the kernels' vector
    accesses (common.cuh's load_pack) meet the alignment the GPU would give them."""
    nbytes = (a.size + 2 * GUARD) * a.itemsize
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    shift = (a.ctypes.data - GUARD * a.itemsize - raw.ctypes.data) % ALIGN
    padded = raw[shift:shift + nbytes].view(a.dtype)
    if a.dtype.kind == "f":  # a quiet NaN whose payload names the argument
        bits = padded.view(np.uint32 if a.itemsize == 4 else np.uint64)
        bits[...] = (0x7FC00000 if a.itemsize == 4 else 0x7FF8000000000000) | (0x5A00 + k)
    elif a.dtype.name == "bfloat16":  # a bf16 quiet NaN, payload k
        padded.view(np.uint16)[...] = 0x7FC0 | (k % 64)
    else:
        padded[...] = np.iinfo(a.dtype).min + 7 + k
    padded[GUARD:GUARD + a.size] = a.reshape(-1)
    return padded


def placed(a, misaligned):
    """A copy of a in a C-contiguous view that starts at a 16-byte boundary, or one
    element past one (so a kernel's 16-byte accesses must take the scalar path): the
    launches keep each argument's address modulo ALIGN (_guarded_copy)."""
    buf = np.empty(a.size + 2 * ALIGN, dtype=a.dtype)
    start = (-buf.ctypes.data % ALIGN) // a.itemsize + (1 if misaligned else 0)
    view = buf[start:start + a.size].reshape(a.shape)
    view[...] = a
    assert (view.ctypes.data % ALIGN != 0) == misaligned
    return view


def _bits(a):
    return a.view(np.uint8)


class EmulatedCupyRunner(EmulatedRunner):
    """EmulatedRunner with CupyRunner's `function` (which compiles on the GPU): here it
    checks the instantiation exists. For dry runs that construct loader.CupyRunner()."""

    lib_path = None

    def __init__(self):
        super().__init__(self.lib_path)

    def function(self, kernel_file, name):
        return self.signature(name)


class NumpyCublas:
    """cublasGemmEx's contract, computed with NumPy: a stand-in for
    kernels.gemm.CublasRunner. It reads the operands and writes the result only
    through the pointers and leading dimensions it is given, as cuBLAS would
    (column-major), and checks that every element it touches lies inside the
    array the pointer came from; so the row-major to column-major bookkeeping of
    kernels/gemm.py is tested for real. Products are taken in float64 and rounded
    once to the output dtype (cuBLAS accumulates bf16 and float32 in float32)."""

    TYPES = {gemm.CUDA_R_32F: np.dtype(np.float32), gemm.CUDA_R_64F: np.dtype(np.float64),
             gemm.CUDA_R_16BF: bfloat16()}

    def __init__(self):
        self.calls = []  # (transa, transb, m, n, k, lda, ldb, ldc, beta), for tests

    def _matrix(self, arr, cuda_type, ld, rows, cols):
        """The column-major (rows, cols) matrix with leading dimension ld at arr's address."""
        dtype = self.TYPES[cuda_type]
        if np.dtype(arr.dtype) != dtype:
            raise TypeError(f"gemmEx: a {arr.dtype} array passed as cuda type {cuda_type}")
        if ld < max(1, rows):
            raise ValueError(f"gemmEx: leading dimension {ld} < rows {rows}")
        extent = ((cols - 1) * ld + rows) * dtype.itemsize
        if extent > arr.nbytes:
            raise ValueError(f"gemmEx: a {rows}x{cols} matrix with ld {ld} reads past an array of {arr.nbytes} bytes")
        raw = (ctypes.c_uint8 * extent).from_address(data_pointer(arr))
        flat = np.frombuffer(raw, dtype=np.uint8).view(dtype)
        return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols), strides=(dtype.itemsize, ld * dtype.itemsize))

    def gemm_ex(self, transa, transb, m, n, k, alpha, A, a_type, lda, B, b_type, ldb, beta, C, c_type, ldc,
                compute):
        self.calls.append((transa, transb, m, n, k, lda, ldb, ldc, float(beta)))
        a = self._matrix(A, a_type, lda, *((m, k) if transa == gemm.OP_N else (k, m)))
        b = self._matrix(B, b_type, ldb, *((k, n) if transb == gemm.OP_N else (n, k)))
        c = self._matrix(C, c_type, ldc, m, n)
        op_a = a if transa == gemm.OP_N else a.T  # (m, k)
        op_b = b if transb == gemm.OP_N else b.T  # (k, n)
        result = float(alpha) * (op_a.astype(np.float64) @ op_b.astype(np.float64))
        if float(beta) != 0.0:
            result += float(beta) * c.astype(np.float64)
        c[...] = result.astype(c.dtype)
