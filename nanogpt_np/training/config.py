"""Every flag of scripts/train.py: TrainConfig, the presets, the parser, and the
gradient accumulation they imply."""
import argparse
import math
import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from ..distributed import DEFAULT_BUCKET_BYTES
from .errors import ConfigError


@dataclass
class TrainConfig:
    """Every flag of scripts/train.py; the defaults are build-nanogpt's GPT-2 124M run."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # the sequence length T of training
    vocab_size: int = 50304  # 50257 padded to a multiple of 128
    batch_size: Union[int, str] = 64  # B, sequences per micro-step per rank, or "auto"
    total_batch_size: Optional[int] = 524288  # tokens per optimizer step (~0.5M, as GPT-3 small);
    # None: B*T*ranks, one micro-step per rank (the tiny preset, so it runs at any rank count)
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
    overwrite: bool = False  # replace the run already in --log-dir
    force: bool = False  # start even over the memory plan, or --resume with changed flags
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
    memory_gib: Optional[float] = None  # memory to plan for (None: the device's free memory)
    recompute: bool = False  # backward recomputes the LayerNorm and GELU outputs
    zero: int = 0  # 1: ZeRO-1, AdamW's moments sharded over the ranks
    collective_timeout: float = 600.0  # seconds a collective may take before the job ends (0: no watchdog)
    straggler_every: int = 100  # compare the ranks' step times every N steps (0: off)
    cuda_graphs: str = "on"  # cupy: capture the step into CUDA graphs after two eager steps


PRESETS = {
    # build-nanogpt's run; the same as the defaults, named for clarity
    "124M": {},
    # the larger GPT-2 sizes, with the batch, learning rate and schedule of llm.c's
    # reproductions (scripts/run_gpt2_{350M,774M,1558M}.sh; docs/memory.md): -q 0.0 there is
    # a cosine decay to 0, -q 0.1 to a tenth of the peak
    "350M": dict(n_layer=24, n_head=16, n_embd=1024, batch_size=64, total_batch_size=524288,
                 max_lr=3e-4, min_lr=0.0, warmup_steps=700, max_steps=60000),
    "774M": dict(n_layer=36, n_head=20, n_embd=1280, batch_size=32, total_batch_size=524288,
                 max_lr=2.5e-4, min_lr=0.0, warmup_steps=700, max_steps=286102),
    "1558M": dict(n_layer=48, n_head=25, n_embd=1600, batch_size=16, total_batch_size=1048576,
                  max_lr=6e-4, min_lr=6e-5, warmup_steps=700, max_steps=32000),
    # a few minutes on a 2-core CPU, on the built-in corpus: a 3.4M-parameter model
    # (most of it the 50304 x 64 embedding; the vocab-sized output layer is most of
    # the work), 200 steps of B*T*ranks tokens (1024 on one process)
    "tiny": dict(
        n_layer=4, n_head=4, n_embd=64, block_size=128, batch_size=8, total_batch_size=None,
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
    "batch_size": "micro-batch B per rank, or auto: the largest that divides the tokens per step and fits "
                  "the memory plan", "total_batch_size": "tokens per optimizer step (the tiny preset: B*T*ranks)",
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
    "overwrite": "replace the run already in --log-dir (its log.txt, run.json, log.png and checkpoints)",
    "force": "start even when the memory plan is over the memory available, or when --resume finds the "
             "checkpoint trained with other flags",
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
    "memory_gib": "memory per rank that --batch-size auto and the plan count on (default: free GPU memory or "
                  "available RAM)",
    "cuda_graphs": "with --backend cupy: capture each micro-step and the optimizer step into CUDA graphs "
                   "(after two eager warm-up steps; anything uncapturable runs eagerly, saying why); "
                   "off: every step eager",
    "recompute": "keep fewer activations: backward recomputes the LayerNorm and GELU outputs (llm.c's -r)",
    "zero": "1: ZeRO-1, each rank keeps 1/ranks of AdamW's moments (gradients reduce-scattered, "
            "parameters all-gathered); 0: every rank keeps all",
    "collective_timeout": "several ranks: end the job when a collective (allreduce, broadcast, ...) has not "
                          "completed in this many seconds, naming the ranks that never arrived, after "
                          "checkpointing the last completed step (0: wait forever)",
    "straggler_every": "several ranks: every N steps, print the slowest rank's step time when it is >20%% above "
                       "the median, and log the ranks' times to log.txt (0: off)",
}


def build_parser():
    p = argparse.ArgumentParser(
        description="Train GPT-2 with nanogpt_np (build-nanogpt's recipe by default).",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line are set
    )
    choices = {"cuda_graphs": ["on", "off"], "backend": ["numpy", "cupy"], "dtype": ["float32", "float64", "bf16"], "preset": sorted(PRESETS)}
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        help_text = FLAG_HELP[field.name] + ("" if default is None else f" (default: {default})")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help_text)
            continue
        kinds = {"peak_tflops": float, "memory_gib": float, "batch_size": batch_size_arg}
        kind = kinds.get(field.name) or (type(default) if default is not None else str)
        p.add_argument(flag, type=kind, choices=choices.get(field.name), help=help_text)
    return p


def batch_size_arg(text):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of sequences nor 'auto'") from None


def parse_args(argv=None):
    """TrainConfig from the command line: defaults, then the preset, then explicit flags."""
    given = vars(build_parser().parse_args(argv))
    values = dict(PRESETS[given["preset"]]) if given.get("preset") else {}
    values.update(given)
    return TrainConfig(**values)


def grad_accum_steps(total_batch_size, B, T, world_size=1):
    tokens_per_micro = B * T * world_size
    if total_batch_size % tokens_per_micro:
        raise ConfigError(
            f"--total-batch-size {total_batch_size} is not divisible by B*T*ranks = "
            f"{B}*{T}*{world_size} = {tokens_per_micro}; pick a multiple of {tokens_per_micro}"
        )
    return total_batch_size // tokens_per_micro


# ---- every value checked before any work ------------------------------------------------

POSITIVE = ("n_layer", "n_head", "n_embd", "block_size", "max_steps", "val_steps", "num_samples")
COUNTS = ("val_every", "sample_every", "ckpt_every", "warmup_steps", "sample_tokens", "hellaswag_every",
          "max_bad_steps", "keep_last", "straggler_every", "seed")  # 0 turns the first ones off
RATES = {  # flag: (lowest, whether the lowest is allowed, what it is)
    "max_lr": (0.0, False, "the peak learning rate"),
    "weight_decay": (0.0, True, "AdamW's decoupled weight decay"),
    "grad_clip": (0.0, True, "the gradient norm clip (0: off)"),
    "skip_zscore": (0.0, True, "the spike z-score (0: off)"),
    "bucket_mb": (0.0, True, "MiB per gradient bucket (0: one allreduce)"),
    "collective_timeout": (0.0, True, "seconds a collective may take (0: no watchdog)"),
    "memory_gib": (0.0, False, "GiB of memory per rank"),
    "peak_tflops": (0.0, False, "the peak TFLOPS MFU divides by"),
}


def flag(name):
    return "--" + name.replace("_", "-")


def validate_config(cfg, n_vocab):
    """Raise ConfigError on the first value no run can use, saying the allowed range.
    Whole-number flags must be integers in range; float flags finite and in range."""
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{flag(name)} {getattr(cfg, name)}: must be a whole number >= 1")
    for name in COUNTS:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{flag(name)} {getattr(cfg, name)}: must be a whole number >= 0"
                              + ("" if name == "seed" else " (0 turns it off)" if name.endswith("every") else ""))
    for name, (low, inclusive, what) in RATES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise ConfigError(f"{flag(name)} {value:g}: {what} must be a finite number {bound}")
    if not (math.isfinite(cfg.min_lr) and 0 <= cfg.min_lr <= cfg.max_lr):
        raise ConfigError(f"--min-lr {cfg.min_lr:g}: the final learning rate must be a finite number in "
                          f"[0, --max-lr {cfg.max_lr:g}]")
    if cfg.n_embd % cfg.n_head:
        heads = [h for h in range(1, cfg.n_embd + 1) if cfg.n_embd % h == 0 and h <= 64]
        raise ConfigError(f"--n-embd {cfg.n_embd} is not divisible by --n-head {cfg.n_head}: each head takes "
                          f"n_embd/n_head channels; pick a head count that divides it ({', '.join(map(str, heads[-6:]))})")
    if cfg.vocab_size < n_vocab:
        raise ConfigError(f"--vocab-size {cfg.vocab_size} is smaller than GPT-2's {n_vocab} tokens")
    if cfg.cuda_graphs not in ("on", "off"):
        raise ConfigError(f"--cuda-graphs {cfg.cuda_graphs!r}: on or off")
    if cfg.zero not in (0, 1):
        raise ConfigError(f"--zero {cfg.zero}: 0 (every rank keeps all of AdamW) or 1 (ZeRO-1) only")
    if cfg.batch_size != "auto" and not (isinstance(cfg.batch_size, int) and cfg.batch_size > 0):
        raise ConfigError(f"--batch-size {cfg.batch_size!r}: must be a whole number >= 1, or auto")
    if cfg.total_batch_size is not None and cfg.total_batch_size <= 0:
        raise ConfigError(f"--total-batch-size {cfg.total_batch_size}: must be a whole number >= 1 "
                          "(tokens per optimizer step)")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in --log-dir and --overwrite replaces it: give one of them")
