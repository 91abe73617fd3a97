"""scripts/bench.py's flags, and which measurement they ask for."""
import argparse
import os
import sys

from . import memory, ranks, timing

PRESETS = {
    "small": dict(n_layer=4, n_embd=256, n_head=4, block_size=256, batch_size=4, vocab=50304),
    "124m": dict(n_layer=12, n_embd=768, n_head=12, block_size=1024, batch_size=1, vocab=50304),
}


SHAPE_FLAGS = ("n_layer", "n_embd", "n_head", "block_size", "batch_size", "vocab")


IMPLS = ("numpy", "torch")


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


def check_thread_env(threads):
    """The thread pools read their sizes when their libraries load, so the script sets
    THREAD_ENV before anything imports numpy (scripts/bench.py, set_thread_env); here
    we only check that it did."""
    wrong = [v for v in THREAD_ENV if os.environ.get(v) != str(threads)]
    if wrong:
        raise RuntimeError(f"{', '.join(wrong)} must be {threads} before numpy is imported; run scripts/bench.py, "
                           "which sets them from --threads")


def shape_of(args):
    return {f: getattr(args, f) for f in SHAPE_FLAGS}


def main(argv=None, script=None, twin=None):
    """script: the file the child processes run (scripts/bench.py); twin: the PyTorch
    step (benchmarks/torch_twin.py), None to time nanogpt_np alone."""
    argv = sys.argv[1:] if argv is None else argv
    child = "--_child-memory" in argv
    child_mpi = "--_child-ranks" in argv
    argv_clean = [a for a in argv if a not in ("--_child-memory", "--_child-ranks")]
    args = parse_args(argv_clean)
    check_thread_env(args.threads)
    args.shape, args.script, args.twin = shape_of(args), script, twin
    if script is None and (args.memory or args.ranks is not None):
        sys.exit("error: --memory and --ranks start child processes of scripts/bench.py; run it")
    if child_mpi:
        ranks.child_ranks(args)
    elif args.ranks is not None:
        ranks.run_ranks(args, argv_clean)
    elif child:
        memory.child_peak_memory(args)
    elif args.memory:
        memory.run_memory(args, argv_clean)
    elif args.profile:
        timing.profile_parts(args)
    else:
        timing.run_timing(args)
