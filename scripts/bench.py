#!/usr/bin/env python3
"""Time one training step of nanogpt_np against PyTorch, on the same machine, in one run.

    python scripts/bench.py --preset small          # also --preset 124m, --memory, --profile, --ranks 1,2

What is timed and how: nanogpt_np/bench/__init__.py; every flag: --help. This script
only fixes the thread counts (before NumPy loads) and hands the harness the PyTorch
step, benchmarks/torch_twin.py, which the package never imports.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the thread pools' sizes, read by their libraries when they load: set before anything imports numpy
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NANOGPT_NP_THREADS")


def set_thread_env(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    threads = pre.parse_known_args(argv)[0].threads
    for var in THREAD_ENV:
        os.environ[var] = str(threads)


if __name__ == "__main__":
    set_thread_env(sys.argv[1:])
    sys.path.insert(0, str(ROOT))  # this checkout's nanogpt_np, benchmarks/ and tests/torch_gpt.py
    from benchmarks import torch_twin
    from nanogpt_np.bench.cli import main

    main(script=os.path.abspath(__file__), twin=torch_twin)
