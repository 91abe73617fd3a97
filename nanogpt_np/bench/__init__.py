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

The harness lives here (cli: flags and dispatch; steps: nanogpt_np's step and the
batches; timing: the comparison and the profile; memory: peak RSS per library;
ranks: the data-parallel step under mpiexec). The PyTorch step is
benchmarks/torch_twin.py, outside the package, which scripts/bench.py hands in.
"""
