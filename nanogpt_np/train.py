"""build-nanogpt's training run: the loop behind scripts/train.py.

One optimizer step, as build-nanogpt takes it:

    for each of grad_accum micro-steps:   x, y = loader.next_batch()      (B, T)
                                          forward(x, y); backward()      grads += d(mean loss)
                                          (the last backward starts the sum over ranks:
                                          distributed.GradientBuckets; none for one process)
    grads /= grad_accum * world_size      the mean over the whole batch, as loss/grad_accum does
    norm = clip_grad_norm(grads, 1.0)
    opt.step(grads, lr=cosine_lr(step))

grad_accum = total_batch_size / (B * T * world_size). Around the step: validation
every --val-every steps and at the last step, samples every --sample-every steps,
a checkpoint every --ckpt-every steps and at the last step, and HellaSwag
every --hellaswag-every steps and at the last step.

Ranks. Under `mpiexec -n N` every rank runs this same loop on its own slice of
each batch (distributed.py). The parameters are broadcast from rank 0 at the
start (and after a resume), so all ranks start identical; the gradient average
keeps them so. Only rank 0 prints, writes log.txt, samples and checkpoints.

Exact resume. A checkpoint taken after step s holds everything the next step
reads: the weights, AdamW's moments and step count, each rank's loader position
(with its shuffle epoch), the sampling RNG, and s itself (which drives the lr
schedule). `--resume` restores all of it, so the continued run computes the same
floating-point operations in the same order: same losses, same weights, bit for
bit (on the same machine, backend and thread count).

Surviving a long run (resilience.py). A step whose loss or gradient norm is NaN
or Inf is skipped (no AdamW update); after --max-bad-steps of them in a row the
run checkpoints its last good weights and stops with an error. --skip-zscore Z
also skips steps whose loss or norm is a spike (z-score above Z against recent
steps). SIGTERM or Ctrl-C finishes the current step on every rank, checkpoints
and exits 0 (a second one exits at once). --resume verifies the checkpoint's
checksums and falls back to the previous checkpoint when the newest is damaged;
--keep-last K keeps the newest K. A run may resume on another number of ranks:
the tokens per step stay the same (see data.py for what else holds).

MFU. A training token costs 6N + 6*L*C*T FLOPs: 6N for the matmuls of the N
weights it passes through (2 forward, 4 backward; wpe is a lookup and is left out
of N, the tied wte counts once for lm_head), and 6*L*C*T for attention's
QK^T and AV (2*2*T*C per layer forward, times 3 with backward, halved because
the causal mask leaves half of the T x T scores unused). MFU is that rate over
a peak: --peak-tflops if given, else the rate of a 1024^3 matmul in the training
dtype measured on this device at start-up (an achievable peak, not a datasheet
one; on a CPU it is the BLAS sgemm/dgemm rate), measured again whenever a step
beats it (a machine busy at start-up measures low).
"""
import dataclasses
import os
import sys
import time

import numpy as np

from . import distributed
from .backend import default_precision, get_xp, resolve_precision, set_tf32
from .checkpoint import CheckpointError
from .config import GPTConfig
from .data import DataError, DataLoader
from .model import GPT
from .optim import AdamW, clip_grad_norm, cosine_lr
from .resilience import StepGuard, StopRequest
from .tokenizer import N_VOCAB
from .zero import ShardedAdamW, apply as zero_apply, zero_step
from .training.checkpointing import CheckpointMixin, truncate_log  # noqa: F401 (re-exported)
from .training.config import (FLAG_HELP, PRESETS, RESUME_SENSITIVE, TrainConfig, build_parser,  # noqa: F401
                              grad_accum_steps, parse_args)
from .training.errors import ConfigError, TrainingStopped
from .training.fitting import FittingMixin
from .training.evaluation import EvaluationMixin, evaluate, generate_samples  # noqa: F401
from .training.progress import (ProgressMixin, flops_per_token, format_seconds, measure_peak_flops,  # noqa: F401
                                say, synchronize)
from .training.step import accumulate_gradients, train_step  # noqa: F401


