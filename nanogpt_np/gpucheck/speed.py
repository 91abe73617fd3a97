"""Section 4: a 124M training step, ours against build-nanogpt's PyTorch recipe."""
import time

import numpy as np

from nanogpt_np import GPT, backend, optim
from nanogpt_np.kernels.attention import bf16_path

from .environment import device_name

from . import settings
from .table import all_rows, free_gpu_memory, median_ms, record, with_time_limit


# ---- 4. a 124M training step: tokens/s, MFU, host time and memory against build-nanogpt ------

def twin():
    """The PyTorch reference (benchmarks/torch_twin.py), which scripts/gpu_check.py sets."""
    if settings.TWIN is None:
        raise RuntimeError("no PyTorch reference: gpucheck.settings.TWIN is unset (scripts/gpu_check.py sets it "
                           "to benchmarks/torch_twin.py)")
    return settings.TWIN


def torch_sync():
    twin().sync(settings.TORCH_DEVICE)


def flops_per_token(n_params, cfg, T):
    """6 per parameter (forward 2, backward 4) plus attention's scores, causal half:
    6N + 6 L C T, as llm.c counts it."""
    return 6 * n_params + 6 * cfg.n_layer * cfg.n_embd * T


def peak_bf16():
    """(dense bf16 peak FLOP/s, the card it was taken for) or (None, name)."""
    name = device_name()
    for key, peak in settings.BF16_PEAK:
        if all(part in name for part in key.split()):
            return peak, key
    return None, name


def throughput(step_ms, n_params, B, T, cfg=None):
    """(tokens/s, MFU, a line) of a step; cfg: the model's shape (default: the speed rows')."""
    tok_s = B * T / (step_ms / 1e3)
    peak, card = peak_bf16()
    cfg = cfg or settings.SIZES["speed"][0]
    mfu = flops_per_token(n_params, cfg, T) * tok_s / peak if peak else None
    text = f"{step_ms:.1f} ms/step, {tok_s:,.0f} tok/s, MFU " + (
        f"{mfu * 100:.1f}% (of {card}'s {peak / 1e12:.0f} TFLOPS bf16)" if peak else f"n/a (unknown card {card})")
    return tok_s, mfu, text


class CountingRunner:
    """Counts kernel launches (or gemm calls) on their way to the real runner."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def launch(self, *args):
        self.count += 1
        self.inner.launch(*args)

    def gemm_ex(self, *args):
        self.count += 1
        self.inner.gemm_ex(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FixedBatches:
    """next_batch() -> the same host (B, T) token ids every time (the data loader's interface)."""

    def __init__(self, idx, targets):
        self.batch = (idx, targets)

    def next_batch(self):
        return self.batch


def make_step(model, opt, idx, targets, cuda_graphs=True, lines=None):
    """step() -> loss: scripts/train.py's step on one GPU (kernels/graph.py's GpuTrainStep:
    one host read, static memory, CUDA graphs from the third step unless cuda_graphs=False)
    on the host token ids idx, targets, every step."""
    from nanogpt_np import distributed
    from nanogpt_np.kernels.graph import GpuTrainStep
    from nanogpt_np.resilience import StepGuard

    lines = [] if lines is None else lines
    gpu_step = GpuTrainStep(model, opt, 1, 1.0, distributed.Single(), cuda_graphs=cuda_graphs, log=lines.append)
    batches, guard = FixedBatches(idx, targets), StepGuard(max_bad_steps=0)

    def step():
        return gpu_step(batches, 6e-4, guard)[0]

    step.gpu_step = gpu_step
    return step


def ours_step(dtype, tf32, B, T, steps=5, cfg=None, cuda_graphs=True):
    """(ms per step, parameters, {memory}, launches per step) of our 124M training step
    (the launches counted on the second, eager step; a graph's replays run the same)."""
    import cupy as cp
    from nanogpt_np.kernels import gemm, loader

    loader.sync_each_launch(False)
    free_gpu_memory()
    backend.set_tf32(tf32)
    cfg = cfg or settings.SIZES["speed"][0]
    pool = cp.get_default_memory_pool()
    model = GPT(cfg, dtype=dtype, seed=0, backend="cupy")
    opt = optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    V = min(50257, cfg.vocab_size)
    step = make_step(model, opt, rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T)), cuda_graphs)
    step()  # eager: NVRTC, the model's buffers
    kernels_runner, gemm_runner = CountingRunner(loader._state["runner"]), CountingRunner(gemm._state["runner"])
    loader.use_runner(kernels_runner)
    gemm.use_runner(gemm_runner)
    try:
        step()  # eager, recording the step's memory: every launch passes the runners
    finally:
        loader.use_runner(kernels_runner.inner)
        gemm.use_runner(gemm_runner.inner)
    ms = median_ms(step, cp.cuda.Device().synchronize, reps=steps, warmup=1)  # the first captures the graphs
    cp.cuda.Device().synchronize()
    free, total = cp.cuda.runtime.memGetInfo()
    memory = dict(pool=pool.total_bytes() / 2**30, device=(total - free) / 2**30, mode=step.gpu_step.mode)
    n = model.num_parameters()
    del model, opt, step
    backend.set_tf32(False)
    free_gpu_memory()
    return ms, n, memory, (kernels_runner.count, gemm_runner.count)


