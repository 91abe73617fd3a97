#!/usr/bin/env python3
"""Time one training step of nanogpt_np against PyTorch, on the same machine, in one run.

A step is what scripts/train.py does for one micro-batch with no accumulation:
zero the gradients, forward, backward, clip the global gradient norm to 1.0 and
take an AdamW step (two weight-decay groups, as build-nanogpt makes them). The
reference is build-nanogpt's GPT-2 in eager PyTorch, float32 on the CPU
(tests/torch_gpt.py), with the same shape, the same batches and the same number
of threads.

    python scripts/bench.py --preset small          # 4 layers, C=256, B=4, T=256
    python scripts/bench.py --preset 124m           # GPT-2 124M, B=1, T=1024
    python scripts/bench.py --n-layer 4 --n-embd 256 --n-head 4 --block-size 256 \\
        --batch-size 4 --vocab 50304 --steps 10 --threads 2
    python scripts/bench.py --preset 124m --memory  # peak RSS, one process per library
    python scripts/bench.py --preset 124m --ranks 1,2   # data parallel over MPI ranks (needs '.[mpi]')
    python scripts/bench.py --preset 124m --batch-size 16 --ranks 1,8 --backend cupy   # 8 GPUs

The two libraries take turns step by step, so a neighbour that steals the CPU for a
while slows both alike; the report gives the median of the timed steps. Thread
counts are fixed before NumPy is imported: OpenBLAS (NumPy's matmuls), OpenMP and
nanogpt_np's own elementwise threads all get --threads, and torch.set_num_threads
gets it too.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {
    "small": dict(n_layer=4, n_embd=256, n_head=4, block_size=256, batch_size=4, vocab=50304),
    "124m": dict(n_layer=12, n_embd=768, n_head=12, block_size=1024, batch_size=1, vocab=50304),
}
SHAPE_FLAGS = ("n_layer", "n_embd", "n_head", "block_size", "batch_size", "vocab")
IMPLS = ("numpy", "torch")
MEMORY_STEPS = 3
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NANOGPT_NP_THREADS")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="a named shape; the shape flags below override its fields (default: small)")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--block-size", type=int, help="T, the sequence length of each batch row")
    p.add_argument("--batch-size", type=int, help="B")
    p.add_argument("--vocab", type=int, help="vocab size (GPT-2's 50257 padded to 50304)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per library (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for both libraries (default: the CPUs this process may use)")
    p.add_argument("--impl", choices=("both",) + IMPLS, default="both",
                   help="which implementation(s) to time (default both)")
    p.add_argument("--memory", action="store_true",
                   help="instead of timing, measure each library's peak RSS for the step, "
                        "each in its own process")
    p.add_argument("--profile", action="store_true",
                   help="instead of comparing, time nanogpt_np's step part by part "
                        "(each layer's forward and backward, clip, AdamW)")
    p.add_argument("--ranks", metavar="N,M,...",
                   help="instead of comparing, time nanogpt_np's data-parallel step under "
                        "`mpiexec -n N` for each N, the --threads shared out among the ranks, and "
                        "its gradient allreduce against one bare Allreduce of the same bytes")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="with --ranks: numpy (CPU, float32) or cupy (one GPU per rank, bf16 as "
                        "train.py; gradients over NCCL); the comparison with PyTorch is CPU only, "
                        "scripts/gpu_check.py does it on a GPU")
    p.add_argument("--bucket-mb", type=float, default=25.0,
                   help="with --ranks: MiB of gradients per allreduce sent during backward, as "
                        "train.py's --bucket-mb (0: one allreduce after backward; default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = p.parse_args(argv)
    for field in SHAPE_FLAGS:
        if getattr(args, field) is None:
            setattr(args, field, PRESETS[args.preset][field])
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps and --threads must be at least 1, --warmup at least 0")
    if args.ranks is not None:
        try:
            args.ranks = [int(r) for r in args.ranks.split(",")]
        except ValueError:
            p.error(f"--ranks takes rank counts separated by commas, e.g. 1,2; got {args.ranks!r}")
        if min(args.ranks) < 1:
            p.error("--ranks counts must be at least 1")
    elif args.backend != "numpy":
        p.error("--backend cupy works with --ranks only; scripts/gpu_check.py times the GPU against PyTorch")
    return args


def set_thread_env(threads):
    """Fix every thread pool's size. Must run before numpy (or torch) is imported:
    OpenBLAS reads its variable once, when the library loads."""
    if "numpy" in sys.modules:
        raise RuntimeError("set_thread_env() must run before numpy is imported")
    for var in THREAD_ENV:
        os.environ[var] = str(threads)


def shape_of(args):
    return {f: getattr(args, f) for f in SHAPE_FLAGS}


# ---- the two implementations ----------------------------------------------------------


class NumpyStep:
    """nanogpt_np: forward, backward, clip_grad_norm, AdamW over the flat buffers."""

    name = "numpy"

    def __init__(self, shape, seed, backend="numpy"):
        from nanogpt_np import GPT, GPTConfig
        from nanogpt_np.backend import default_precision
        from nanogpt_np.optim import AdamW, clip_grad_norm

        cfg = GPTConfig(block_size=shape["block_size"], vocab_size=shape["vocab"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"])
        # float32 on the CPU; on the GPU train.py's default, bf16 mixed precision
        self.model = GPT(cfg, dtype=default_precision(backend), seed=seed, backend=backend)
        self.opt = AdamW(self.model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        self.clip = clip_grad_norm

    def __call__(self, idx, targets):
        self.model.zero_grad()
        _, loss = self.model.forward(idx, targets)
        grads = self.model.backward()
        self.clip(grads, 1.0)
        self.opt.step(grads, lr=6e-4)
        return loss


class TorchStep:
    """build-nanogpt in eager PyTorch, float32: the same step with torch.optim.AdamW."""

    name = "torch"

    def __init__(self, shape, seed, threads):
        import torch

        sys.path.insert(0, str(ROOT))
        from nanogpt_np import GPTConfig
        from tests.torch_gpt import TorchGPT, init_like_build_nanogpt

        torch.set_num_threads(threads)
        self.torch = torch
        cfg = GPTConfig(block_size=shape["block_size"], vocab_size=shape["vocab"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"])
        self.model = TorchGPT(cfg)
        init_like_build_nanogpt(self.model, seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # build-nanogpt asks for fused=True only on CUDA; on the CPU it gets the default
        self.opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8)

    def __call__(self, idx, targets):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        _, loss = self.model(torch.from_numpy(idx), torch.from_numpy(targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.item()


def make_runner(impl, shape, seed, threads):
    if impl == "numpy":
        return NumpyStep(shape, seed)
    return TorchStep(shape, seed, threads)


def make_batches(shape, count, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    B, T, V = shape["batch_size"], shape["block_size"], shape["vocab"]
    return [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(count)]


# ---- timing and reporting --------------------------------------------------------------


def time_steps(runners, batches, warmup):
    """Seconds per step for each runner, runners taking turns step by step.

    runners: {name: callable(idx, targets) -> loss}. The first `warmup` batches are
    run untimed (allocator and thread pools warm up, first-touch page faults).
    Returns {name: [seconds of each timed step]}.
    """
    times = {name: [] for name in runners}
    for i, (idx, targets) in enumerate(batches):
        # alternate who goes first, so neither always follows the other's cache pollution
        order = list(runners) if i % 2 == 0 else list(runners)[::-1]
        for name in order:
            t0 = time.perf_counter()
            loss = runners[name](idx, targets)
            elapsed = time.perf_counter() - t0
            if not (loss == loss):  # NaN
                raise RuntimeError(f"{name}: loss is NaN at bench step {i}")
            if i >= warmup:
                times[name].append(elapsed)
    return times


def summarize(times, tokens_per_step):
    """{name: {median_s, min_s, max_s, tok_per_s}} from the per-step times."""
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = dict(median_s=med, min_s=min(ts), max_s=max(ts), steps=len(ts),
                         tok_per_s=tokens_per_step / med)
    return out


def describe(args):
    s = shape_of(args)
    return (f"n_layer={s['n_layer']} n_embd={s['n_embd']} n_head={s['n_head']} "
            f"T={s['block_size']} B={s['batch_size']} vocab={s['vocab']} float32, "
            f"threads={args.threads}")


def matmul_flops_per_token(shape):
    """Training FLOPs per token in matrix products, counted as the issue does: 6 per
    weight of every linear layer and of lm_head (forward 2, backward 4), plus
    attention's two T x T products over the full square (forward 4TC per layer,
    backward twice that). nanogpt_np skips most of the masked half, so its real
    count is a little lower."""
    L, C, V, T = shape["n_layer"], shape["n_embd"], shape["vocab"], shape["block_size"]
    return 6 * (12 * L * C * C + V * C) + 12 * L * T * C


def measure_sgemm(n=2048, repeats=5):
    """GFLOP/s of one large float32 NumPy matmul on this machine (OpenBLAS's threads)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)
    best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sgemm_limit(shape, gflops):
    """Tokens/s if a step were nothing but its matmuls, at `gflops`."""
    return gflops * 1e9 / matmul_flops_per_token(shape)


def print_report(args, summary, gflops=None):
    tokens = args.batch_size * args.block_size
    print(f"config : {describe(args)}")
    print(f"step   : zero_grad + forward + backward + clip_grad_norm(1.0) + AdamW; "
          f"{tokens} tokens/step, {args.warmup} warmup + {args.steps} timed steps each, interleaved")
    print()
    print(f"{'impl':<8}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'tokens/s':>11}")
    for name, r in summary.items():
        print(f"{name:<8}{r['median_s'] * 1e3:>11.1f}{r['min_s'] * 1e3:>10.1f}"
              f"{r['max_s'] * 1e3:>10.1f}{r['tok_per_s']:>11.1f}")
    print()
    if gflops is not None:
        limit = sgemm_limit(shape_of(args), gflops)
        print(f"sgemm  : {gflops:.0f} GFLOP/s (NumPy float32 matmul, {args.threads} threads); the step's "
              f"{matmul_flops_per_token(shape_of(args)) / 1e6:.0f} MFLOP/token of matmuls cap it at "
              f"{limit:.0f} tokens/s")
        for name, r in summary.items():
            print(f"         {name} runs at {r['tok_per_s'] / limit:.0%} of that limit")
    if set(summary) == set(IMPLS):
        ratio = summary["numpy"]["tok_per_s"] / summary["torch"]["tok_per_s"]
        print(f"ratio numpy/torch tokens/s (median): {ratio:.2f}")


def run_timing(args):
    import numpy  # noqa: F401  (after set_thread_env)

    impls = IMPLS if args.impl == "both" else (args.impl,)
    shape = shape_of(args)
    runners = {impl: make_runner(impl, shape, args.seed, args.threads) for impl in impls}
    batches = make_batches(shape, args.warmup + args.steps, args.seed)
    times = time_steps(runners, batches, args.warmup)
    summary = summarize(times, args.batch_size * args.block_size)
    gflops = measure_sgemm()
    if args.json:
        print(json.dumps(dict(config=shape, threads=args.threads, results=summary, sgemm_gflops=gflops,
                              sgemm_limit_tok_per_s=sgemm_limit(shape, gflops))))
    else:
        print_report(args, summary, gflops)
    return summary


# ---- where nanogpt_np's step spends its time -------------------------------------------


def profile_parts(args):
    """Median seconds per step spent in each layer's forward and backward, the clip
    and AdamW, by wrapping the package's functions with timers. The model looks the
    layer functions up at call time, so wrapping the module attributes catches every
    call. "model glue" is the rest: residual adds, gradient accumulation, checks."""
    import numpy  # noqa: F401

    from nanogpt_np import layers, optim

    shape = shape_of(args)
    totals = {}

    def timed(label, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0
        return wrapper

    for name in layers.__all__:
        module = getattr(layers, name)
        for direction in ("forward", "backward"):
            setattr(module, direction, timed(f"{name}.{direction}", getattr(module, direction)))
    runner = NumpyStep(shape, args.seed)
    runner.opt.step = timed("AdamW.step", runner.opt.step)
    runner.model.zero_grad = timed("zero_grad", runner.model.zero_grad)
    runner.clip = timed("clip_grad_norm", runner.clip)
    per_step = {}
    for i, (idx, targets) in enumerate(make_batches(shape, args.warmup + args.steps, args.seed)):
        totals.clear()
        t0 = time.perf_counter()
        runner(idx, targets)
        totals["step"] = time.perf_counter() - t0
        if i >= args.warmup:
            for label, seconds in totals.items():
                per_step.setdefault(label, []).append(seconds)
    med = {label: statistics.median(ts) for label, ts in per_step.items()}
    step = med.pop("step")
    med["model glue"] = max(0.0, step - sum(med.values()))
    print(f"config : {describe(args)}")
    print(f"profile: nanogpt_np step, median of {args.steps} steps after {args.warmup} warmup")
    print()
    print(f"{'part':<24}{'ms/step':>10}{'share':>8}")
    for label, seconds in sorted(med.items(), key=lambda kv: -kv[1]):
        print(f"{label:<24}{seconds * 1e3:>10.1f}{seconds / step:>8.1%}")
    tok_per_s = args.batch_size * args.block_size / step
    print(f"{'step (median)':<24}{step * 1e3:>10.1f}   {tok_per_s:.1f} tokens/s")
    return med


# ---- peak memory -----------------------------------------------------------------------


def child_peak_memory(args):
    """In a child process: the step for one library, then its peak RSS as JSON."""
    import numpy  # noqa: F401

    shape = shape_of(args)
    if args.impl == "torch":
        import torch  # noqa: F401  (its libraries' resident size is not the step's)
    else:
        import nanogpt_np  # noqa: F401
    rss_imports = _rss_now()
    runner = make_runner(args.impl, shape, args.seed, args.threads)
    for idx, targets in make_batches(shape, args.warmup + args.steps, args.seed):
        runner(idx, targets)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps(dict(impl=args.impl, peak_rss=peak, rss_after_imports=rss_imports)))


def _rss_now():
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_memory(args, argv):
    """Peak RSS of each library's training step, each in a fresh process so neither
    sees the other's allocations (and the NumPy process never loads torch)."""
    impls = IMPLS if args.impl == "both" else (args.impl,)
    base = [a for a in argv if a not in ("--memory", "--json")]
    results = {}
    for impl in impls:
        # steps beyond the second add nothing: AdamW's moments exist from the first
        # step on, so the second step's backward already meets the largest footprint
        cmd = [sys.executable, __file__, *base, "--impl", impl, "--warmup", "0",
               "--steps", str(MEMORY_STEPS), "--_child-memory"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(dict(config=shape_of(args), threads=args.threads, memory=results)))
        return results
    print(f"config : {describe(args)}")
    print(f"memory : peak RSS of {MEMORY_STEPS} training steps (with AdamW state), "
          "one fresh process per library")
    print()
    print(f"{'impl':<8}{'peak RSS MB':>13}{'after imports MB':>18}{'step MB':>10}")
    for impl, r in results.items():
        print(f"{impl:<8}{r['peak_rss'] / 1e6:>13.0f}{r['rss_after_imports'] / 1e6:>18.0f}"
              f"{(r['peak_rss'] - r['rss_after_imports']) / 1e6:>10.0f}")
    if set(results) == set(IMPLS):
        ratio = results["numpy"]["peak_rss"] / results["torch"]["peak_rss"]
        print()
        print(f"ratio numpy/torch peak RSS: {ratio:.2f}")
    return results


# ---- data parallel over MPI ranks -------------------------------------------------------


def child_ranks(args):
    """Under mpiexec: each rank runs the data-parallel step as train.py does (its own
    batch of B rows; the gradients summed in --bucket-mb buckets sent during
    backward, then averaged; clip and AdamW), timing the step and the allreduce
    time left after backward (what the overlap did not hide). Afterwards, the same
    bytes through one bare comm.Allreduce, for comparison. Rank 0 prints the
    medians as JSON."""
    from nanogpt_np import distributed
    from nanogpt_np.backend import get_xp, to_device
    from nanogpt_np.train import synchronize

    dist = distributed.init()
    xp = get_xp(args.backend)
    dist.pin_device(xp)  # GPU local_rank, before the model allocates anything

    def now():  # GPU work is asynchronous: a time stamp waits for it first
        synchronize(xp)
        return time.perf_counter()

    runner = NumpyStep(shape_of(args), args.seed, backend=args.backend)
    model = runner.model
    steps, reduces = [], []
    for i, (idx, targets) in enumerate(make_batches(shape_of(args), args.warmup + args.steps,
                                                    args.seed + dist.rank)):
        idx, targets = to_device(idx, xp), to_device(targets, xp)
        dist.barrier()
        t0 = now()
        model.zero_grad()
        buckets = dist.gradient_buckets(model.flat_grads, int(args.bucket_mb * 2**20))
        model.forward(idx, targets)
        model.backward(grads_final=buckets.ready if buckets else None)
        t1 = now()  # the compute stream is done; buckets may still be in flight
        if buckets:
            buckets.finish()
            model.flat_grads /= dist.world_size
        t2 = now()
        runner.clip(model.grads, 1.0)
        runner.opt.step(model.grads, lr=6e-4)
        t3 = now()
        if i >= args.warmup:
            steps.append(t3 - t0)
            reduces.append(t2 - t1)
    bare = []
    if dist.world_size > 1:
        buf = xp.ones_like(model.flat_grads)
        for i in range(args.warmup + args.steps):
            dist.barrier()
            t0 = now()
            dist.allreduce_sum_(buf)  # one blocking collective: MPI in place, or the GPU transport
            if i >= args.warmup:
                bare.append(now() - t0)
    # the slowest rank sets the pace: report the largest median over the ranks
    per_rank = dist.allgather_json([statistics.median(steps), statistics.median(reduces),
                                    statistics.median(bare) if bare else 0.0])
    step_s, allreduce_s, bare_s = (max(column) for column in zip(*per_rank))
    if dist.is_master:
        print(json.dumps(dict(ranks=dist.world_size, step_s=step_s, allreduce_s=allreduce_s,
                              bare_allreduce_s=bare_s, grad_bytes=int(model.flat_grads.nbytes))))


def mpiexec_path():
    import shutil

    venv_bin = os.path.dirname(sys.executable)
    return shutil.which("mpiexec", path=venv_bin + os.pathsep + os.environ.get("PATH", ""))


def run_ranks(args, argv):
    """Tokens/s of nanogpt_np's step for each rank count, and the allreduce's cost."""
    mpiexec = mpiexec_path()
    if mpiexec is None:
        sys.exit("error: --ranks needs mpiexec; install it with `python3 -m pip install -e '.[mpi]'`")
    base = [a for a in argv if a != "--json"]
    base = [a for i, a in enumerate(base) if a != "--ranks" and (i == 0 or base[i - 1] != "--ranks")]
    base = [a for i, a in enumerate(base) if a != "--threads" and (i == 0 or base[i - 1] != "--threads")]
    results = []
    for n in args.ranks:
        per_rank = max(1, args.threads // n)
        cmd = [mpiexec, "-n", str(n), sys.executable, __file__, *base, "--threads", str(per_rank),
               "--_child-ranks"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(threads_per_rank=per_rank, tok_per_s=n * args.batch_size * args.block_size / r["step_s"])
        results.append(r)
    one = next((r for r in results if r["ranks"] == 1), None)
    for r in results:  # tokens/s against 1 rank: N for N GPUs scaling perfectly; on one
        # CPU the ranks share its cores, so there the ideal is 1
        r["speedup"] = r["tok_per_s"] / one["tok_per_s"] if one else None
    if args.json:
        print(json.dumps(dict(config=shape_of(args), threads=args.threads, ranks=results)))
        return results
    device = "one GPU per rank, bf16" if args.backend == "cupy" else "CPU, float32"
    print(f"config : {describe(args)} in all, shared out among the ranks; {device}")
    print(f"step   : per rank B={args.batch_size} x T={args.block_size}: forward + backward (sending "
          f"{args.bucket_mb:g} MiB gradient buckets as they are final) + the rest of the allreduce + clip + "
          f"AdamW; medians of {args.steps} steps after {args.warmup} warmup")
    print()
    print(f"{'ranks':>5}{'thr/rank':>10}{'step ms':>10}{'tokens/s':>10}{'allreduce ms':>14}"
          f"{'bare Allreduce ms':>19}{'ratio':>7}{'speedup':>9}")
    for r in results:
        bare = r["bare_allreduce_s"]
        ratio = f"{r['allreduce_s'] / bare:.2f}" if bare else "-"
        speedup = f"{r['speedup']:.2f}" if r["speedup"] is not None else "-"
        print(f"{r['ranks']:>5}{r['threads_per_rank']:>10}{r['step_s'] * 1e3:>10.1f}{r['tok_per_s']:>10.1f}"
              f"{r['allreduce_s'] * 1e3:>14.1f}{bare * 1e3 if bare else 0:>19.1f}{ratio:>7}{speedup:>9}")
    print()
    print(f"gradient: {results[0]['grad_bytes'] / 1e6:.0f} MB per step; 'allreduce' is the time from the "
          "end of backward to the averaged gradients (the part the overlap did not hide); 'bare' is one "
          "blocking allreduce of the same bytes in place; ratio = allreduce / bare; speedup = tokens/s "
          "against 1 rank (with 1 in --ranks; the ideal is N for N GPUs, 1 for ranks sharing one CPU)")
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    child = "--_child-memory" in argv
    child_mpi = "--_child-ranks" in argv
    argv_clean = [a for a in argv if a not in ("--_child-memory", "--_child-ranks")]
    args = parse_args(argv_clean)
    set_thread_env(args.threads)
    sys.path.insert(0, str(ROOT))  # this checkout's nanogpt_np, and tests/torch_gpt.py
    if child_mpi:
        child_ranks(args)
    elif args.ranks is not None:
        run_ranks(args, argv_clean)
    elif child:
        child_peak_memory(args)
    elif args.memory:
        run_memory(args, argv_clean)
    elif args.profile:
        profile_parts(args)
    else:
        run_timing(args)


if __name__ == "__main__":
    main()
