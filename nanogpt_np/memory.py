"""How much memory a training run needs, computed from its config before anything is
allocated; and the largest micro-batch that fits (scripts/train.py --batch-size auto).

Per rank, with P parameters, N = B*T tokens per micro-batch, L layers, C channels,
NH heads, V vocab, p the parameter itemsize and c the activation itemsize:

    parameters            P * p
    gradients             P * p
    AdamW moments         2 * P * p / N_zero    (--zero 1 keeps 1/ranks of them)
    bf16 weight copies    2 * P                 (bf16 on the GPU only)
    logits buffer         N * V * c             (reused from step to step)
    activations           N * (L * (16 C + NH + 4) + 2 C + 1) * c
    workspace             N * 8 C * c + the optimizer's chunk temporaries

The activations are what forward keeps for backward, per block and token: the
block's input x (C), ln_1's output (C), c_attn's qkv (3C), attention's y (C) and
logsumexp (NH), the residual x1 (C), ln_2's output (C), c_fc's output (4C) and the
GELU output (4C), 16C in all, plus two LayerNorm (mean, rstd) pairs; then ln_f's
input and output (2C) and cross-entropy's logsumexp. --recompute drops the GELU
output and the two LayerNorm outputs (6C) and recomputes them in backward. The
workspace is the largest set of temporaries alive at once: in the MLP's backward
two (N, 4C) arrays, in AdamW's chunked update a few chunks per thread.

tests/test_memory.py holds the plan within 15% of the peak that tracemalloc (which
sees NumPy's allocations) measures on the CPU. On a GPU the same formula is used
with CuPy's arrays; it has not been compared with a GPU's pool (see docs/memory.md).
"""
import math
import os
from dataclasses import dataclass

import numpy as np

from .config import parameter_shapes

GIB = 2**30
HEADROOM = 0.9  # plan to use at most this share of the memory there is
OPTIMIZER_CHUNK_ELEMENTS = 1 << 18  # optim.CHUNK: elements per AdamW chunk on the CPU
OPTIMIZER_TEMPORARIES = 4  # arrays of a chunk's size alive at once in _adam_chunk, per thread


@dataclass
class MemoryPlan:
    rows: list  # [(what, bytes)], per rank
    available: int  # bytes of memory there is (free GPU memory, or available RAM)
    where: str  # where `available` came from

    @property
    def total(self):
        return sum(b for _, b in self.rows)

    def fits(self, headroom=HEADROOM):
        return self.total <= headroom * self.available

    def table(self):
        lines = [f"memory plan, per rank ({self.where}):"]
        lines += [f"  {what:<28} {b / GIB:9.3f} GiB" for what, b in self.rows]
        share = f"{100 * self.total / self.available:.0f}%" if self.available else "n/a"
        lines.append(f"  {'total':<28} {self.total / GIB:9.3f} GiB of {gib(self.available)} ({share})")
        return "\n".join(lines)


def gib(n_bytes):
    """Bytes as GiB, small amounts not rounded to zero: 22.6 GiB, 52.1 GiB, 0.01 GiB."""
    value = n_bytes / GIB
    return f"{value:.1f} GiB" if value >= 10 else f"{value:.3g} GiB"


def parameter_count(config):
    return sum(math.prod(shape) for _, shape in parameter_shapes(config))


def plan(config, B, T, param_itemsize=4, compute_itemsize=4, mixed=False, zero_ranks=1, recompute=False,
         threads=1, available=None, where=""):
    """MemoryPlan of one rank's training step (see the module docstring)."""
    P, N, L, C = parameter_count(config), B * T, config.n_layer, config.n_embd
    kept_per_block = (10 if recompute else 16) * C + config.n_head + 4
    rows = [
        ("parameters", P * param_itemsize),
        ("gradients", P * param_itemsize),
        ("AdamW moments" + (f" (1/{zero_ranks}, --zero 1)" if zero_ranks > 1 else ""),
         2 * math.ceil(P / zero_ranks) * param_itemsize),
    ]
    if mixed:
        rows.append(("bf16 weight copies", 2 * P))
    rows += [
        ("logits buffer", N * config.vocab_size * compute_itemsize),
        ("activations" + (" (--recompute)" if recompute else ""),
         N * (L * kept_per_block + 2 * C + 1) * compute_itemsize),
        ("workspace", N * 8 * C * compute_itemsize
         + threads * OPTIMIZER_TEMPORARIES * OPTIMIZER_CHUNK_ELEMENTS * param_itemsize),
    ]
    return MemoryPlan(rows, int(available or 0), where)