def largest_fitting_batch(fn, B):
    """fn(B), halving B on a GPU out-of-memory error -> (result, B used)."""
    import cupy as cp

    while True:
        try:
            return fn(B), B
        except cp.cuda.memory.OutOfMemoryError:
            if B == 1:
                raise
            free_gpu_memory()
            B //= 2


def torch_step_ms(compile_model, steps=5, size="speed"):
    """build-nanogpt's step in PyTorch at the speed shape -> (ms, parameters, {memory})."""
    cfg, B, T = settings.SIZES[size]
    return twin().train_step_ms(cfg, B, T, settings.TORCH_DEVICE, compile_model, steps, median_ms, free_gpu_memory)


def section_speed():
    cfg, B0, T = settings.SIZES["speed"]

    def ours(dtype, tf32, key):
        (ms, n, memory, (launches, gemms)), B = largest_fitting_batch(lambda B: ours_step(dtype, tf32, B, T), B0)
        tok_s, mfu, text = throughput(ms, n, B, T)
        text += (f"; memory: CuPy pool {memory['pool']:.1f} GiB (its high-water mark), device {memory['device']:.1f}"
                 f" GiB in use; {launches} kernels + {gemms} gemms per step; {memory['mode']}")
        return dict(result=f"B{B}: " + text, limit="", ok=None,
                    metrics={f"{key}_tok_s": tok_s, f"{key}_mfu": mfu, f"{key}_pool_gib": memory["pool"],
                             f"{key}_launches": launches + gemms, f"{key}_ms": ms})

    record("4", f"ours bf16, B{B0} T{T} (or the largest B that fits)", lambda: ours("bf16", False, "ours_bf16"))
    record("4", "ours f32 + TF32 matmuls", lambda: ours(np.float32, True, "ours_tf32"))

    def ours_first_attention():  # the same step on the first mma attention kernels: old and new in one run
        with bf16_path("mma"):
            return ours("bf16", False, "ours_bf16_mma")

    record("4", f"ours bf16 with the first mma attention kernels (before FlashAttention-2's), B{B0} T{T}",
           ours_first_attention)

    def host(cuda_graphs):  # the same step where the GPU's work is negligible: what remains is the host's
        hB, hT = settings.SIZES["host"]
        ms, _, memory, (launches, gemms) = ours_step("bf16", False, hB, hT, steps=10, cuda_graphs=cuda_graphs)
        return dict(result=f"{ms:.1f} ms of host time per step (B{hB} T{hT}: the GPU is idle most of it; "
                           f"{memory['mode']}), {launches} kernel launches + {gemms} gemm calls: "
                           f"{1e3 * ms / (launches + gemms):.0f} us each; the GPU keeps busy while this is below "
                           "its own step time", limit="", ok=None,
                    metrics={"host_ms" if cuda_graphs else "host_eager_ms": ms})

    record("4", "host time per step, CUDA graphs", lambda: host(True))
    record("4", "host time per step, eager (launch overhead)", lambda: host(False))
    record("4", "eager vs CUDA graphs: losses and ms/step, 10 steps", eager_vs_graphs)
    record("4", "per-kernel time of one eager bf16 step (top 15)", kernel_times)

    def torch_run(compiled):
        ms, n, memory = torch_step_ms(compiled)
        tok_s, mfu, text = throughput(ms, n, B0, T)
        key = "torch_compile" if compiled else "torch_eager"
        return dict(result=f"B{B0}: {text}; peak allocated {memory['allocated']:.1f} GiB, reserved "
                           f"{memory['reserved']:.1f} GiB", limit="", ok=None,
                    metrics={f"{key}_tok_s": tok_s, f"{key}_gib": memory["allocated"],
                             f"{key}_reserved_gib": memory["reserved"]})

    record("4", "torch bf16 autocast, eager", lambda: torch_run(False))


