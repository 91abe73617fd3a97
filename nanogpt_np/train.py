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

One run per log directory (training/rundir.py). Every check comes first (flags,
--log-dir, memory plan, data, checkpoint); the run's first write is run.json. A
fresh run refuses a folder that holds another run, --resume a checkpoint of
another run or one trained with other flags; --overwrite and --force say otherwise.

Surviving a long run (resilience.py). A step whose loss or gradient norm is NaN
or Inf is skipped (no AdamW update); after --max-bad-steps of them in a row the
run checkpoints its last good weights and stops with an error. --skip-zscore Z
also skips steps whose loss or norm is a spike (z-score above Z against recent
steps). SIGTERM or Ctrl-C finishes the current step on every rank, checkpoints
and exits 0 (a second one exits at once). --resume verifies the checkpoint's
checksums and falls back to the previous checkpoint when the newest is damaged;
--keep-last K keeps the newest K. A run may resume on another number of ranks:
the tokens per step stay the same (see data.py for what else holds). Several
ranks: a collective that has not completed after --collective-timeout seconds (a
rank stopped or stuck) ends the job, naming that rank, after another rank has
checkpointed the last completed step; the ranks' own step times are compared every
--straggler-every steps (watchdog.py, training/watching.py).

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
from .data import DataError, DataLoader, check_token_ids
from .model import GPT
from .optim import AdamW, clip_grad_norm, cosine_lr
from .resilience import StepGuard, StopRequest
from .tokenizer import N_VOCAB
from .zero import ShardedAdamW, apply as zero_apply, zero_step
from .training.checkpointing import CheckpointMixin, truncate_log  # noqa: F401 (re-exported)
from .training.config import (FLAG_HELP, PRESETS, RESUME_SENSITIVE, TrainConfig, build_parser,  # noqa: F401
                              grad_accum_steps, parse_args, validate_config)
from .training.errors import ConfigError, TrainingStopped
from .training.fitting import FittingMixin
from .training.evaluation import EvaluationMixin, evaluate, generate_samples  # noqa: F401
from .training.progress import (ProgressMixin, flops_per_token, format_seconds, measure_peak_flops,  # noqa: F401
                                say, synchronize)
from .training.step import accumulate_gradients, train_step  # noqa: F401
from .training.watching import WatchingMixin


