"""Section 0: the card, the libraries, NVRTC compiling every kernel, the mma layout."""
import time

import numpy as np

from nanogpt_np import kernels

from . import settings
from .table import bf16, compare, record, rel_err


# ---- 0. where we are --------------------------------------------------------------------

def environment():
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    text = (f"{name}, cc {props['major']}.{props['minor']}, {props['totalGlobalMem'] / 2**30:.0f} GiB; "
            f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
            f"NVRTC {'.'.join(map(str, cupy.cuda.nvrtc.getVersion()))}")
    try:
        import ml_dtypes

        text += f"; ml_dtypes {ml_dtypes.__version__}"
    except ImportError:
        text += "; NO ml_dtypes (bf16 rows will fail)"
    text += "; " + (settings.TWIN.describe() if settings.TWIN else "no PyTorch reference wired in")
    return dict(result=text, limit="", ok=None)


def device_name():
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else name


def compile_all():
    from nanogpt_np.kernels import loader

    runner, t0 = loader.CupyRunner(), time.time()
    n = 0
    for kf in loader.ALL_FILES:
        for name in kf.names:
            runner.function(kf, name)
            n += 1
    return dict(result=f"{n} kernels from {len(loader.ALL_FILES)} files compiled in {time.time() - t0:.1f}s",
                limit="", ok=True)


def mma_layout():
    """One tensor-core mma through the fragment layout the bf16 attention assumes."""
    import cupy as cp

    rng = np.random.default_rng(0)
    a = np.asarray(rng.standard_normal((16, 16)), dtype=np.float32).astype(bf16())
    b = np.asarray(rng.standard_normal((16, 8)), dtype=np.float32).astype(bf16())
    d = kernels.attention.mma_layout_check(cp.asarray(a), cp.asarray(b))
    return compare({"D": rel_err(d, a.astype(np.float64) @ b.astype(np.float64))}, 1e-5)


def section_environment():
    record("0", "environment", environment)
    record("0", "NVRTC compiles every kernel", compile_all)
    record("0", "mma.sync m16n8k16 bf16 fragment layout", mma_layout)
