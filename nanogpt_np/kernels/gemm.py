"""Matrix products through cuBLAS's gemmEx: bf16 operands with float32 accumulation.

    matmul(a, b, out, trans_a=False, trans_b=False, beta=0.0)
        out = op(a) @ op(b) + beta * out,   op(m) = m.T if trans_m else m

All arrays are 2-D and C-contiguous (row-major); `op(a)` is (M, K), `op(b)` is
(K, N), `out` is (M, N). A transposed operand is read in place, never copied.

Why not `cupy.matmul`? It handles 2-D bf16 through the same gemmEx, but its
output always has the inputs' dtype, and its batched bf16 path is broken. The
mixed-precision step needs two things it cannot give: a weight gradient computed
from bf16 operands but written (or, with beta=1, *added*) straight into the
float32 gradient buffer, and the fp32 accumulation spelled out rather than left
to a default. Calling gemmEx directly also costs far less host time per call.

Types: a and b share a dtype (bf16, float32 or float64); out has that dtype or,
for bf16 operands, float32. The accumulation is float32 for bf16 and float32
operands (CUBLAS_COMPUTE_32F, or _FAST_TF32 when backend.set_tf32(True)), float64
for float64.

cuBLAS is column-major. A row-major (R, C) array is, read column-major, its own
transpose (C, R) with leading dimension C. So the row-major product
out = op(a) @ op(b) is computed as the column-major out.T = op(b).T @ op(a).T:
b is cuBLAS's first operand and a its second, and the shapes swap (m = N, n = M).
`gemm_arguments` does this bookkeeping; the CPU tests run it against a NumPy
model of gemmEx that reads memory through the same pointers and leading
dimensions (tests/kernels/emulator.py), so the mapping is checked without a GPU.
"""
import ctypes

import numpy as np

from ..backend import array_module, data_pointer, tf32_enabled

# cuBLAS and CUDA enum values (stable parts of their C ABIs)
OP_N, OP_T = 0, 1
CUDA_R_32F, CUDA_R_64F, CUDA_R_16BF = 0, 1, 14
COMPUTE_32F, COMPUTE_64F, COMPUTE_32F_FAST_TF32 = 68, 70, 77
GEMM_DEFAULT_TENSOR_OP = 99  # "let cuBLAS pick, tensor cores allowed" (the same as DEFAULT since CUDA 11)


_CUDA_TYPES = {}  # dtype -> its cudaDataType: looked up on every gemm, worked out once


def cuda_type(dtype):
    found = _CUDA_TYPES.get(dtype)
    if found is not None:
        return found
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        found = CUDA_R_32F
    elif dtype == np.float64:
        found = CUDA_R_64F
    elif dtype.name == "bfloat16":
        found = CUDA_R_16BF
    else:
        raise TypeError(f"no cuBLAS gemm for dtype {dtype}")
    _CUDA_TYPES[dtype] = found
    return found


def compute_type(in_dtype):
    kind = cuda_type(in_dtype)
    if kind == CUDA_R_64F:
        return COMPUTE_64F
    if kind == CUDA_R_32F and tf32_enabled():
        return COMPUTE_32F_FAST_TF32
    return COMPUTE_32F


def gemm_arguments(a, b, out, trans_a, trans_b):
    """The column-major gemmEx arguments (transa, transb, m, n, k, first, lda,
    second, ldb, ldc) for the row-major out = op(a) @ op(b). Checks the shapes."""
    for name, arr in (("a", a), ("b", b), ("out", out)):
        if arr.ndim != 2 or not arr.flags.c_contiguous:
            raise ValueError(f"gemm: {name} must be a 2-D C-contiguous array, got shape {arr.shape}")
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    K2, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if K != K2 or out.shape != (M, N):
        raise ValueError(f"gemm: op(a) {M}x{K} @ op(b) {K2}x{N} does not give out {out.shape}")
    # column-major: out.T (N x M) = op(b).T (N x K) @ op(a).T (K x M); each operand's
    # leading dimension is its stored row length
    return (OP_T if trans_b else OP_N, OP_T if trans_a else OP_N, N, M, K,
            b, b.shape[1], a, a.shape[1], N)


def matmul(a, b, out=None, trans_a=False, trans_b=False, beta=0.0, out_dtype=None):
    """out = op(a) @ op(b) + beta * out (see the module docstring); returns out.

    out=None allocates it, in out_dtype (default: a's dtype). beta != 0 needs out."""
    if a.dtype != b.dtype:
        raise TypeError(f"gemm: operands differ in dtype ({a.dtype}, {b.dtype})")
    if out is None:
        if beta:
            raise ValueError("gemm: beta != 0 adds into `out`, so pass one")
        M = a.shape[1] if trans_a else a.shape[0]
        N = b.shape[0] if trans_b else b.shape[1]
        out = array_module(a, b).empty((M, N), dtype=a.dtype if out_dtype is None else out_dtype)
    in_type, out_type = cuda_type(a.dtype), cuda_type(out.dtype)
    if out_type != in_type and not (out_type == CUDA_R_32F and in_type == CUDA_R_16BF):
        raise TypeError(f"gemm: {a.dtype} operands cannot write a {out.dtype} result")
    transa, transb, m, n, k, first, lda, second, ldb, ldc = gemm_arguments(a, b, out, trans_a, trans_b)
    if m == 0 or n == 0:
        return out
    if k == 0:  # cuBLAS would leave out alone; the product of empty operands is zero
        out[...] = 0 if not beta else out * beta
        return out
    scalar = np.float64 if in_type == CUDA_R_64F else np.float32  # alpha, beta as the compute type
    _state["runner"].gemm_ex(transa, transb, m, n, k, scalar(1.0), first, in_type, lda, second, in_type, ldb,
                             scalar(beta), out, out_type, ldc, compute_type(a.dtype))
    return out


