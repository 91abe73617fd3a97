"""Score a GPT-2 on HellaSwag (completion style, as build-nanogpt does).

    python scripts/hellaswag.py --pretrained gpt2                 # downloads val when missing
    python scripts/hellaswag.py --llmc-bin gpt2_124M.bin --path hellaswag_val.jsonl
    mpiexec -n 8 python scripts/hellaswag.py --pretrained gpt2 --backend cupy

Prints acc (lowest summed loss over the ending) and acc_norm (lowest mean loss).
build-nanogpt reports acc 0.2859, acc_norm 0.2955 for GPT-2 124M on the 10042 val examples.
Under mpiexec the examples are split across ranks and the counts summed.
"""
import argparse
import sys
import time

from model_source import add_model_args, load_model
from nanogpt_np import distributed, hellaswag
from nanogpt_np.backend import get_xp


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--split", choices=("train", "val", "test"), default="val")
    p.add_argument("--path", help="a hellaswag_{split}.jsonl already on disk (no download)")
    p.add_argument("--data-dir", help=f"where downloads go (default {hellaswag.default_data_dir()})")
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--examples-per-forward", type=int, default=1,
                   help="examples whose 4 rows share a forward (more is faster on a GPU)")
    p.add_argument("--print-every", type=int, default=100, help="progress line every N examples (0: none)")
    return p.parse_args(argv)


def fail(dist, message, everywhere=False):
    """One error line for the job, and every rank stopped (one rank exiting alone
    would leave the others waiting in a collective): distributed.report_failure."""
    sys.exit(distributed.report_failure(dist, message, everywhere))


def main(argv=None):
    args = parse_args(argv)
    dist = distributed.init()  # one process, or the ranks mpiexec started
    rank = dist.rank
    # Only rank 0 downloads; the others learn the path (or the error) from it.
    found = {"path": None, "error": None}
    if rank == 0:
        try:
            found["path"] = str(hellaswag.data_file(args.split, path=args.path, data_dir=args.data_dir))
        except (ValueError, OSError, RuntimeError) as e:
            found["error"] = str(e)
    found = dist.allgather_json(found)[0]
    if found["error"]:
        fail(dist, found["error"], everywhere=True)  # every rank has rank 0's answer
    try:
        dist.pin_device(get_xp(args.backend))  # one GPU per rank
        examples = hellaswag.load_examples(found["path"], limit=args.limit, need_labels=True)
        model = load_model(args)
    except (ValueError, OSError, RuntimeError) as e:
        fail(dist, e)

    def progress(done, total, counts):
        if rank == 0 and args.print_every and (done % args.print_every == 0 or done == total):
            print(f"rank 0: {done}/{total} acc {counts[0] / done:.4f} acc_norm {counts[1] / done:.4f}", flush=True)

    t0 = time.perf_counter()
    try:
        result = hellaswag.evaluate(model, examples, rank=rank, world_size=dist.world_size,
                                    reduce_sum=dist.allreduce_sum_,
                                    examples_per_forward=args.examples_per_forward, progress=progress)
    except ValueError as e:
        fail(dist, e)
    if rank == 0:
        print(f"hellaswag {args.split}: {result.n} examples, acc {result.acc:.4f}, acc_norm {result.acc_norm:.4f} "
              f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
