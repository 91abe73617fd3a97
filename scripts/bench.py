#!/usr/bin/env python3
"""Time one training step of nanogpt_np against PyTorch, on the same machine, in one run.

A step is what scripts/train.py does for one micro-batch with no accumulation:
zero the gradients, forward, backward, clip the global gradient norm to 1.0 and
take an AdamW step (two weight-decay groups, as build-nanogpt makes them). The
reference is build-nanogpt's GPT-2 in eager PyTorch, float32 on the CPU
(tests/torch_gpt.py), with the same shape, the same batches and the same number
of threads.

    python scripts/bench.py --preset small          # 4 layers, C=256, B=4, T=256
    python scripts/bench.py --preset 124m           # GPT-2 124M, B=1, T=1024
    python scripts/bench.py --n-layer 4 --n-embd 256 --n-head 4 --block-size 256 \\
        --batch-size 4 --vocab 50304 --steps 10 --threads 2
    python scripts/bench.py --preset 124m --memory  # peak RSS, one process per library
    python scripts/bench.py --preset 124m --ranks 1,2   # data parallel over MPI ranks (needs '.[mpi]')
    python scripts/bench.py --preset 124m --batch-size 16 --ranks 1,8 --backend cupy   # 8 GPUs

The two libraries take turns step by step, so a neighbour that steals the CPU for a
while slows both alike; the report gives the median of the timed steps. Thread
counts are fixed before NumPy is imported: OpenBLAS (NumPy's matmuls), OpenMP and
nanogpt_np's own elementwise threads all get --threads, and torch.set_num_threads
gets it too.

The harness is nanogpt_np/bench/; the PyTorch step is benchmarks/torch_twin.py,
which the package never imports. This script only fixes the thread counts (before
NumPy loads) and hands both to nanogpt_np.bench.cli.main.
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
