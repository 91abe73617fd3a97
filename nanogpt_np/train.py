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
import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import checkpoint, distributed, hellaswag
from .resilience import StepGuard, StopRequest
from .backend import default_precision, get_xp, is_bfloat16, resolve_precision, set_tf32, to_device
from .data import DataError, DataLoader
from .distributed import DEFAULT_BUCKET_BYTES
from .config import GPTConfig, parameter_shapes
from .model import GPT
from .optim import AdamW, clip_grad_norm, cosine_lr
from .tokenizer import N_VOCAB, get_encoding


class ConfigError(ValueError):
    """Flags that cannot work together; the message says which and how to fix them."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row, or log.txt cannot be
    written); the message says why and what was saved. `collective`: every rank
    raised it at the same step, so none needs to be aborted."""

    def __init__(self, message, collective=False):
        super().__init__(message)
        self.collective = collective


@dataclass
class TrainConfig:
    """Every flag of scripts/train.py; the defaults are build-nanogpt's GPT-2 124M run."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # the sequence length T of training
    vocab_size: int = 50304  # 50257 padded to a multiple of 128
    batch_size: int = 64  # B, sequences per micro-step per rank
    total_batch_size: int = 524288  # tokens per optimizer step (~0.5M, as GPT-3 small)
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    max_steps: int = 19073  # 10B tokens / 524288
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 turns clipping off (the norm is still reported)
    seed: int = 1337
    data_dir: Optional[str] = None  # None: the built-in standard-library corpus
    log_dir: str = "log"
    val_every: int = 250
    val_steps: int = 20
    sample_every: int = 250
    ckpt_every: int = 5000
    resume: bool = False
    backend: str = "numpy"
    dtype: Optional[str] = None  # None: bf16 on cupy, float32 on numpy (backend.default_precision)
    tf32: bool = False  # cupy: float32 matmuls on TF32 tensor cores
    bucket_mb: float = DEFAULT_BUCKET_BYTES / 2**20  # gradient allreduce bucket size (0: no overlap)
    prompt: str = "Hello, I'm a language model,"
    num_samples: int = 4
    sample_tokens: int = 32
    shuffle: bool = False
    peak_tflops: Optional[float] = None
    hellaswag_every: int = 250
    hellaswag_path: Optional[str] = None  # None: the cached val file, downloaded if missing
    preset: Optional[str] = None
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops (0: never)
    skip_zscore: float = 0.0  # skip steps whose loss or grad norm z-score passes this (0: off)
    keep_last: int = 3  # checkpoints kept in --log-dir (0: all)


PRESETS = {
    # build-nanogpt's run; the same as the defaults, named for clarity
    "124M": {},
    # a few minutes on a 2-core CPU, on the built-in corpus: a 3.4M-parameter model
    # (most of it the 50304 x 64 embedding; the vocab-sized output layer is most of
    # the work), 200 steps of 1024 tokens
    "tiny": dict(
        n_layer=4, n_head=4, n_embd=64, block_size=128, batch_size=8, total_batch_size=1024,
        max_lr=3e-3, min_lr=3e-4, warmup_steps=10, max_steps=200,
        val_every=50, val_steps=10, sample_every=100, ckpt_every=100, hellaswag_every=0,
    ),
}

# the flags that must match for a resumed run to be the run never stopped
RESUME_SENSITIVE = ("total_batch_size", "max_lr", "min_lr", "warmup_steps", "max_steps",
                    "weight_decay", "grad_clip", "seed", "shuffle")


# ---- command line ---------------------------------------------------------------------

FLAG_HELP = {
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "channels C",
    "block_size": "context length T", "vocab_size": "vocabulary (50257 padded up)",
    "batch_size": "micro-batch B per rank", "total_batch_size": "tokens per optimizer step",
    "max_lr": "peak learning rate", "min_lr": "final learning rate",
    "warmup_steps": "linear warmup steps", "max_steps": "optimizer steps",
    "weight_decay": "AdamW decoupled weight decay (2-D weights only)",
    "grad_clip": "clip the global grad norm to this (0: off)",
    "seed": "init, sampling and shuffle seed",
    "data_dir": "folder of *_train_* / *_val_* shards (default: built-in stdlib corpus)",
    "log_dir": "log.txt and checkpoints go here", "val_every": "validate every N steps (0: off)",
    "val_steps": "batches per validation", "sample_every": "print samples every N steps (0: off)",
    "ckpt_every": "checkpoint every N steps (0: off)",
    "resume": "continue from the latest checkpoint in --log-dir",
    "backend": "numpy (CPU) or cupy (GPU)",
    "dtype": "float32, float64, or bf16 (cupy only: bf16 activations and matmuls, float32 parameters; "
             "default bf16 on cupy, float32 on numpy)",
    "tf32": "with --backend cupy: float32 matmuls on TF32 tensor cores (also CUPY_TF32=1)",
    "bucket_mb": "with several GPU ranks (NCCL): MiB of gradients per allreduce, sent during backward "
                 "(0: one allreduce after backward; the CPU always sends one)",
    "prompt": "sampling prompt", "num_samples": "samples per sampling",
    "sample_tokens": "new tokens per sample",
    "shuffle": "shuffle shard order and documents (seeded, resumable)",
    "peak_tflops": "peak TFLOPS for MFU (default: a matmul measured at start-up)",
    "hellaswag_every": "HellaSwag (val, acc_norm) every N steps (0: off)",
    "hellaswag_path": "hellaswag_val.jsonl (default: cached copy, downloaded when missing)",
    "preset": "a named set of defaults; explicit flags still win",
    "max_bad_steps": "stop (with a checkpoint) after this many NaN/Inf steps in a row; they are "
                     "skipped until then (0: never stop)",
    "skip_zscore": "skip a step whose loss or grad norm is this many standard deviations above "
                   "recent steps (0: off)",
    "keep_last": "keep only the newest K checkpoints (0: keep all)",
}


def build_parser():
    p = argparse.ArgumentParser(
        description="Train GPT-2 with nanogpt_np (build-nanogpt's recipe by default).",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line are set
    )
    choices = {"backend": ["numpy", "cupy"], "dtype": ["float32", "float64", "bf16"], "preset": sorted(PRESETS)}
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        help_text = FLAG_HELP[field.name] + ("" if default is None else f" (default: {default})")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help_text)
            continue
        kind = float if field.name == "peak_tflops" else type(default) if default is not None else str
        p.add_argument(flag, type=kind, choices=choices.get(field.name), help=help_text)
    return p


def parse_args(argv=None):
    """TrainConfig from the command line: defaults, then the preset, then explicit flags."""
    given = vars(build_parser().parse_args(argv))
    values = dict(PRESETS[given["preset"]]) if given.get("preset") else {}
    values.update(given)
    return TrainConfig(**values)


# ---- pieces of a run --------------------------------------------------------------------


def grad_accum_steps(total_batch_size, B, T, world_size=1):
    tokens_per_micro = B * T * world_size
    if total_batch_size % tokens_per_micro:
        raise ConfigError(
            f"--total-batch-size {total_batch_size} is not divisible by B*T*ranks = "
            f"{B}*{T}*{world_size} = {tokens_per_micro}; pick a multiple of {tokens_per_micro}"
        )
    return total_batch_size // tokens_per_micro


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


def train_step(model, optimizer, loader, accum, lr, grad_clip, dist, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """One optimizer step over `accum` micro-batches -> (mean loss, grad norm before clipping)."""
    loss, _ = accumulate_gradients(model, loader, accum, dist, bucket_bytes)
    norm = clip_grad_norm(model.grads, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step(model.grads, lr=lr)
    return loss, norm


def accumulate_gradients(model, loader, accum, dist, bucket_bytes=DEFAULT_BUCKET_BYTES, stop_vote=0.0):
    """model.flat_grads = the gradient of the mean loss over `accum` micro-batches on
    every rank -> (that mean loss, the mean of the ranks' stop_vote).

    With several ranks, the last micro-step's backward sends the gradients to the
    allreduce in buckets as they become final (distributed.GradientBuckets), so the
    communication hides under the rest of backward; bucket_bytes=0 sends them all
    after backward instead. stop_vote (a callable, read after backward) rides on the
    loss's allreduce, so every rank learns in the same step that one was signalled."""
    model.zero_grad()
    buckets = dist.gradient_buckets(model.flat_grads, bucket_bytes)  # None on one rank
    loss_sum = 0.0
    for micro in range(accum):
        x, y = loader.next_batch()
        _, loss = model.forward(to_device(x, model.xp), to_device(y, model.xp))
        last = micro == accum - 1  # earlier micro-steps still add into every gradient
        model.backward(grads_final=buckets.ready if buckets and last else None)
        loss_sum += loss
    if buckets:
        buckets.finish()  # flat_grads now holds the sum over ranks and micro-steps
    if accum * dist.world_size > 1:
        model.flat_grads /= accum * dist.world_size  # the gradient of the mean over all of them
    vote = stop_vote() if callable(stop_vote) else stop_vote
    loss, votes = dist.allreduce_scalars([loss_sum / accum, float(vote)], op="mean")
    return loss, votes


def evaluate(model, loader, steps, dist):
    """Mean loss over `steps` batches from the start of the loader's split."""
    loader.reset()
    total = 0.0
    for _ in range(steps):
        x, y = loader.next_batch()
        _, loss = model.forward(to_device(x, model.xp), to_device(y, model.xp))
        total += loss
    (mean,) = dist.allreduce_scalars([total / steps], op="mean")
    return mean


def generate_samples(model, prompt, num_samples, max_new_tokens, seed):
    """num_samples continuations of prompt, top-k 50, as decoded text."""
    enc = get_encoding()
    tokens = enc.encode(prompt) or [enc.eot_token]
    idx = np.tile(np.array(tokens, dtype=np.int64), (num_samples, 1))  # (num_samples, len(prompt))
    out = model.generate(idx, max_new_tokens, temperature=1.0, top_k=50, seed=seed)
    # ids in the padding above GPT-2's vocabulary (50257..vocab_size) have no text
    return [enc.decode([t for t in row.tolist() if t < N_VOCAB]) for row in out]


def truncate_log(path, first_dropped_step):
    """Keep only log.txt lines of steps before `first_dropped_step` (a resumed run
    rewrites the rest)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.split()[:1] and int(line.split()[0]) < first_dropped_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


# ---- the run ------------------------------------------------------------------------------


class Trainer:
    """Builds the model, optimizer and loaders from a TrainConfig and runs the loop."""

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
        self.accum = grad_accum_steps(cfg.total_batch_size, cfg.batch_size, cfg.block_size,
                                      self.dist.world_size)
        self.model = GPT(self.model_config, dtype=self.precision, seed=cfg.seed, backend=cfg.backend)
        self.optimizer = AdamW(self.model.parameters(), lr=cfg.max_lr, betas=(0.9, 0.95), eps=1e-8,
                               weight_decay=cfg.weight_decay)
        self.data_dir = cfg.data_dir or self._builtin_corpus()
        self.train_loader, self.val_loader = self._make_loaders()
        self.hellaswag_examples = self._load_hellaswag() if cfg.hellaswag_every else None
        self.rng = np.random.default_rng([cfg.seed, 1])  # draws each sampling's seed
        self.guard = StepGuard(cfg.max_bad_steps, cfg.skip_zscore)
        self.stop_request = StopRequest(say=self.log)
        self.step = 0  # optimizer steps done = the next step to run
        self.history = {"train": {}, "val": {}, "samples": {}, "hella": {}, "skipped": {}, "stopped": None}
        self.log_path = os.path.join(cfg.log_dir, "log.txt")

    def _check_config(self):
        cfg = self.cfg
        self.precision = cfg.dtype or default_precision(cfg.backend)  # bf16 on a GPU, else float32
        try:
            resolve_precision(self.precision, cfg.backend)  # bf16 on numpy: refused, saying why
        except (ValueError, RuntimeError) as e:
            raise ConfigError(str(e)) from e
        if cfg.vocab_size < N_VOCAB:
            raise ConfigError(f"--vocab-size {cfg.vocab_size} is smaller than GPT-2's {N_VOCAB} tokens")
        for name in ("max_steps", "batch_size", "val_steps", "num_samples"):
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

    def _load_hellaswag(self):
        """The val examples, rendered once: rank 0 fetches the file (downloading it
        if needed) while the others wait, then every rank reads it."""
        path = None
        try:
            if self.dist.is_master:
                path = hellaswag.data_file("val", path=self.cfg.hellaswag_path)
            self.dist.barrier()
            path = path or hellaswag.data_file("val", path=self.cfg.hellaswag_path, download=False)
            enc = get_encoding()
            examples = [hellaswag.render_example(e, enc) for e in hellaswag.load_examples(path)]
        except (OSError, RuntimeError, ValueError) as e:
            raise ConfigError(f"HellaSwag: {e}. Pass --hellaswag-path FILE, or --hellaswag-every 0 "
                              "to train without it") from e
        longest = max((r.tokens.shape[1] for r in examples), default=0)
        if longest > self.cfg.block_size:  # found now, not hundreds of steps into the run
            raise ConfigError(f"HellaSwag rows in {path} run to {longest} tokens, more than --block-size "
                              f"{self.cfg.block_size}; use a larger block size or --hellaswag-every 0")
        return examples

    def _make_loaders(self):
        cfg, d = self.cfg, self.dist
        common = dict(B=cfg.batch_size, T=cfg.block_size, rank=d.rank, world_size=d.world_size)
        train = DataLoader(self.data_dir, split="train", shuffle=cfg.shuffle, seed=cfg.seed, **common)
        val = DataLoader(self.data_dir, split="val", **common) if cfg.val_every else None
        return train, val

    # ---- starting and resuming -----------------------------------------------------------

    def start(self):
        """Fresh run: clear log.txt. With --resume: load the newest checkpoint that
        verifies, if any (rank 0 checks them; the others load rank 0's choice)."""
        cfg = self.cfg
        try:
            os.makedirs(cfg.log_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create --log-dir {cfg.log_dir}: {e.strerror or e}") from e
        path, ckpt, problem = None, None, None
        if cfg.resume and self.dist.is_master:
            try:
                path, ckpt = checkpoint.load_latest_good(cfg.log_dir, log=self.log)
            except checkpoint.CheckpointError as e:
                problem = str(e)
        path, problem = self.dist.allgather_json([path, problem])[0]  # every rank follows rank 0
        if problem:
            raise checkpoint.CheckpointError(problem)
        if cfg.resume and path is None:
            self.log(f"--resume: no checkpoint in {cfg.log_dir}, starting from step 0")
        if path is not None:
            self.resume_from(path, ckpt)
        # every rank starts from rank 0's weights (they agree already, by seed or by
        # checkpoint; the broadcast makes sure)
        self.dist.broadcast_(self.model.flat_params, root=0)
        if self.dist.is_master:
            if path is None:
                open(self.log_path, "w").close()  # a new run starts a new log, as build-nanogpt's
            else:
                truncate_log(self.log_path, self.step)

    def resume_from(self, path, ckpt=None):
        ckpt = ckpt or checkpoint.load_checkpoint(path)
        meta = checkpoint.restore(ckpt, self.model, self.optimizer, path)
        self._restore_loader(path, meta["loader_states"])
        self.rng.bit_generator.state = meta["rng_state"]
        self.guard.load_state(meta.get("guard", {}))
        self.step = meta["step"]
        self._warn_changed_flags(meta.get("train_args", {}))
        self.log(f"resumed from {path} at step {self.step}")

    def _restore_loader(self, path, states):
        """The same ranks and B: each rank continues its own loader exactly. Otherwise
        the shared position carries over and the new ranks split the rest (data.py)."""
        same = len(states) == self.dist.world_size and states[0].get("B") == self.cfg.batch_size
        if same:
            self.train_loader.load_state(states[self.dist.rank])
            return
        positions = {(s.get("epoch"), s.get("shard_index"), s.get("base")) for s in states}
        if len(positions) != 1:
            raise checkpoint.CheckpointError(f"{path}: its ranks saved different data positions {positions}")
        self.train_loader.load_state(states[0], reshard=True)
        self.log(f"resuming a run of {len(states)} rank(s) x B={states[0].get('B')} on "
                 f"{self.dist.world_size} x B={self.cfg.batch_size}: the same {self.cfg.total_batch_size:,} "
                 f"tokens per step ({self.accum} micro-steps now), the data position carried over "
                 f"({self.train_loader.tokens_read:,} tokens read); losses will not match the original "
                 "run bit for bit")

    def _warn_changed_flags(self, saved):
        now = dataclasses.asdict(self.cfg)
        changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in RESUME_SENSITIVE
                   if k in saved and saved[k] != now[k]]
        if changed:
            self.log("warning: flags differ from the checkpoint's run (" + ", ".join(changed)
                     + "); the continued run will not match the original one")

    def save(self):
        """Checkpoint after self.step steps; every rank contributes its loader position.
        Then the checkpoints beyond --keep-last are deleted (never the new one). A
        failed write stops every rank with rank 0's error."""
        states = self.dist.allgather_json(self.train_loader.state())
        path = checkpoint.checkpoint_path(self.cfg.log_dir, self.step)
        problem = None
        if self.dist.is_master:
            try:
                checkpoint.save_checkpoint(path, self.model, self.optimizer, self.step, states,
                                           self.rng.bit_generator.state, dataclasses.asdict(self.cfg),
                                           extra={"guard": self.guard.state()})
                self.log(f"saved checkpoint {path}")
                for old in checkpoint.prune_checkpoints(self.cfg.log_dir, self.cfg.keep_last, keep=[path]):
                    self.log(f"deleted old checkpoint {old} (--keep-last {self.cfg.keep_last})")
            except checkpoint.CheckpointError as e:
                problem = str(e)
        problem = self.dist.allgather_json(problem)[0]  # also: no rank looks for it before it exists
        if problem:
            raise checkpoint.CheckpointError(problem)
        self.last_saved = self.step
        return path

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

    def evaluate_before(self, step):
        cfg, last = self.cfg, step == self.cfg.max_steps - 1
        if cfg.val_every and (step % cfg.val_every == 0 or last):
            self.validate(step)
        if cfg.hellaswag_every and (step % cfg.hellaswag_every == 0 or last):
            self.evaluate_hellaswag(step)
        if cfg.sample_every and ((step > 0 and step % cfg.sample_every == 0) or last):
            self.sample(step)

    def train_one_step(self, step):
        """Gradients, then AdamW unless the guard skips the step. -> whether some rank
        was signalled to stop (known to all ranks at once, from the loss allreduce)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = cosine_lr(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        loss, votes = accumulate_gradients(self.model, self.train_loader, self.accum, self.dist,
                                           int(cfg.bucket_mb * 2**20),
                                           stop_vote=lambda: float(self.stop_request.requested))
        norm = clip_grad_norm(self.model.grads, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        skipped = self.guard.judge(loss, norm)  # the same on every rank: loss and norm are
        if skipped is None:  # computed from numbers the allreduce made equal
            self.optimizer.step(self.model.grads, lr=lr)
        synchronize(self.xp)
        self.step = step + 1
        self.report(step, loss, lr, norm, time.perf_counter() - t0)
        if skipped is not None:
            self.history["skipped"][step] = skipped
            self.log(f"step {step:5d} | skipped: {skipped}; no update, AdamW's moments untouched")
            self.append_log(f"{step} skipped {skipped}")
        if self.guard.must_stop:
            self.stop_for_bad_steps(step)
        return votes > 0

    def stop_for_bad_steps(self, step):
        path = self.save() if self.last_saved != self.step else checkpoint.checkpoint_path(self.cfg.log_dir, self.step)
        raise TrainingStopped(
            f"{self.guard.bad_in_row} non-finite steps in a row (the last: step {step}, "
            f"{self.history['skipped'][step]}); the weights of the last good step are in {path}. "
            f"Lower --max-lr or check the data, then --resume (or raise --max-bad-steps)", collective=True)

    def stop_for_signal(self):
        if self.last_saved != self.step:
            self.save()
        path = checkpoint.checkpoint_path(self.cfg.log_dir, self.step)
        self.history["stopped"] = {"signal": self.stop_request.signal_name or "a signal on another rank",
                                   "step": self.step, "checkpoint": path}

    def validate(self, step):
        loss = evaluate(self.model, self.val_loader, self.cfg.val_steps, self.dist)
        self.history["val"][step] = loss
        self.log(f"step {step:5d} | val loss {loss:.4f}")
        self.append_log(f"{step} val {loss:.4f}")
        return loss

    def evaluate_hellaswag(self, step):
        result = hellaswag.evaluate(self.model, self.hellaswag_examples, rank=self.dist.rank,
                                    world_size=self.dist.world_size, reduce_sum=self.dist.allreduce_sum_,
                                    examples_per_forward=4)
        self.history["hella"][step] = result.acc_norm
        self.log(f"step {step:5d} | HellaSwag acc_norm {result.acc_norm:.4f} "
                 f"(acc {result.acc:.4f}, {result.n} examples)")
        self.append_log(f"{step} hella {result.acc_norm:.4f}")
        return result

    def sample(self, step):
        seed = int(self.rng.integers(2**63))  # drawn on every rank, so the RNGs stay in step
        if not self.dist.is_master:
            return
        cfg = self.cfg
        texts = generate_samples(self.model, cfg.prompt, cfg.num_samples, cfg.sample_tokens, seed)
        self.history["samples"][step] = texts
        for i, text in enumerate(texts):
            self.log(f"sample {i}: {text!r}")

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
                 f"{100 * self.step / cfg.max_steps:.0f}% ETA {format_seconds(eta)}")


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
    except (ConfigError, DataError, checkpoint.CheckpointError, TrainingStopped) as e:
        if getattr(e, "collective", False):  # every rank stopped here: rank 0 speaks for all
            if dist.is_master:
                print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        if dist.world_size > 1:  # the other ranks may wait in a collective: stop them too
            dist.abort(1, f"error on rank {dist.rank}: {e}")
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
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