class Trainer(CheckpointMixin, EvaluationMixin, ProgressMixin, FittingMixin):
    """Builds the model, optimizer and loaders from a TrainConfig and runs the loop.
    The pieces: nanogpt_np/training/ (checkpoints, evaluation, progress, fitting)."""

    def __init__(self, cfg, dist=None, log=None):
        self.cfg, self.dist = cfg, dist or distributed.Single()
        self.log = (log or say) if self.dist.is_master else (lambda *a, **k: None)
        self._check_config()
        try:
            self.xp = get_xp(cfg.backend)
        except RuntimeError as e:
            raise ConfigError(str(e)) from e
        self.dist.pin_device(self.xp)  # one GPU per rank, before anything is allocated
        if cfg.tf32:
            if cfg.backend != "cupy":
                raise ConfigError("--tf32 applies to --backend cupy only")
            set_tf32(True)
        self.model_config = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
        if cfg.total_batch_size is None and cfg.batch_size != "auto":  # one micro-step per rank
            self.cfg = dataclasses.replace(
                cfg, total_batch_size=cfg.batch_size * cfg.block_size * self.dist.world_size)
        self.resolve_batch_size()  # --batch-size auto: from the memory plan
        self.model = GPT(self.model_config, dtype=self.precision, seed=cfg.seed, backend=cfg.backend)
        self.model.recompute = cfg.recompute
        self.confirm_batch_on_gpu()  # --batch-size auto on a GPU: one trial step
        cfg = self.cfg
        self.accum = grad_accum_steps(cfg.total_batch_size, cfg.batch_size, cfg.block_size,
                                      self.dist.world_size)
        optimizer = ShardedAdamW if cfg.zero else AdamW  # ZeRO-1: 1/ranks of the moments here
        extra = dict(dist=self.dist) if cfg.zero else {}
        self.optimizer = optimizer(self.model.parameters(), lr=cfg.max_lr, betas=(0.9, 0.95), eps=1e-8,
                                   weight_decay=cfg.weight_decay, **extra)
        self.gpu_step = self._gpu_step()  # None: the step below (NumPy, ZeRO-1, NANOGPT_KERNELS=0)
        self.data_dir = cfg.data_dir or self._builtin_corpus()
        self.train_loader, self.val_loader = self._make_loaders()
        self.hellaswag_examples = self._load_hellaswag() if cfg.hellaswag_every else None
        self.rng = np.random.default_rng([cfg.seed, 1])  # draws each sampling's seed
        self.guard = StepGuard(cfg.max_bad_steps, cfg.skip_zscore)
        self.stop_request = StopRequest(say=self.log)
        self.step = 0  # optimizer steps done = the next step to run
        self.history = {"train": {}, "val": {}, "samples": {}, "hella": {}, "skipped": {}, "stopped": None}
        self.log_path = os.path.join(cfg.log_dir, "log.txt")

    def _gpu_step(self):
        """The GPU kernels' training step (kernels/graph.py): one host read per step, static
        memory, CUDA graphs unless --cuda-graphs off. Not for ZeRO-1 (zero.py's own path)."""
        cfg = self.cfg
        if cfg.backend != "cupy" or cfg.zero or self.model.fused is None:
            return None
        from .kernels.graph import GpuTrainStep

        return GpuTrainStep(self.model, self.optimizer, self.accum, cfg.grad_clip, self.dist,
                            int(cfg.bucket_mb * 2**20), cuda_graphs=cfg.cuda_graphs == "on", log=self.log)

    def _check_config(self):
        cfg = self.cfg
        self.precision = cfg.dtype or default_precision(cfg.backend)  # bf16 on a GPU, else float32
        try:
            resolve_precision(self.precision, cfg.backend)  # bf16 on numpy: refused, saying why
        except (ValueError, RuntimeError) as e:
            raise ConfigError(str(e)) from e
        if cfg.vocab_size < N_VOCAB:
            raise ConfigError(f"--vocab-size {cfg.vocab_size} is smaller than GPT-2's {N_VOCAB} tokens")
        if cfg.cuda_graphs not in ("on", "off"):
            raise ConfigError(f"--cuda-graphs {cfg.cuda_graphs!r}: on or off")
        if cfg.zero not in (0, 1):
            raise ConfigError(f"--zero {cfg.zero}: 0 (every rank keeps all of AdamW) or 1 (ZeRO-1) only")
        if cfg.batch_size != "auto" and not (isinstance(cfg.batch_size, int) and cfg.batch_size > 0):
            raise ConfigError(f"--batch-size must be a positive number of sequences or auto, got {cfg.batch_size!r}")
        for name in ("max_steps", "val_steps", "num_samples"):
            if getattr(cfg, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("val_every", "sample_every", "ckpt_every", "warmup_steps", "sample_tokens",
                     "hellaswag_every", "bucket_mb", "max_bad_steps", "skip_zscore", "keep_last"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0 turns it off)")

    def _builtin_corpus(self):
        from .corpus import builtin_corpus

        path = builtin_corpus(log=self.log) if self.dist.is_master else None
        self.dist.barrier()  # the other ranks wait for rank 0 to build it, then find it
        return path or builtin_corpus(log=self.log)

    def _make_loaders(self):
        cfg, d = self.cfg, self.dist
        common = dict(B=cfg.batch_size, T=cfg.block_size, rank=d.rank, world_size=d.world_size)
        train = DataLoader(self.data_dir, split="train", shuffle=cfg.shuffle, seed=cfg.seed, **common)
        val = DataLoader(self.data_dir, split="val", **common) if cfg.val_every else None
        return train, val

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, stop_at=None):
        """Train until --max-steps (or until step `stop_at`, to stand in for a killed run).
        Returns self.history: {"train": {step: loss}, "val": {step: loss}, "samples": {step: [text]}}."""
        cfg = self.cfg
        self.start()
        self.announce()
        stop = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        if self.step >= cfg.max_steps:
            self.log(f"nothing to do: the run is at step {self.step}, --max-steps is {cfg.max_steps}")
        self.clock = None  # (time, step) at the end of this process's first step
        self.last_saved = None
        with self.stop_request:
            for step in range(self.step, stop):
                self.evaluate_before(step)
                signalled = self.train_one_step(step)
                last = step == cfg.max_steps - 1
                if cfg.ckpt_every and (self.step % cfg.ckpt_every == 0 or last):
                    self.save()
                if signalled:
                    self.stop_for_signal()
                    break
        return self.history

    def train_one_step(self, step):
        """Gradients, then AdamW unless the guard skips the step. -> whether some rank
        was signalled to stop (known to all ranks at once, from the loss allreduce)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = cosine_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        if self.gpu_step is not None:  # the same step, with one host read (loss, norm) in it
            loss, norm, skipped, votes = self.gpu_step(self.train_loader, lr, self.guard,
                                                       stop_vote=lambda: float(self.stop_request.requested))
            return self._after_step(step, loss, lr, norm, skipped, t0, votes)
        loss, votes = accumulate_gradients(self.model, self.train_loader, self.accum, self.dist,
                                           int(cfg.bucket_mb * 2**20),
                                           stop_vote=lambda: float(self.stop_request.requested),
                                           sum_over_ranks=not cfg.zero)
        if cfg.zero:  # reduce-scatter, norm over the slices, AdamW on this rank's slice, allgather
            grad_slice, norm = zero_step(self.model, self.optimizer, self.dist, self.accum, cfg.grad_clip)
        else:
            norm = clip_grad_norm(self.model.grads, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        skipped = self.guard.judge(loss, norm)  # the same on every rank: loss and norm are
        if skipped is None and cfg.zero:  # computed from numbers the allreduce made equal
            zero_apply(self.model, self.optimizer, self.dist, grad_slice, lr)
        elif skipped is None:
            self.optimizer.step(self.model.grads, lr=lr)
        synchronize(self.xp)
        return self._after_step(step, loss, lr, norm, skipped, t0, votes)

    def _after_step(self, step, loss, lr, norm, skipped, t0, votes):
        self.step = step + 1
        self.report(step, loss, lr, norm, time.perf_counter() - t0)
        if skipped is not None:
            self.history["skipped"][step] = skipped
            self.log(f"step {step:5d} | skipped: {skipped}; no update, AdamW's moments untouched")
            self.append_log(f"{step} skipped {skipped}")
        if self.guard.must_stop:
            self.stop_for_bad_steps(step)
        return votes > 0


def resume_command(argv=None, world_size=1):
    """The command line that continues this run: the same one plus --resume."""
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in args:
        args.append("--resume")
    launcher = ["mpiexec", "-n", str(world_size)] if world_size > 1 else []
    return " ".join(shlex.quote(a) for a in [*launcher, "python3", "scripts/train.py", *args])


def main(argv=None):
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    dist = distributed.init()
    try:
        trainer = Trainer(cfg, dist=dist)
        history = trainer.run()
    except (ConfigError, DataError, CheckpointError, TrainingStopped) as e:
        return distributed.report_failure(dist, e, everywhere=getattr(e, "collective", False))
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with the same flags plus --resume "
              f"(from the latest checkpoint in {cfg.log_dir})", file=sys.stderr)
        return 130
    if not dist.is_master:
        return 0
    stopped = history["stopped"]
    if stopped:
        say(f"stopped by {stopped['signal']} after step {stopped['step'] - 1} ({stopped['step']} steps done); "
            f"checkpoint {stopped['checkpoint']}. Continue with: {resume_command(argv, dist.world_size)}")
        return 0
    if history["val"]:
        step = max(history["val"])
        say(f"final val loss {history['val'][step]:.4f} (step {step})")
    say(f"done in {format_seconds(time.perf_counter() - t0)}; log: {trainer.log_path}")
    return 0
