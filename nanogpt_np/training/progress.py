"""What a run prints and logs (ProgressMixin of Trainer): the step line with tokens/s,
MFU and ETA, log.txt, and the FLOP count MFU divides by."""
import math
import time

import numpy as np

from ..backend import is_bfloat16
from ..config import parameter_shapes
from .errors import TrainingStopped


def flops_per_token(config):
    """6N + 6*L*C*T training FLOPs per token; N leaves out wpe (a lookup, no matmul)."""
    n = sum(math.prod(s) for _, s in parameter_shapes(config)) - config.block_size * config.n_embd
    return 6 * n + 6 * config.n_layer * config.n_embd * config.block_size


def synchronize(xp):
    """Wait for queued GPU work, so step times are real (nothing to do for NumPy)."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def measure_peak_flops(xp, dtype, n=1024, repeats=10):
    """FLOP/s of an n x n matmul on this device, the best of `repeats` runs (the best,
    because a busy machine only ever slows a run down; still, a machine busy with
    other work at start-up gives a low peak, and then MFU reads high)."""
    rng = np.random.default_rng(0)
    if xp is np:
        a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
        product = np.matmul
    else:  # through the gemm the model uses (for bf16: bf16 operands, float32 accumulation)
        from .kernels import fused, gemm

        low = is_bfloat16(dtype)
        a, b = (xp.asarray(rng.standard_normal((n, n)), dtype=np.float32 if low else dtype) for _ in range(2))
        if low:
            a, b = fused.cast(a, dtype), fused.cast(b, dtype)
        product = gemm.matmul
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up BLAS / cuBLAS
        t0 = time.perf_counter()
        product(a, b)
        synchronize(xp)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def say(*args):
    """print, flushed at once, so progress shows through pipes and `tee`."""
    print(*args, flush=True)


def format_seconds(s):
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressMixin:
    """Trainer's output: only rank 0 prints and writes log.txt."""

    def append_log(self, line):
        if self.dist.is_master:
            try:
                with open(self.log_path, "a") as f:
                    f.write(line + "\n")
            except OSError as e:
                raise TrainingStopped(f"cannot write {self.log_path}: {e.strerror or e}; free disk space "
                                      "or make --log-dir writable, then --resume") from e

    def announce(self):
        cfg, m = self.cfg, self.model
        tokens = cfg.total_batch_size
        self.flops_per_step = flops_per_token(self.model_config) * tokens
        if cfg.peak_tflops:
            self.peak, source = cfg.peak_tflops * 1e12, "--peak-tflops"
        else:
            self.peak = measure_peak_flops(self.xp, m.compute_dtype)
            source = f"measured {m.compute_dtype.name} 1024^3 matmul on this {cfg.backend} device"
        self.log(f"model: {m}")
        if getattr(self, "auto_batch", False):
            self.log(f"--batch-size auto: B={cfg.batch_size}, {self.accum} micro-step(s) x {self.dist.world_size} "
                     f"rank(s) make the {cfg.total_batch_size:,} tokens per step")
        self.log(self.memory_plan(cfg.batch_size).table())
        self.log(f"data: {self.data_dir} | {self.dist.world_size} rank(s) x B={cfg.batch_size} x "
                 f"T={cfg.block_size} x {self.accum} micro-steps = {tokens:,} tokens per step")
        self.log(f"MFU peak: {self.peak / 1e12:.3f} TFLOPS per rank ({source}); "
                 f"{flops_per_token(self.model_config) / 1e6:.1f} MFLOPs per token")

    def remeasure_peak(self):
        """A step beat the measured peak: the machine was busier at start-up than now.
        Measure again and keep the best, so MFU stays a fraction of what BLAS achieves."""
        old = self.peak
        self.peak = max(old, measure_peak_flops(self.xp, self.model.compute_dtype))
        self.log(f"MFU peak re-measured: {old / 1e12:.3f} -> {self.peak / 1e12:.3f} TFLOPS per rank")

    def report(self, step, loss, lr, norm, dt):
        cfg = self.cfg
        self.history["train"][step] = loss
        self.append_log(f"{step} train {loss:.6f}")
        achieved = self.flops_per_step / dt / self.dist.world_size  # FLOP/s per rank
        if achieved > self.peak and not cfg.peak_tflops:
            self.remeasure_peak()
        mfu = achieved / self.peak
        # the average since the end of the first step, which carries one-off costs
        now = time.perf_counter()
        if self.clock is None:
            self.clock, per_step = (now, self.step), dt
        else:
            per_step = (now - self.clock[0]) / (self.step - self.clock[1])
        eta = per_step * (cfg.max_steps - self.step)
        self.log(f"step {step:5d}/{cfg.max_steps} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                 f"{dt * 1000:.1f} ms | {cfg.total_batch_size / dt:,.0f} tok/s | MFU {100 * mfu:.2f}% | "
                 f"{100 * self.step // cfg.max_steps}% ETA {format_seconds(eta)}")
