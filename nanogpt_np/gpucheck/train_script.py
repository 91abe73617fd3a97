"""Section 7: the user's command itself, `scripts/train.py --backend cupy`, as a subprocess.

On the prepared text (--text, else the standard library's bytes): a short run with
validation, sampling and checkpoints; then --resume from its middle checkpoint in a
second log directory; the resumed steps' losses must equal the uninterrupted run's
(bit for bit on the same GPU: the same kernels in the same order); the same run
with --cuda-graphs off (the default is on) against it. Then the same
command under `mpiexec -n 1` with NANOGPT_MPI=1, so one GPU runs the multi-rank
path (NCCL allreduce in buckets during backward).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from nanogpt_np.data import write_shard
from nanogpt_np.logplot import read_log

from . import settings
from .curve import text_tokens
from .table import record

ROOT = Path(__file__).resolve().parents[2]


def train_flags(data_dir, log_dir):
    f = settings.SIZES["train_script"]
    return ["--backend", settings.TRAIN_BACKEND, "--data-dir", str(data_dir), "--log-dir", str(log_dir),
            "--n-layer", str(f["n_layer"]), "--n-head", str(f["n_head"]), "--n-embd", str(f["n_embd"]),
            "--block-size", str(f["T"]), "--batch-size", str(f["B"]), "--total-batch-size", str(f["tokens"]),
            "--max-steps", str(f["steps"]), "--warmup-steps", "5", "--max-lr", "1e-3", "--min-lr", "1e-4",
            "--val-every", str(f["steps"] // 3), "--val-steps", "2", "--sample-every", str(f["steps"] // 2),
            "--num-samples", "1", "--sample-tokens", "8", "--ckpt-every", str(f["steps"] // 2), "--keep-last", "0",
            "--hellaswag-every", "0", "--peak-tflops", "1"]


def prepare_shards(folder, text):
    tokens, source = text_tokens(text)
    tokens = tokens[tokens < 50257]
    folder.mkdir(parents=True, exist_ok=True)
    split = len(tokens) // 10
    write_shard(folder / "text_val_000000.npy", tokens[:split])
    write_shard(folder / "text_train_000000.npy", tokens[split:])
    return source


def run_train(args, launcher=(), env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    env.pop(settings.ROWS_ENV, None)
    cmd = [*launcher, sys.executable, str(ROOT / "scripts" / "train.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise RuntimeError(f"exit {proc.returncode}: {tail[:300]}")
    return proc.stdout


def train_losses(log_dir):
    steps, values = read_log(log_dir)["train"]  # logplot's reader of log.txt
    return dict(zip(steps.tolist(), values.tolist()))


def section_train_script(args):
    work = Path(os.environ.get("OUT") or "/tmp") / f"gpu_check_train_{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    steps = settings.SIZES["train_script"]["steps"]
    middle = steps // 2
    state = {}

    def straight():
        source = prepare_shards(data, args.text)
        out = run_train(train_flags(data, work / "a"))
        state["a"], state["out_a"] = train_losses(work / "a"), out
        ok = len(state["a"]) == steps and "sample 0:" in out and "val loss" in out
        return dict(result=f"{steps} steps, val + samples + checkpoints at {middle} and {steps}; loss "
                           f"{state['a'][0]:.3f} -> {state['a'][steps - 1]:.3f} on {source}", limit="", ok=bool(ok))

    def resumed():
        b = work / "b"
        b.mkdir(parents=True)
        shutil.copy(work / "a" / f"model_{middle:05d}.npz", b)
        shutil.copy(work / "a" / "log.txt", b)  # --resume keeps the lines before the checkpoint
        run_train(train_flags(data, b) + ["--resume"])
        again = train_losses(b)
        diffs = [abs(again[s] - state["a"][s]) / abs(state["a"][s]) for s in range(middle, steps)]
        same = (work / "a" / "log.txt").read_text() == (b / "log.txt").read_text()
        return dict(result=f"steps {middle}..{steps - 1} after --resume: log.txt {'identical' if same else 'differs'},"
                           f" max rel loss diff {max(diffs):.1e}", limit="identical", ok=bool(same))

    def one_rank_mpi():
        mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
        if mpiexec is None:
            raise RuntimeError("no mpiexec (pip install -e '.[mpi]')")
        out = run_train(train_flags(data, work / "mpi"), launcher=(mpiexec, "-n", "1"),
                        env_extra={"NANOGPT_MPI": "1", "OMP_NUM_THREADS": "1"})
        losses = train_losses(work / "mpi")
        diff = max(abs(losses[s] - state["a"][s]) / abs(state["a"][s]) for s in range(steps))
        ok = len(losses) == steps and np.isfinite(list(losses.values())).all() and "1 rank(s)" in out
        return dict(result=f"mpiexec -n 1 (MPI + NCCL path): {steps} steps, max rel loss diff to the plain run "
                           f"{diff:.1e} (bucketed sums: float32 rounding)", limit="", ok=bool(ok))

    def graphs_off():
        run_train(train_flags(data, work / "eager") + ["--cuda-graphs", "off"])
        losses = train_losses(work / "eager")
        diffs = [abs(losses[s] - state["a"][s]) / abs(state["a"][s]) for s in range(steps)]
        same = "bit-identical" if all(d == 0 for d in diffs) else f"max rel diff {max(diffs):.1e}"
        fallback = [line for line in state["out_a"].splitlines() if "cuda graphs off" in line]
        return dict(result=f"--cuda-graphs off (every step eager) against the default (on): {steps} steps, losses "
                           f"{same}" + (f"; the default run fell back: {fallback[0][:150]}" if fallback else ""),
                    limit="rel diff <= 1e-3", ok=bool(len(losses) == steps and max(diffs) <= 1e-3))

    record("7", f"scripts/train.py --backend {settings.TRAIN_BACKEND}: {steps} steps", straight)
    record("7", "scripts/train.py --cuda-graphs off, the same run eagerly", graphs_off)
    record("7", f"scripts/train.py --resume from step {middle}", resumed)
    record("7", "mpiexec -n 1 scripts/train.py (NANOGPT_MPI=1)", one_rank_mpi)
