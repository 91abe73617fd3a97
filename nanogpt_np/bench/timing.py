"""Timing the two steps against each other, and nanogpt_np's step part by part."""
import json
import statistics
import time

from .steps import NumpyStep, make_batches, make_runner

IMPLS = ("numpy", "torch")


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
    s = args.shape
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
        limit = sgemm_limit(args.shape, gflops)
        print(f"sgemm  : {gflops:.0f} GFLOP/s (NumPy float32 matmul, {args.threads} threads); the step's "
              f"{matmul_flops_per_token(args.shape) / 1e6:.0f} MFLOP/token of matmuls cap it at "
              f"{limit:.0f} tokens/s")
        for name, r in summary.items():
            print(f"         {name} runs at {r['tok_per_s'] / limit:.0%} of that limit")
    if set(summary) == set(IMPLS):
        ratio = summary["numpy"]["tok_per_s"] / summary["torch"]["tok_per_s"]
        print(f"ratio numpy/torch tokens/s (median): {ratio:.2f}")


def run_timing(args):
    impls = IMPLS if args.impl == "both" else (args.impl,)
    shape = args.shape
    runners = {impl: make_runner(impl, args) for impl in impls}
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


def profile_parts(args):
    """Median seconds per step spent in each layer's forward and backward, the clip
    and AdamW, by wrapping the package's functions with timers. The model looks the
    layer functions up at call time, so wrapping the module attributes catches every
    call. "model glue" is the rest: residual adds, gradient accumulation, checks."""
    from nanogpt_np import layers

    shape = args.shape
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
