"""Every flag of scripts/train.py: TrainConfig, the presets, the parser, and the
gradient accumulation they imply."""
import argparse
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