def _train_steps(cfg, B, T, steps, cuda_graphs):
    """(losses, ms per step (median), the step's mode) of `steps` training steps from seed 0."""
    import cupy as cp

    free_gpu_memory()
    model = GPT(cfg, dtype="bf16", seed=0, backend="cupy")
    opt = optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    rng = np.random.default_rng(1)
    V = min(50257, cfg.vocab_size)
    batches = [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(steps)]
    lines = []
    step = make_step(model, opt, *batches[0], cuda_graphs=cuda_graphs, lines=lines)
    losses, times = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        losses.append(step.gpu_step(FixedBatches(*batches[i]), 6e-4, _GUARD())[0])
        cp.cuda.Device().synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    mode = step.gpu_step.mode if not lines else "; ".join(lines)
    del model, opt, step
    free_gpu_memory()
    return losses, float(np.median(times[3:] or times)), mode


def _GUARD():
    from nanogpt_np.resilience import StepGuard

    return StepGuard(max_bad_steps=0)


def eager_vs_graphs():
    """The same 10 steps (same weights, same batches) eagerly and with CUDA graphs: the
    losses must agree bit for bit (or the row says by how much), and each one's time.
    A fallback to eager says why, and the row is then information only."""
    cfg, B, T = settings.SIZES["speed"]
    steps = settings.SIZES.get("graph_steps", 10)
    eager, eager_ms, _ = _train_steps(cfg, B, T, steps, False)
    graphs, graphs_ms, mode = _train_steps(cfg, B, T, steps, True)
    diffs = [abs(a - b) / max(abs(a), 1e-30) for a, b in zip(eager, graphs)]
    worst = int(np.argmax(diffs))
    same = "bit-identical" if eager == graphs else (f"max relative difference {diffs[worst]:.2e} at step {worst} "
                                                      "(the embedding's float32 atomic adds run in any order)")
    close = bool(diffs[worst] <= 1e-3)
    return dict(result=f"losses {same}; eager {eager_ms:.1f} ms/step, {mode} {graphs_ms:.1f} ms/step (B{B} T{T})",
                limit="rel diff <= 1e-3", ok=(close if mode == "graphs" or not close else None),
                metrics={"eager_ms": eager_ms, "graphs_ms": graphs_ms})


