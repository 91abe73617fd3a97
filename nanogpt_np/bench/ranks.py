"""nanogpt_np's data-parallel step under mpiexec, for each rank count."""
import json
import os
import statistics
import subprocess
import sys
import time

from .steps import NumpyStep, make_batches
from .timing import describe


def child_ranks(args):
    """Under mpiexec: each rank runs the data-parallel step as train.py does (its own
    batch of B rows; the gradients summed in --bucket-mb buckets sent during
    backward, then averaged; clip and AdamW), timing the step and the allreduce
    time left after backward (what the overlap did not hide). Afterwards, the same
    bytes through one bare comm.Allreduce, for comparison. Rank 0 prints the
    medians as JSON."""
    from nanogpt_np import distributed
    from nanogpt_np.backend import get_xp, to_device
    from nanogpt_np.training.progress import synchronize

    dist = distributed.init()
    xp = get_xp(args.backend)
    dist.pin_device(xp)  # GPU local_rank, before the model allocates anything

    def now():  # GPU work is asynchronous: a time stamp waits for it first
        synchronize(xp)
        return time.perf_counter()

    runner = NumpyStep(args.shape, args.seed, backend=args.backend)
    model = runner.model
    steps, reduces = [], []
    for i, (idx, targets) in enumerate(make_batches(args.shape, args.warmup + args.steps,
                                                    args.seed + dist.rank)):
        idx, targets = to_device(idx, xp), to_device(targets, xp)
        dist.barrier()
        t0 = now()
        model.zero_grad()
        buckets = dist.gradient_buckets(model.flat_grads, int(args.bucket_mb * 2**20))
        model.forward(idx, targets)
        model.backward(grads_final=buckets.ready if buckets else None)
        t1 = now()  # the compute stream is done; buckets may still be in flight
        if buckets:
            buckets.finish()
            model.flat_grads /= dist.world_size
        t2 = now()
        runner.clip(model.grads, 1.0)
        runner.opt.step(model.grads, lr=6e-4)
        t3 = now()
        if i >= args.warmup:
            steps.append(t3 - t0)
            reduces.append(t2 - t1)
    bare = []
    if dist.world_size > 1:
        buf = xp.ones_like(model.flat_grads)
        for i in range(args.warmup + args.steps):
            dist.barrier()
            t0 = now()
            dist.allreduce_sum_(buf)  # one blocking collective: MPI in place, or the GPU transport
            if i >= args.warmup:
                bare.append(now() - t0)
    # the slowest rank sets the pace: report the largest median over the ranks
    per_rank = dist.allgather_json([statistics.median(steps), statistics.median(reduces),
                                    statistics.median(bare) if bare else 0.0])
    step_s, allreduce_s, bare_s = (max(column) for column in zip(*per_rank))
    if dist.is_master:
        print(json.dumps(dict(ranks=dist.world_size, step_s=step_s, allreduce_s=allreduce_s,
                              bare_allreduce_s=bare_s, grad_bytes=int(model.flat_grads.nbytes))))


def mpiexec_path():
    import shutil

    venv_bin = os.path.dirname(sys.executable)
    return shutil.which("mpiexec", path=venv_bin + os.pathsep + os.environ.get("PATH", ""))


def run_ranks(args, argv):
    """Tokens/s of nanogpt_np's step for each rank count, and the allreduce's cost."""
    mpiexec = mpiexec_path()
    if mpiexec is None:
        sys.exit("error: --ranks needs mpiexec; install it with `python3 -m pip install -e '.[mpi]'`")
    base = [a for a in argv if a != "--json"]
    base = [a for i, a in enumerate(base) if a != "--ranks" and (i == 0 or base[i - 1] != "--ranks")]
    base = [a for i, a in enumerate(base) if a != "--threads" and (i == 0 or base[i - 1] != "--threads")]
    results = []
    for n in args.ranks:
        per_rank = max(1, args.threads // n)
        cmd = [mpiexec, "-n", str(n), sys.executable, args.script, *base, "--threads", str(per_rank),
               "--_child-ranks"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(threads_per_rank=per_rank, tok_per_s=n * args.batch_size * args.block_size / r["step_s"])
        results.append(r)
    one = next((r for r in results if r["ranks"] == 1), None)
    for r in results:  # tokens/s against 1 rank: N for N GPUs scaling perfectly; on one
        # CPU the ranks share its cores, so there the ideal is 1
        r["speedup"] = r["tok_per_s"] / one["tok_per_s"] if one else None
    if args.json:
        print(json.dumps(dict(config=args.shape, threads=args.threads, ranks=results)))
        return results
    device = "one GPU per rank, bf16" if args.backend == "cupy" else "CPU, float32"
    print(f"config : {describe(args)} in all, shared out among the ranks; {device}")
    print(f"step   : per rank B={args.batch_size} x T={args.block_size}: forward + backward (sending "
          f"{args.bucket_mb:g} MiB gradient buckets as they are final) + the rest of the allreduce + clip + "
          f"AdamW; medians of {args.steps} steps after {args.warmup} warmup")
    print()
    print(f"{'ranks':>5}{'thr/rank':>10}{'step ms':>10}{'tokens/s':>10}{'allreduce ms':>14}"
          f"{'bare Allreduce ms':>19}{'ratio':>7}{'speedup':>9}")
    for r in results:
        bare = r["bare_allreduce_s"]
        ratio = f"{r['allreduce_s'] / bare:.2f}" if bare else "-"
        speedup = f"{r['speedup']:.2f}" if r["speedup"] is not None else "-"
        print(f"{r['ranks']:>5}{r['threads_per_rank']:>10}{r['step_s'] * 1e3:>10.1f}{r['tok_per_s']:>10.1f}"
              f"{r['allreduce_s'] * 1e3:>14.1f}{bare * 1e3 if bare else 0:>19.1f}{ratio:>7}{speedup:>9}")
    print()
    print(f"gradient: {results[0]['grad_bytes'] / 1e6:.0f} MB per step; 'allreduce' is the time from the "
          "end of backward to the averaged gradients (the part the overlap did not hide); 'bare' is one "
          "blocking allreduce of the same bytes in place; ratio = allreduce / bare; speedup = tokens/s "
          "against 1 rank (with 1 in --ranks; the ideal is N for N GPUs, 1 for ranks sharing one CPU)")
    return results
