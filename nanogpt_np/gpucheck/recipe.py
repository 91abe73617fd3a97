"""Section 6, second row: the same work as the recipe it replaces. GPT-2 124M in bf16
from the same initial weights, over the same batches of the prepared text, at the
same learning rates: our GPU step (GpuTrainStep, what scripts/train.py runs) against
build-nanogpt's loop in PyTorch under torch.compile (benchmarks/torch_twin.py
train_curve). The loss curves must agree within 1% at every step; each side's wall
time for the steps is reported, and their ratio (ours over PyTorch's: below 1 is
faster), over all the steps and without the first (where torch.compile compiles and
our step compiles its kernels and grows its buffers; our CUDA graphs are captured on
step 3, inside the rest). --no-compile, or less than COMPILE_NEEDS seconds of
--budget, runs PyTorch eagerly, and the row says so."""
import time

import numpy as np

from nanogpt_np import GPT, optim
from nanogpt_np.backend import to_host
from nanogpt_np.kernels import loader

from . import settings
from .curve import text_tokens
from .speed import FixedBatches, make_step, twin
from .table import free_gpu_memory, record, with_time_limit

COMPILE_NEEDS = 60  # seconds of --budget torch.compile needs here (section "compile" ran first: its cache is warm)


def text_batches(stream, B, T, steps):
    """build-nanogpt's DataLoaderLite over one token stream: consecutive (B, T) windows
    (targets one token on), back to the start when the next would run off the end."""
    if stream.size < B * T + 1:
        raise ValueError(f"the text has {stream.size} tokens; one batch of B={B}, T={T} needs {B * T + 1}")
    batches, pos = [], 0
    for _ in range(steps):
        if pos + B * T + 1 > stream.size:
            pos = 0
        buf = stream[pos : pos + B * T + 1]
        batches.append((buf[:-1].reshape(B, T), buf[1:].reshape(B, T)))  # (B, T) inputs, (B, T) targets
        pos += B * T
    return batches


def ours_curve(cfg, batches, lrs):
    """(initial weights {name: float32 host array}, losses, seconds after each step, the
    step's mode, [steps the guard skipped]) of our bf16 GPU step over `batches` at
    lrs[i] on step i."""
    import cupy as cp
    from nanogpt_np.resilience import StepGuard

    loader.sync_each_launch(False)  # timed: no sync after each launch (run_section turned it on)
    free_gpu_memory()
    model = GPT(cfg, dtype="bf16", seed=0, backend="cupy")
    weights = {name: np.array(to_host(a), dtype=np.float32) for name, a in model.state_dict().items()}
    opt = optim.AdamW(model.parameters(), lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    lines = []
    step = make_step(model, opt, *batches[0], lines=lines)
    guard = StepGuard(max_bad_steps=0)  # never skips a finite step: no z-score spikes
    losses, seconds, skipped = [], [], []
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for (x, y), lr in zip(batches, lrs):
        loss, _, why, _ = step.gpu_step(FixedBatches(x, y), lr, guard)
        losses.append(loss)
        seconds.append(time.perf_counter() - t0)
        if why is not None:
            skipped.append(f"step {len(losses) - 1} skipped: {why}")
    cp.cuda.Device().synchronize()  # the last step's update too
    seconds[-1] = time.perf_counter() - t0
    mode = "; ".join(lines) or step.gpu_step.mode
    del model, opt, step
    free_gpu_memory()
    return weights, losses, seconds, mode, skipped


def compile_choice(args):
    """(torch.compile or not, the words the row uses for the PyTorch side)."""
    if args.no_compile:
        return False, "torch eager (torch.compile skipped: --no-compile)"
    left = args.budget - (time.time() - args.start)
    if left < COMPILE_NEEDS:
        return False, f"torch eager (torch.compile skipped: {left:.0f} s of --budget left, needs {COMPILE_NEEDS})"
    return True, "torch.compile"


def wall_times(seconds):
    """(all steps, the first step (compiles, warm-up), the rest) in seconds."""
    return seconds[-1], seconds[0], seconds[-1] - seconds[0]


def section_recipe(args):
    cfg, steps, B, T = settings.SIZES["recipe"]
    stream, source = text_tokens(args.text)
    batches = text_batches(stream[stream < min(cfg.vocab_size, 50257)], B, T, steps)
    lrs = [optim.cosine_lr(s, 6e-4, 6e-5, max(1, steps // 5), steps) for s in range(steps)]
    compiled, torch_side = compile_choice(args)

    def run():
        weights, ours, ours_s, mode, skipped = ours_curve(cfg, batches, lrs)
        left = args.budget - (time.time() - args.start)
        theirs, theirs_s = with_time_limit(max(left, COMPILE_NEEDS), lambda: twin().train_curve(
            cfg, weights, batches, lrs, settings.TORCH_DEVICE, compiled))
        free_gpu_memory()
        ours, theirs = np.array(ours), np.array(theirs)
        diff = np.abs(ours - theirs) / np.abs(theirs)
        (o_all, o_first, o_rest), (t_all, t_first, t_rest) = wall_times(ours_s), wall_times(theirs_s)
        torch_name = "torch.compile" if compiled else "torch eager"
        return dict(result=f"max rel loss diff {diff.max():.2e} (step {int(diff.argmax())}), mean {diff.mean():.1e}; "
                           f"loss {theirs[0]:.3f} -> {theirs[-1]:.3f} (torch) / {ours[-1]:.3f} (ours); {steps} steps "
                           f"B{B} T{T}, wall: ours {o_all:.2f} s, {torch_name} {t_all:.2f} s = {o_all / t_all:.2f}x "
                           f"(first step {o_first:.2f} / {t_first:.2f} s; steps 2-{steps} {o_rest:.2f} / "
                           f"{t_rest:.2f} s = {o_rest / max(t_rest, 1e-9):.2f}x); PyTorch: {torch_side}; ours: "
                           f"{'; '.join([mode] + skipped)}; {source}",
                    limit="1e-02", ok=bool(diff.max() <= 1e-2 and theirs[-1] < theirs[0] and not skipped),
                    metrics={"curve_ours_bf16": ours.tolist(), "curve_torch_bf16": theirs.tolist(),
                             "recipe_ours_s": o_all, "recipe_torch_s": t_all, "recipe_time_ratio": o_all / t_all,
                             "recipe_ours_rest_s": o_rest, "recipe_torch_rest_s": t_rest,
                             "recipe_torch_compiled": compiled})

    record("6", f"{steps} steps 124M bf16: ours vs build-nanogpt", run)