class CublasRunner:
    """Calls cublasGemmEx through the project's own cuBLAS handle: ctypes into the
    libcublas that CuPy's wheel loaded, one handle per device, its stream set only
    when the current stream changes, its workspace a buffer allocated once.

    Why not CuPy's binding (cupy_backends.cuda.libs.cublas) on CuPy's handle? That
    binding calls cublasSetStream before every call, and CuPy 14 refuses setStream
    while a stream captures (NotImplementedError), so no gemm could be part of a CUDA
    graph. cuBLAS itself is fine with capture given a fixed workspace (without one it
    may allocate inside the capture). `lib`: the library object (tests pass a
    stand-in with the same four functions)."""

    WORKSPACE_BYTES = 32 << 20  # what PyTorch gives cuBLAS on Hopper

    def __init__(self, lib=None):
        self._lib = lib
        self._handles = {}  # device -> [handle, stream set on it, workspace]

    def _library(self):
        if self._lib is None:
            self._lib = load_cublas()
        return self._lib

    def _handle(self):
        import cupy

        device = cupy.cuda.runtime.getDevice()
        entry = self._handles.get(device)
        if entry is None:
            lib = self._library()
            handle = ctypes.c_void_p()
            _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
            workspace = cupy.empty(self.WORKSPACE_BYTES, dtype=np.uint8)
            _check(lib.cublasSetWorkspace_v2(handle, ctypes.c_void_p(data_pointer(workspace)),
                                             ctypes.c_size_t(workspace.nbytes)), "cublasSetWorkspace")
            entry = self._handles[device] = [handle, None, workspace]  # pointer mode: host, the default
        stream = cupy.cuda.get_current_stream().ptr
        if entry[1] != stream:  # set once per stream change, not before every call
            _check(self._library().cublasSetStream_v2(entry[0], ctypes.c_void_p(stream)), "cublasSetStream")
            entry[1] = stream
        return entry[0]

    def gemm_ex(self, transa, transb, m, n, k, alpha, A, a_type, lda, B, b_type, ldb, beta, C, c_type, ldc,
                compute):
        handle = self._handle()
        i = ctypes.c_int
        _check(self._library().cublasGemmEx(
            handle, i(transa), i(transb), i(m), i(n), i(k), _host_scalar(alpha),
            ctypes.c_void_p(data_pointer(A)), i(a_type), i(lda), ctypes.c_void_p(data_pointer(B)), i(b_type), i(ldb),
            _host_scalar(beta), ctypes.c_void_p(data_pointer(C)), i(c_type), i(ldc), i(compute),
            i(GEMM_DEFAULT_TENSOR_OP)), "cublasGemmEx")


_HOST_SCALARS = {}  # (type, value) -> (host array, a pointer to it): alpha and beta are 0 or 1


def _host_scalar(value):
    """A pointer to a host copy of `value` (np.float32/np.float64) that outlives the
    call (cuBLAS reads alpha and beta through pointers, host ones by default); made
    once per value, since every gemm passes the same few."""
    key = (type(value), float(value))
    found = _HOST_SCALARS.get(key)
    if found is None:
        host = np.array(value)
        found = _HOST_SCALARS[key] = (host, ctypes.c_void_p(host.ctypes.data))
    return found[1]


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def load_cublas():
    """The libcublas CuPy uses, through ctypes: CuPy's binding is imported first so the
    library is loaded, then found by its path in this process's memory map (the
    wheel's own copy, not whichever one the loader's search path would find first)."""
    try:
        from cupy_backends.cuda.libs import cublas  # noqa: F401  (loads libcublas)
    except ImportError:
        from cupy.cuda import cublas  # noqa: F401
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if "libcublas.so" in line and "libcublasLt" not in line]
    except OSError:
        pass
    for name in paths[:1] + ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("libcublas was not found in this process or on the library path; reinstall CuPy's wheel "
                       "(cupy-cuda13x pulls in nvidia-cublas) or set LD_LIBRARY_PATH to CUDA's lib64")


_state = {"runner": CublasRunner()}


def use_runner(runner):
    """Send gemm calls to `runner` (an object with gemm_ex) from now on; returns the previous one."""
    previous = _state["runner"]
    _state["runner"] = runner
    return previous
