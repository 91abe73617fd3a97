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

from nanogpt_np.kernels import loader

HERE = Path(__file__).resolve().parent
POINTER_DTYPES = {"F": np.float32, "D": np.float64, "I": np.int32, "Q": np.int64}
GUARD = 256  # elements of guard zone on each side of every array argument
SCALAR_TYPES = {"f": (np.float32, ctypes.c_float), "d": (np.float64, ctypes.c_double),
                "i": (np.int32, ctypes.c_int32), "q": (np.int64, ctypes.c_int64)}


def generated_source():
    import nanogpt_np.kernels  # noqa: F401  (imports every wrapper, so ALL_FILES is complete)

    lines = ['#include "cuda_emulation.h"']
    lines += [f'#include "{kf.path}"' for kf in loader.ALL_FILES]
    lines.append("const std::map<std::string, EmuEntry>& emu_registry() {")
    lines.append("    static const std::map<std::string, EmuEntry> registry = {")
    for kf in loader.ALL_FILES:
        lines += [f'        {{"{name}", emu_entry(&{name})}},' for name in kf.names]
    lines += ["    };", "    return registry;", "}"]
    return "\n".join(lines) + "\n"


def build(directory, extra_flags=()):
    """Compile the emulator library into `directory`; returns its path."""
    gxx = shutil.which("g++")
    if gxx is None:
        raise RuntimeError("g++ not found")
    source = generated_source()
    inputs = source + (HERE / "cuda_emulation.h").read_text()
    inputs += "".join(kf.source() for kf in loader.ALL_FILES) + " ".join(extra_flags)
    digest = hashlib.sha256(inputs.encode()).hexdigest()[:16]
    directory = Path(directory)
    lib = directory / f"libcuda_emulation_{digest}.so"
    if not lib.exists():
        cpp = directory / f"emulation_{digest}.cpp"
        cpp.write_text(source)
        cmd = [gxx, "-std=c++17", "-O1", "-g0", "-shared", "-fPIC", "-pthread", "-w", f"-I{HERE}",
               *extra_flags, str(cpp), "-o", str(lib)]
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
        err = ctypes.create_string_buffer(2048)
        self.launches.append(name)
        rc = self.lib.emu_launch(name.encode(), *[ctypes.c_uint(v) for v in grid3 + block3], params, err, 2048)
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
    depend on the argument index k."""
    padded = np.empty(a.size + 2 * GUARD, dtype=a.dtype)
    if a.dtype.kind == "f":  # a quiet NaN whose payload names the argument
        bits = padded.view(np.uint32 if a.itemsize == 4 else np.uint64)
        bits[...] = (0x7FC00000 if a.itemsize == 4 else 0x7FF8000000000000) | (0x5A00 + k)
    else:
        padded[...] = np.iinfo(a.dtype).min + 7 + k
    padded[GUARD:GUARD + a.size] = a.reshape(-1)
    return padded


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
