"""Peak resident memory of each library's step, each in a fresh process."""
import json
import os
import resource
import subprocess
import sys

from .steps import make_batches, make_runner
from .timing import IMPLS, describe

MEMORY_STEPS = 3


def child_peak_memory(args):
    """In a child process: the step for one library, then its peak RSS as JSON."""
    shape = args.shape
    if args.impl == "torch":
        args.twin.load_torch()  # its libraries' resident size is not the step's
    rss_imports = _rss_now()
    runner = make_runner(args.impl, args)
    for idx, targets in make_batches(shape, args.warmup + args.steps, args.seed):
        runner(idx, targets)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps(dict(impl=args.impl, peak_rss=peak, rss_after_imports=rss_imports)))


def _rss_now():
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_memory(args, argv):
    """Peak RSS of each library's training step, each in a fresh process so neither
    sees the other's allocations (and the NumPy process never loads torch)."""
    impls = IMPLS if args.impl == "both" else (args.impl,)
    base = [a for a in argv if a not in ("--memory", "--json")]
    results = {}
    for impl in impls:
        # steps beyond the second add nothing: AdamW's moments exist from the first
        # step on, so the second step's backward already meets the largest footprint
        cmd = [sys.executable, args.script, *base, "--impl", impl, "--warmup", "0",
               "--steps", str(MEMORY_STEPS), "--_child-memory"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(dict(config=args.shape, threads=args.threads, memory=results)))
        return results
    print(f"config : {describe(args)}")
    print(f"memory : peak RSS of {MEMORY_STEPS} training steps (with AdamW state), "
          "one fresh process per library")
    print()
    print(f"{'impl':<8}{'peak RSS MB':>13}{'after imports MB':>18}{'step MB':>10}")
    for impl, r in results.items():
        print(f"{impl:<8}{r['peak_rss'] / 1e6:>13.0f}{r['rss_after_imports'] / 1e6:>18.0f}"
              f"{(r['peak_rss'] - r['rss_after_imports']) / 1e6:>10.0f}")
    if set(results) == set(IMPLS):
        ratio = results["numpy"]["peak_rss"] / results["torch"]["peak_rss"]
        print()
        print(f"ratio numpy/torch peak RSS: {ratio:.2f}")
    return results
