"""Score a GPT-2 on HellaSwag (completion style, as build-nanogpt does).

    python scripts/hellaswag.py --pretrained gpt2                 # downloads val when missing
    python scripts/hellaswag.py --llmc-bin gpt2_124M.bin --path hellaswag_val.jsonl
    mpiexec -n 8 python scripts/hellaswag.py --pretrained gpt2 --backend cupy

Prints acc (lowest summed loss over the ending) and acc_norm (lowest mean loss).
build-nanogpt reports acc 0.2859, acc_norm 0.2955 for GPT-2 124M on the 10042 val examples.
Under mpiexec the examples are split across ranks and the counts summed.
"""
import argparse
import os
import sys
import time

from model_source import add_model_args, load_model
from nanogpt_np import hellaswag


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


def mpi_world():
    """(rank, world_size, reduce_sum) from MPI when launched by mpiexec, else a single process."""
    launched = any(int(os.environ.get(v, "1")) > 1 for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not launched:
        return 0, 1, None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size(), lambda counts: comm.allreduce(counts, op=MPI.SUM)


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, reduce_sum = mpi_world()
    path, error = None, None
    if rank == 0 or args.path:  # under MPI only rank 0 downloads
        try:
            path = str(hellaswag.data_file(args.split, path=args.path, data_dir=args.data_dir))
        except (ValueError, OSError, RuntimeError) as e:
            error = str(e)
    if world_size > 1 and not args.path:
        from mpi4py import MPI

        path, error = MPI.COMM_WORLD.bcast((path, error), root=0)
    if error:
        sys.exit(f"error: {error}")
    try:
        if args.backend == "cupy" and world_size > 1:
            import cupy

            cupy.cuda.Device(rank % cupy.cuda.runtime.getDeviceCount()).use()  # one GPU per rank
        examples = hellaswag.load_examples(path, limit=args.limit)
        model = load_model(args)
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")

    def progress(done, total, counts):
        if rank == 0 and args.print_every and (done % args.print_every == 0 or done == total):
            print(f"rank 0: {done}/{total} acc {counts[0] / done:.4f} acc_norm {counts[1] / done:.4f}", flush=True)

    t0 = time.perf_counter()
    try:
        result = hellaswag.evaluate(model, examples, rank=rank, world_size=world_size, reduce_sum=reduce_sum,
                                    examples_per_forward=args.examples_per_forward, progress=progress)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if rank == 0:
        print(f"hellaswag {args.split}: {result.n} examples, acc {result.acc:.4f}, acc_norm {result.acc_norm:.4f} "
              f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