class Trainer(CheckpointMixin, EvaluationMixin, ProgressMixin, FittingMixin, WatchingMixin):
    """Builds the model, optimizer and loaders from a TrainConfig and runs the loop.
    The pieces: nanogpt_np/training/ (checkpoints, evaluation, progress, fitting)."""

    def __init__(self, cfg, dist=None, log=None):
        """Every check before any work: the flags, --log-dir (find_resume_point), the
        memory plan, the data (headers, then every token id); then the model. Nothing
        is written until run() starts (and claims --log-dir)."""
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
        try:
            self.model_config = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.run_id = None
        self.find_resume_point()  # may take the checkpoint's tokens per step
        cfg = self.cfg
        if cfg.total_batch_size is None and cfg.batch_size != "auto":  # one micro-step per rank
            self.cfg = dataclasses.replace(
                cfg, total_batch_size=cfg.batch_size * cfg.block_size * self.dist.world_size)
        self.resolve_batch_size()  # --batch-size auto: from the memory plan
        self.check_memory_plan()  # over the memory there is: refused, unless --force
        cfg = self.cfg
        grad_accum_steps(cfg.total_batch_size, cfg.batch_size, cfg.block_size, self.dist.world_size)  # divides?
        self.data_dir = cfg.data_dir or self._builtin_corpus()
        self.train_loader, self.val_loader = self._make_loaders()
        self.hellaswag_examples = self._load_hellaswag() if cfg.hellaswag_every else None
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
        validate_config(cfg, N_VOCAB)
        self.precision = cfg.dtype or default_precision(cfg.backend)  # bf16 on a GPU, else float32
        try:
            resolve_precision(self.precision, cfg.backend)  # bf16 on numpy: refused, saying why
        except (ValueError, RuntimeError) as e:
            raise ConfigError(str(e)) from e

    def collectively(self, work):
        """work() on rank 0 -> its JSON-able result on every rank; or its error raised on
        every rank alike (marked collective, so the job stops without an abort)."""
        kinds = {"ConfigError": ConfigError, "DataError": DataError, "CheckpointError": CheckpointError}
        result, problem = None, None
        if self.dist.is_master:
            try:
                result = work()
            except tuple(kinds.values()) as e:
                problem = [type(e).__name__, str(e)]
        result, problem = self.dist.allgather_json([result, problem])[0]
        if problem:
            error = kinds[problem[0]](problem[1])
            error.collective = True
            raise error
        return result

    def _builtin_corpus(self):
        from .corpus import builtin_corpus

        path = builtin_corpus(log=self.log) if self.dist.is_master else None
        self.dist.barrier()  # the other ranks wait for rank 0 to build it, then find it
        return path or builtin_corpus(log=self.log)

    def _make_loaders(self):
        """(train, val) loaders of this rank. Rank 0 first checks every shard (header,
        size, then every token id) for all ranks, so a bad file stops the job with one
        line; then the other ranks open theirs."""
        cfg, d = self.cfg, self.dist
        common = dict(B=cfg.batch_size, T=cfg.block_size, rank=d.rank, world_size=d.world_size)

        def make():
            train = DataLoader(self.data_dir, split="train", shuffle=cfg.shuffle, seed=cfg.seed, **common)
            val = DataLoader(self.data_dir, split="val", **common) if cfg.val_every else None
            return train, val

        def check():
            self._loaders = make()
            shards = [s for loader in self._loaders if loader for s in loader.shards]
            check_token_ids(shards, cfg.vocab_size, log=self.log)

        self.collectively(check)
        return self.__dict__.pop("_loaders", None) or make()

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, stop_at=None):
        """Train until --max-steps (or until step `stop_at`, to stand in for a killed run).
        Returns self.history: {"train": {step: loss}, "val": {step: loss}, "samples": {step: [text]}}."""
        with self.watching():  # several ranks: the collective watchdog, start()'s collectives included
            return self._run(stop_at)

    def _run(self, stop_at):
        cfg = self.cfg
        self.start()
        self.started_at = self.step
        self.remember_completed_step()
        self.announce()
        stop = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        if self.step >= cfg.max_steps:
            self.log(f"nothing to do: the run is at step {self.step}, --max-steps is {cfg.max_steps}")
        self.say_what_takes_long()
        self.clock = None  # (time, step) at the end of this process's first step
        self.last_saved = None
        with self.stop_request:
            for step in range(self.step, stop):
                self.watch_at(step, "evaluation")
                self.evaluate_before(step)
                self.watch_at(step, "training step")
                signalled = self.train_one_step(step)
                self.watch_at(step, "after the step")
                self.report_stragglers(step)
                last = step == cfg.max_steps - 1
                if cfg.ckpt_every and (self.step % cfg.ckpt_every == 0 or last):
                    self.save()
                if signalled:
                    self.stop_for_signal()
                    break
        return self.history

    def say_what_takes_long(self, seconds=5.0):
        """Before a first step that will take a while: its time at the measured peak,
        so a silent minute is not taken for a hang."""
        cfg, ranks = self.cfg, self.dist.world_size
        step_s = self.flops_per_step / (self.peak * ranks)
        val_s = step_s / 3 * cfg.val_steps * cfg.batch_size * cfg.block_size * ranks / cfg.total_batch_size
        if max(step_s, val_s if cfg.val_every else 0) < seconds:
            return
        val = f", each validation ({cfg.val_steps} batches) {format_seconds(val_s)}" if cfg.val_every else ""
        warm = "compiles the GPU kernels" if self.xp is not np else "warms up"
        self.log(f"at the measured peak each step takes at least {format_seconds(step_s)}{val}; the first step "
                 f"also {warm}")

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
        self.remember_completed_step()  # what a checkpoint after a stalled collective needs
        self.report(step, loss, lr, norm, time.perf_counter() - t0)
        if skipped is not None:
            self.history["skipped"][step] = skipped
            self.log(f"step {step:5d} | skipped: {skipped}; no update, AdamW's moments untouched")
            self.append_log(f"{step} skipped {skipped}")
        if self.guard.must_stop:
            self.stop_for_bad_steps(step)
        return votes > 0


def resume_command(argv=None, world_size=1):
    """The command line that continues this run: the same one plus --resume (and the
    thread settings the ranks ran with, which the shell line carried)."""
    import shlex

    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    threads = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ]
    launcher = ["mpiexec", "-n", str(world_size)] if world_size > 1 else []
    words = [shlex.quote(a) for a in [*launcher, "python3", "scripts/train.py", *args]]
    return " ".join(threads + words)


def interrupted_message(cfg, ours):
    """What a Ctrl-C outside the loop (at start-up, or a second one) leaves to do.
    ours: --log-dir is this run's (resumed, or claimed before the interrupt)."""
    from .checkpoint import latest_checkpoint
    from .training.rundir import describe

    ckpt = latest_checkpoint(cfg.log_dir) if ours else None
    if ckpt:
        return f"interrupted; continue with the same flags plus --resume (from {ckpt})"
    if ours and describe(cfg.log_dir):
        return (f"interrupted before the first checkpoint; {cfg.log_dir} has nothing to resume: run the same "
                "command again with --overwrite")
    if ours:
        return "interrupted before the first step; run the same command again"
    return f"interrupted before the run began; nothing was written to {cfg.log_dir}: run the same command again"


def next_steps(log_dir):
    """The commands that use what the run left: sampling its last checkpoint, the plot."""
    from .checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(log_dir)
    sample = f"sample from it: python3 scripts/sample.py --ckpt {ckpt}; " if ckpt else ""
    return f"{sample}plot it: python3 scripts/plot_log.py {log_dir}"


def main(argv=None):
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    dist = distributed.init()
    trainer = None
    try:
        trainer = Trainer(cfg, dist=dist)
        trainer.continue_with = resume_command(argv, dist.world_size)  # printed if a rank stalls
        history = trainer.run()
    except (ValueError, TrainingStopped) as e:  # ConfigError, DataError, CheckpointError: one line
        return distributed.report_failure(dist, e, everywhere=getattr(e, "collective", False))
    except KeyboardInterrupt:
        if dist.is_master:
            ours = cfg.resume or (trainer is not None and trainer.run_id is not None)
            print("\n" + interrupted_message(cfg, ours), file=sys.stderr)
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
    say(next_steps(cfg.log_dir))
    return 0
