"""The fused AdamW update of adamw.cu: weight decay, both moments and the
parameter, in one pass over the flat buffers. nanogpt_np/optim.py holds the
formula (`_adam_chunk`) and calls this when its buffers are CuPy arrays."""
import numpy as np

from .loader import KernelFile, ceil_div, ctype, per16, scalar

_cu = KernelFile("adamw.cu", [f"adamw_step<{t}>" for t in ("float", "double")]
                 + [f"adamw_apply<{t}, {c}>" for t, c in (("float", "float"), ("double", "double"), ("float", "bf16"))])
HYPER = ("decay_factor", "beta1", "beta2", "eps", "step_size", "bias_correction2_sqrt", "max_norm", "grad_scale")
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


def runs_table(runs):
    """[(start, stop, decay)] (optim.decay_runs) -> int64 rows for adamw_apply."""
    return np.asarray([(a, b, int(d)) for a, b, d in runs], dtype=np.int64).reshape(-1)


def hyperparameters(step_count, lr, betas, eps, weight_decay, max_norm, grad_scale):
    """The float64 values adamw_apply reads from device memory (HYPER's order), for
    step `step_count` (1 for the first update)."""
    import math

    beta1, beta2 = betas
    values = dict(decay_factor=1 - lr * weight_decay, beta1=beta1, beta2=beta2, eps=eps,
                  step_size=lr / (1 - beta1**step_count), bias_correction2_sqrt=math.sqrt(1 - beta2**step_count),
                  max_norm=max_norm, grad_scale=grad_scale)
    return np.array([values[k] for k in HYPER], dtype=np.float64)


def apply(p, g, m, v, runs, n_runs, longest, hyper, report, copy=None):
    """AdamW with clipping folded in, everything per-step read from device memory
    (hyper, report: see adamw.cu). runs: runs_table(...) on the device, n_runs rows,
    the longest `longest` elements. copy: the bf16 weights to write (None: none)."""
    blocks = max(1, min(ceil_div(longest, THREADS * per16(p.dtype)), 1024))  # threads take per16 elements a step
    write = copy is not None
    copy = g if copy is None else copy  # not written (write_copy 0); g is of the right type and only read
    _cu.launch(f"adamw_apply<{ctype(p.dtype)}, {ctype(copy.dtype)}>", (blocks, n_runs), (THREADS,),
               (p, g, m, v, copy, np.int32(write), runs, hyper, report))