class TimingRunner:
    """CUDA events around every launch (kernels or gemms) on its way to the real runner."""

    def __init__(self, inner, events):
        self.inner, self.events = inner, events

    def _timed(self, name, nbytes, flops, run):
        import cupy as cp

        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        run()
        stop.record()
        self.events.append((name, nbytes, flops, start, stop))

    def launch(self, kernel_file, name, grid, block, args, shared_mem):
        nbytes = sum(int(a.nbytes) for a in args if hasattr(a, "nbytes") and not isinstance(a, np.generic))
        self._timed(name, nbytes, 0, lambda: self.inner.launch(kernel_file, name, grid, block, args, shared_mem))

    def gemm_ex(self, *args):
        m, n, k = args[2:5]
        nbytes = sum(int(a.nbytes) for a in (args[6], args[9], args[13]))
        self._timed(f"gemm {n}x{m}x{k}", nbytes, 2 * m * n * k, lambda: self.inner.gemm_ex(*args))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def kernel_times():
    """One eager bf16 step at the speed shape, each launch between two CUDA events: the 15
    kernels (by name, gemms by shape) that take the most time, with bytes and GB/s or TFLOP/s."""
    import cupy as cp
    from nanogpt_np.kernels import gemm, loader

    cfg, B, T = settings.SIZES["speed"]
    free_gpu_memory()
    model = GPT(cfg, dtype="bf16", seed=0, backend="cupy")
    opt = optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    V = min(50257, cfg.vocab_size)
    step = make_step(model, opt, rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T)), cuda_graphs=False)
    step()
    step()
    events = []
    kernels_runner, gemm_runner = TimingRunner(loader._state["runner"], events), TimingRunner(gemm._state["runner"], events)
    loader.use_runner(kernels_runner)
    gemm.use_runner(gemm_runner)
    try:
        step()
    finally:
        loader.use_runner(kernels_runner.inner)
        gemm.use_runner(gemm_runner.inner)
    cp.cuda.Device().synchronize()
    totals = {}
    for name, nbytes, flops, start, stop in events:
        t = totals.setdefault(name, [0, 0.0, 0, 0])
        t[0] += 1
        t[1] += cp.cuda.get_elapsed_time(start, stop)
        t[2] += nbytes
        t[3] += flops
    del model, opt, step
    free_gpu_memory()
    all_ms = sum(t[1] for t in totals.values())
    top = sorted(totals.items(), key=lambda kv: -kv[1][1])[:15]
    parts = []
    for name, (count, ms, nbytes, flops) in top:
        ms_ = max(ms, 1e-9)
        rate = f"{flops / ms_ / 1e9:.0f} TFLOP/s" if flops else f"{nbytes / ms_ / 1e6:.0f} GB/s"
        parts.append(f"{name} x{count}: {ms:.2f} ms, {nbytes / 1e9:.2f} GB, {rate}")
    return dict(result=f"{all_ms:.1f} ms in {len(events)} launches | " + " | ".join(parts), limit="", ok=None)


def section_compile(args):
    """torch.compile last: it may take minutes, and gets what is left of --budget."""
    if args.no_compile:
        record("4", "torch bf16 + torch.compile", lambda: dict(result="skipped (--no-compile)", limit="", ok=None))
        return
    left = args.budget - (time.time() - args.start)
    if left < 90:
        record("4", "torch bf16 + torch.compile",
               lambda: dict(result=f"skipped: {left:.0f} s of --budget left (needs 90)", limit="", ok=None))
        return
    cfg, B0, T = settings.SIZES["speed"]

    def run():
        ms, n, memory = with_time_limit(left, lambda: torch_step_ms(True))
        tok_s, mfu, text = throughput(ms, n, B0, T)
        return dict(result=f"B{B0}: {text}; peak allocated {memory['allocated']:.1f} GiB", limit="", ok=None,
                    metrics={"torch_compile_tok_s": tok_s, "torch_compile_gib": memory["allocated"]})

    record("4", "torch bf16 + torch.compile", run)


