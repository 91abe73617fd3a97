"""NVRTC, the run-time compiler cupy.RawModule uses, called through ctypes.

NVRTC compiles without a GPU or a driver, so the CPU tests can compile every
kernel file exactly as the GPU path will: the same source text (with common.cuh
pasted in by the loader), the same options CuPy adds, and the same template name
expressions. It catches what nvcc does not: NVRTC has no host headers, and a
name expression that matches no template fails here too.

libnvrtc comes from the `nvidia-cuda-nvrtc` wheel (a test dependency on Linux
x86-64), a CUDA toolkit, or $NANOGPT_NVRTC.
"""
import ctypes
import ctypes.util
import glob
import os
import site
import sys

# What CuPy's RawModule adds to the options for NVRTC (cupy/cuda/compiler.py):
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def find_libnvrtc():
    """Path of a loadable libnvrtc, or None."""
    candidates = []
    if os.environ.get("NANOGPT_NVRTC"):
        candidates.append(os.environ["NANOGPT_NVRTC"])
    roots = list(sys.path) + site.getsitepackages() + [site.getusersitepackages()]
    for root in roots:
        candidates += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*")), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates += sorted(glob.glob(os.path.join(home, "lib*", "libnvrtc.so*")), reverse=True)
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for path in candidates:
        if "builtins" in os.path.basename(path):
            continue
        try:
            ctypes.CDLL(path)
            return path
        except OSError:
            continue
    return None


class NVRTC:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def version(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def _check(self, status, what, log=""):
        if status != 0:
            message = self.lib.nvrtcGetErrorString(status).decode()
            raise RuntimeError(f"{what}: {message}\n{log}")

    def compile(self, source, name, options, name_expressions):
        """Compile to a cubin (options with -arch=sm_XX) or PTX (compute_XX).

        Returns {name expression: lowered (mangled) name} and the binary's size.
        Raises RuntimeError with the compiler log on failure.
        """
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            for expr in name_expressions:
                self._check(self.lib.nvrtcAddNameExpression(prog, expr.encode()), f"nvrtcAddNameExpression({expr})")
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            status = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, log)
            self._check(status, f"compiling {name} with {' '.join(options)}", log.value.decode(errors="replace"))
            lowered = {}
            for expr in name_expressions:
                out = ctypes.c_char_p()
                self._check(self.lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)),
                            f"nvrtcGetLoweredName({expr})")
                lowered[expr] = out.value.decode()
            cubin = any(o.startswith("-arch=sm_") for o in options)
            get_size = self.lib.nvrtcGetCUBINSize if cubin else self.lib.nvrtcGetPTXSize
            self._check(get_size(prog, ctypes.byref(size)), "binary size")
            return lowered, size.value
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))
