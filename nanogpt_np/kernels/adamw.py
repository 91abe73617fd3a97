"""The fused AdamW update of adamw.cu: weight decay, both moments and the
parameter, in one pass over the flat buffers. nanogpt_np/optim.py holds the
formula (`_adam_chunk`) and calls this when its buffers are CuPy arrays."""
import numpy as np

from .loader import KernelFile, ceil_div, ctype, scalar

_cu = KernelFile("adamw.cu", [f"adamw_step<{t}>" for t in ("float", "double")])
THREADS = 256
MAX_BLOCKS = 65536


def decay_bounds(spans):
    """[(start, stop)] of the decayed parameters -> sorted boundaries as int64,
    adjacent spans merged: [start0, stop0, start1, stop1, ...]."""
    bounds = []
    for start, stop in sorted(spans):
        if bounds and bounds[-1] == start:
            bounds[-1] = stop
        else:
            bounds += [start, stop]
    return np.asarray(bounds, dtype=np.int64)


def step(p, g, m, v, bounds, decay_factor, beta1, beta2, eps, step_size, bias_correction2_sqrt):
    """One AdamW step in place on 1-D arrays p, g, m, v (all the same dtype).

    bounds: decay_bounds(...) on the same device. decay_factor = 1 - lr * weight_decay.
    """
    n = p.size
    s = lambda value: scalar(value, p.dtype)  # noqa: E731
    grid = (max(1, min(ceil_div(n, THREADS), MAX_BLOCKS)),)
    _cu.launch(
        f"adamw_step<{ctype(p.dtype)}>", grid, (THREADS,),
        (p, g, m, v, np.int64(n), bounds, np.int32(bounds.size), s(decay_factor), s(beta1), s(beta2), s(eps),
         s(step_size), s(bias_correction2_sqrt)),
    )