def summary_rows():
    """The ratio, MFU and memory verdicts, from the metrics the speed rows left."""
    metrics = {}
    for row in all_rows():
        metrics.update(row.get("metrics", {}))

    def ratio():
        torch_runs = {k[:-len("_tok_s")]: v for k, v in metrics.items() if k.startswith("torch") and k.endswith("_tok_s")}
        best = max(torch_runs, key=torch_runs.get)
        r = metrics["ours_bf16_tok_s"] / torch_runs[best]
        return dict(result=f"ours bf16 {metrics['ours_bf16_tok_s']:,.0f} tok/s = {r:.2f}x {best} "
                           f"{torch_runs[best]:,.0f} tok/s (target 1.0x)", limit=">= 1.0", ok=bool(r >= 1.0))

    def mfu():
        value = metrics.get("ours_bf16_mfu")
        if value is None:
            return dict(result="n/a: unknown card", limit="", ok=None)
        return dict(result=f"ours bf16 MFU {100 * value:.1f}% (target 45%)", limit=">= 45%", ok=bool(value >= 0.45))

    def memory():
        ours = metrics["ours_bf16_pool_gib"]
        theirs = {k: v for k, v in metrics.items()
                  if k.startswith("torch") and k.endswith("_gib") and not k.endswith("reserved_gib")}
        best = min(theirs, key=theirs.get)
        return dict(result=f"ours bf16 pool high-water {ours:.1f} GiB vs {best} {theirs[best]:.1f} GiB "
                           "(torch: max_memory_allocated)", limit="below", ok=bool(ours < theirs[best]))

    record("4", "ratio ours bf16 / PyTorch best (tok/s)", ratio)
    record("4", "MFU of ours bf16", mfu)
    record("4", "peak GPU memory, ours bf16 vs PyTorch", memory)


def section_speed_350m(args):
    """The 350M preset's shape (24 layers, 16 heads, 1024 channels), bf16: ours against
    PyTorch eager and, within what is left of --budget, torch.compile, in the same run."""
    cfg, B0, T = settings.SIZES["speed_350m"]
    found = {}

    def ours():
        (ms, n, memory, _), B = largest_fitting_batch(lambda B: ours_step("bf16", False, B, T, cfg=cfg), B0)
        tok_s, mfu, text = throughput(ms, n, B, T, cfg)
        found["ours"] = tok_s
        return dict(result=f"B{B}: {text}; CuPy pool {memory['pool']:.1f} GiB", limit="", ok=None,
                    metrics={"m350_ours_tok_s": tok_s, "m350_ours_mfu": mfu})

    def torch_run(compiled):
        left = args.budget - (time.time() - args.start)
        if compiled and (args.no_compile or left < 90):
            why = "--no-compile" if args.no_compile else f"{left:.0f} s of --budget left (needs 90)"
            return dict(result=f"skipped: {why}", limit="", ok=None)
        ms, n, memory = with_time_limit(max(left, 60), lambda: torch_step_ms(compiled, size="speed_350m"))
        tok_s, mfu, text = throughput(ms, n, B0, T, cfg)
        found["torch_compile" if compiled else "torch_eager"] = tok_s
        return dict(result=f"B{B0}: {text}; peak allocated {memory['allocated']:.1f} GiB", limit="", ok=None)

    def ratio():
        best = max((k for k in found if k.startswith("torch")), key=found.get)
        r = found["ours"] / found[best]
        return dict(result=f"350M ours bf16 {found['ours']:,.0f} tok/s = {r:.2f}x {best} {found[best]:,.0f} tok/s",
                    limit=">= 1.0", ok=bool(r >= 1.0))

    record("4", f"350M ours bf16, B{B0} T{T} (or the largest B that fits)", ours)
    record("4", "350M torch bf16 autocast, eager", lambda: torch_run(False))
    record("4", "350M torch bf16 + torch.compile", lambda: torch_run(True))
    record("4", "350M ratio ours bf16 / PyTorch best (tok/s)", ratio)