def training_plan(model_config, train_cfg, B, ranks, precision, available, threads=1):
    """plan() for a run of train.py's TrainConfig at micro-batch B on `ranks` ranks:
    precision "float32", "float64" or "bf16" (float32 parameters, bf16 activations
    and weight copies); available is available_memory()'s (bytes, description)."""
    mixed = precision == "bf16"
    param_itemsize = 4 if mixed else np.dtype(precision).itemsize
    return plan(model_config, B, train_cfg.block_size, param_itemsize=param_itemsize,
                compute_itemsize=2 if mixed else param_itemsize, mixed=mixed,
                zero_ranks=ranks if train_cfg.zero else 1, recompute=train_cfg.recompute, threads=threads,
                available=available[0], where=available[1])


def available_memory(xp=None, cap_gib=None):
    """(bytes, description): cap_gib if given; else the GPU's free memory (with what
    CuPy's pool holds already) for CuPy; else MemAvailable from /proc/meminfo."""
    if cap_gib:
        return int(cap_gib * GIB), f"--memory-gib {cap_gib:g}"
    if xp is not None and xp.__name__ == "cupy":
        free, total = xp.cuda.runtime.memGetInfo()
        pool = xp.get_default_memory_pool()
        return int(free + pool.free_bytes()), f"GPU free memory of {total / GIB:.0f} GiB"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "available RAM"
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(pages), "free RAM"


def batch_candidates(tokens_per_step, T, ranks):
    """Micro-batch sizes B whose B*T*ranks divides the tokens per step, largest first."""
    if tokens_per_step % (T * ranks):
        return []
    rows = tokens_per_step // (T * ranks)  # sequences per rank per step
    return [b for b in range(rows, 0, -1) if rows % b == 0]


def auto_batch_size(config, T, tokens_per_step, ranks, plan_for):
    """The largest B of batch_candidates whose plan_for(B) fits -> (B, that plan), or
    (None, the plan of B=1) when not even B=1 fits."""
    return largest_fitting(batch_candidates(tokens_per_step, T, ranks), plan_for)


def largest_fitting(candidates, plan_for):
    """The first B of `candidates` (largest first) whose plan_for(B) fits -> (B, plan),
    or (None, the plan of the last candidate, else of B=1)."""
    candidates = list(candidates)
    for B in candidates:
        p = plan_for(B)
        if p.fits():
            return B, p
    return None, plan_for(candidates[-1] if candidates else 1)


def measure_peak(config, B, T, recompute=False, steps=2, seed=0):
    """(peak bytes, median seconds per step) of `steps` float32 training steps on the
    CPU, the peak as tracemalloc sees it (NumPy reports its array allocations to it):
    what plan() is held to."""
    import time
    import tracemalloc

    import numpy as np

    from .model import GPT
    from .optim import AdamW, clip_grad_norm

    rng = np.random.default_rng(seed)
    idx, targets = rng.integers(0, config.vocab_size, (B, T)), rng.integers(0, config.vocab_size, (B, T))
    tracemalloc.start()
    try:
        model = GPT(config, dtype=np.float32, seed=seed)
        model.recompute = recompute
        opt = AdamW(model.parameters())
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model.zero_grad()
            model.forward(idx, targets)
            model.backward()
            clip_grad_norm(model.grads, 1.0)
            opt.step(model.grads)
            times.append(time.perf_counter() - t0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, float(np.median(times))
