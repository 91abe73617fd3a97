"""What every gpu_check section reads: the sizes of its checks, the limits, the card
peaks, the PyTorch reference, and the run's start time. Kept in one module so the
CPU dry run (tests/kernels/test_gpu_check.py) can shrink every size in one place."""
import time

import numpy as np

from nanogpt_np.config import GPTConfig

START = time.time()
ROWS_ENV = "GPU_CHECK_ROWS"  # a JSON-lines file the section processes append their rows to
# The PyTorch reference runs (benchmarks/torch_twin.py). The package never imports
# torch: scripts/gpu_check.py sets this; None leaves those rows saying so.
TWIN = None
# how a section's own process is started (after the Python executable): the script
# sets its own path, so the section processes get the PyTorch reference too
SECTION_COMMAND = ["-m", "nanogpt_np.gpucheck"]
# the backend section 7 runs scripts/train.py with (the CPU dry run uses numpy)
TRAIN_BACKEND = "cupy"
# Every size the checks use, in one place (the CPU dry run in tests/test_gpu_check.py shrinks them).
SIZES = dict(
    attention=[(2, 1, 2, np.float32), (2, 77, 3, np.float32), (1, 333, 2, np.float64), (2, 1024, 12, np.float32),
               (1, 1000, 4, np.float64)],  # B, T, NH (head size 64), dtype
    attention_bf16=[(2, 1, 2), (2, 77, 3), (1, 333, 2), (2, 1024, 12)],  # B, T, NH
    layernorm=[((2, 77, 768), np.float32), ((2, 77, 768), np.float64), ((8, 1023, 768), np.float32)],
    gelu=[((4, 1023, 3072), np.float32), ((2, 77, 3072), np.float64)],
    cross_entropy=[(2, 77, 50257, np.float32), (2, 77, 50257, np.float64), (4, 1024, 50304, np.float32)],
    adamw=[(3_000_001, np.float32), (100_003, np.float64)],
    bf16_rows=(4, 1023, 768, 50304),  # B, T, C, V of the bf16 LayerNorm/GELU/fused/cross-entropy rows
    gemm=[(1024, 768, 2304), (777, 3072, 768), (16384, 768, 768)],  # M, K, N
    small_model=(GPTConfig(block_size=128, vocab_size=1000, n_layer=2, n_head=4, n_embd=256), 2, 77),
    big_model=(GPTConfig(), 1, 1024),  # GPT-2 124M, vocab 50257
    train=(GPTConfig(block_size=128, vocab_size=2048, n_layer=4, n_head=4, n_embd=256), 20, 8, 128),
    attention_bench=(16, 12, 1024, 64),  # B, NH, T, hs
    speed=(GPTConfig(vocab_size=50304), 16, 1024),  # build-nanogpt's 124M step
    speed_350m=(GPTConfig(vocab_size=50304, n_layer=24, n_head=16, n_embd=1024), 16, 1024),  # the 350M preset
    train_script=dict(n_layer=4, n_head=4, n_embd=256, T=256, B=4, tokens=2048, steps=30),  # section 7
    host=(1, 64),  # B, T of the step whose GPU work is negligible: its time is the host's
    graph_steps=10,  # the eager-versus-graphs row's steps (the same weights and batches both ways)
    timing_reps=None,  # a cap on every timed row's repetitions (table.median_ms); None: each row's own
    curve=(GPTConfig(vocab_size=50304), 50, 8, 1024),  # config, steps, B, T
    recipe=(GPTConfig(vocab_size=50304), 50, 16, 1024),  # ours vs build-nanogpt's loop: config, steps, B, T
)
TORCH_DEVICE = "cuda"
F32_LIMIT, F64_LIMIT = 1e-4, 1e-10  # kernel rows: float32 vs a float64 reference, float64 vs float64
BF16_LIMIT = 8e-3  # one rounding to bf16 is 2^-8 = 3.9e-3 of the largest value; twice that, for slack
BF16_ATTENTION_LIMIT = 2e-2  # P is rounded to bf16 before P @ V, and dS before dS @ K
# dense bf16 tensor-core peak FLOP/s by card, for MFU (as build-nanogpt and llm.c count it)
BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12)]
