#!/usr/bin/env python3
"""Check the CuPy backend on a GPU, in one command, and print a table.

    python scripts/gpu_check.py --text gpu_data/shakespeare.npy      # about 3 minutes on an H200
    python scripts/gpu_check.py --budget 200 --no-compile

Needs only this repository and a GPU machine's Python with NumPy, CuPy (14, with
ml_dtypes for bf16) and a CUDA build of PyTorch (PyTorch is the speed reference; the
package never imports it). Each section runs in its own Python process, so a CUDA
error that poisons one process (an illegal address is sticky) costs that section's
remaining rows and nothing else; a failing row prints its error and the others
still run. Sections, in the order they run:
  0. the environment, NVRTC compiling every kernel;
  1. every kernel against its NumPy layer on random inputs, odd T included: the max
     relative error max|gpu - ref| / max|ref| per row (float32 kernels against a
     float64 reference, float64 against float64, bf16 against float64 computed
     from the same bf16 inputs), the gemmEx wrapper and the fused kernels too;
  2. the whole model's loss, logits and every gradient, GPU against the NumPy
     backend, for a small config and for the GPT-2 124M shape at T=1024, in
     float64, float32 (and TF32) and bf16;
  3. 20 AdamW training steps on the GPU against the same steps in NumPy;
  4. speed of a 124M training step at B=16 (or the largest B that fits), T=1024:
     bf16 (the default) and float32+TF32, tokens/s, MFU against the card's dense
     bf16 peak, the host's time per step, peak GPU memory; build-nanogpt's PyTorch
     recipe (bf16 autocast, flash SDPA, fused AdamW) on the same card in the same
     run, eager and (last, within --budget) torch.compile, and the ratio;
  5. the attention kernels' time (float32, bf16) against PyTorch's SDPA at B=16,
     NH=12, T=1024, hs=64;
  6. 50 steps of the 124M model on real text in bf16 against the same 50 steps in
     float32: the loss curves must agree within 1%.
--text: token ids (.npy, e.g. made here by `--prepare-text FILE OUT.npy`, which
needs the GPT-2 tokenizer files) or a text file (GPT-2 BPE if the tokenizer is
installed, else UTF-8 bytes as tokens); without it, the bytes of this Python's
standard library sources. With $OUT set, the table also goes to $OUT/gpu_check.txt
and $OUT/gpu_check.json after every row.
"""
import argparse
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanogpt_np import GPT, GPTConfig, backend, kernels, layers, optim  # noqa: E402
from nanogpt_np.model import parameter_shapes  # noqa: E402

START = time.time()
ROWS = []
ROWS_ENV = "GPU_CHECK_ROWS"  # a JSON-lines file the section processes append their rows to
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
    host=(1, 64),  # B, T of the step whose GPU work is negligible: its time is the host's
    curve=(GPTConfig(vocab_size=50304), 50, 8, 1024),  # config, steps, B, T
)
TORCH_DEVICE = "cuda"
F32_LIMIT, F64_LIMIT = 1e-4, 1e-10  # kernel rows: float32 vs a float64 reference, float64 vs float64
BF16_LIMIT = 8e-3  # one rounding to bf16 is 2^-8 = 3.9e-3 of the largest value; twice that, for slack
BF16_ATTENTION_LIMIT = 2e-2  # P is rounded to bf16 before P @ V, and dS before dS @ K
# dense bf16 tensor-core peak FLOP/s by card, for MFU (as build-nanogpt and llm.c count it)
BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12)]


# ---- the table --------------------------------------------------------------------------

def record(section, name, fn):
    """Run fn() -> dict(result=str, limit=str, ok=bool or None); print and keep the row."""
    t0 = time.time()
    try:
        row = fn()
    except Exception as e:  # one failing check must not hide the others
        detail = "".join(traceback.format_exception_only(type(e), e)).strip().replace("\n", " | ")
        row = dict(result=f"ERROR {detail[:300]}", limit="", ok=False)
    row = dict(section=section, name=name, seconds=round(time.time() - t0, 1), **row)
    row["status"] = {True: "ok", False: "FAIL", None: "info"}[row.get("ok")]
    add_row(row)
    print(f"[{time.time() - START:6.1f}s] {section} {name}: {row['result']} {row['status']}", flush=True)
    return row


def add_row(row):
    ROWS.append(row)
    path = os.environ.get(ROWS_ENV)
    if path:  # a section process: the parent reads the rows back
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    save()  # after every row: a run cut short still leaves what it measured


def all_rows():
    path = os.environ.get(ROWS_ENV)
    if path and os.path.exists(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    return list(ROWS)


def save():
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        rows = all_rows()
        (Path(out) / "gpu_check.txt").write_text(table(rows) + "\n")
        (Path(out) / "gpu_check.json").write_text(json.dumps(rows, indent=1) + "\n")


class TimeLimit(Exception):
    pass


def with_time_limit(seconds, fn):
    """fn() or TimeLimit after `seconds` (SIGALRM; the main thread only)."""
    def on_alarm(signum, frame):
        raise TimeLimit(f"stopped after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def table(rows=None):
    rows = all_rows() if rows is None else rows
    lines = [f"{'#':<3} {'check':<44} {'result':<58} {'limit':<10} {'status':<6} {'s':>5}"]
    for r in sorted(rows, key=lambda r: r["section"]):  # stable: rows of a section keep their order
        lines.append(f"{r['section']:<3} {r['name'][:44]:<44} {r['result'][:400]:<58} {r['limit']:<10} "
                     f"{r['status']:<6} {r['seconds']:>5}")
    failed = sum(r["status"] == "FAIL" for r in rows)
    lines.append(f"{len(rows)} rows, {failed} failed, {time.time() - START:.0f}s")
    return "\n".join(lines)


def rel_err(actual, expected):
    actual = np.asarray(backend.to_host(actual)).astype(np.float64)
    expected = np.asarray(backend.to_host(expected)).astype(np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max(initial=0.0) / max(np.abs(expected).max(initial=0.0), 1e-30))


def compare(errors, limit):
    """errors: {what: relative error} -> a row judged by the worst."""
    worst = max(errors, key=errors.get)
    text = " ".join(f"{k} {v:.1e}" for k, v in errors.items())
    return dict(result=f"max {errors[worst]:.2e} ({text})", limit=f"{limit:.0e}", ok=errors[worst] <= limit)


def free_gpu_memory():
    import cupy

    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def bf16():
    return backend.bfloat16()


def to_bf16(cp, a):
    """A host float array as a bf16 CuPy array (rounded on the host by ml_dtypes)."""
    return cp.asarray(np.asarray(a, dtype=np.float32).astype(bf16()))


def host_f64(a):
    """A host float64 copy of a NumPy or CuPy array of any float dtype, bf16 included."""
    return np.asarray(backend.to_host(a)).astype(np.float64)


# ---- 0. where we are --------------------------------------------------------------------

def environment():
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    text = (f"{name}, cc {props['major']}.{props['minor']}, {props['totalGlobalMem'] / 2**30:.0f} GiB; "
            f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
            f"NVRTC {'.'.join(map(str, cupy.cuda.nvrtc.getVersion()))}")
    try:
        import ml_dtypes

        text += f"; ml_dtypes {ml_dtypes.__version__}"
    except ImportError:
        text += "; NO ml_dtypes (bf16 rows will fail)"
    try:
        import torch

        text += f"; torch {torch.__version__} (CUDA {torch.version.cuda})"
    except Exception as e:
        text += f"; no torch ({e})"
    return dict(result=text, limit="", ok=None)


def device_name():
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else name


def compile_all():
    from nanogpt_np.kernels import loader

    runner, t0 = loader.CupyRunner(), time.time()
    n = 0
    for kf in loader.ALL_FILES:
        for name in kf.names:
            runner.function(kf, name)
            n += 1
    return dict(result=f"{n} kernels from {len(loader.ALL_FILES)} files compiled in {time.time() - t0:.1f}s",
                limit="", ok=True)


def mma_layout():
    """One tensor-core mma through the fragment layout the bf16 attention assumes."""
    import cupy as cp

    rng = np.random.default_rng(0)
    a = np.asarray(rng.standard_normal((16, 16)), dtype=np.float32).astype(bf16())
    b = np.asarray(rng.standard_normal((16, 8)), dtype=np.float32).astype(bf16())
    d = kernels.attention.mma_layout_check(cp.asarray(a), cp.asarray(b))
    return compare({"D": rel_err(d, a.astype(np.float64) @ b.astype(np.float64))}, 1e-5)


def section_environment():
    record("0", "environment", environment)
    record("0", "NVRTC compiles every kernel", compile_all)
    record("0", "mma.sync m16n8k16 bf16 fragment layout", mma_layout)


# ---- 1. every kernel against its NumPy layer ---------------------------------------------

def check_attention(B, T, NH, dtype):
    import cupy as cp

    rng = np.random.default_rng(T)
    qkv = (rng.standard_normal((B, T, 3 * NH * 64)) * 1.5).astype(dtype)
    dy = rng.standard_normal((B, T, NH * 64)).astype(dtype)
    y, cache = kernels.attention.forward(cp.asarray(qkv), NH)
    assert cache[0] == "flash", "the flash kernel did not run"
    dqkv = kernels.attention.backward(cp.asarray(dy), cache)
    y_ref, cache_ref = layers.attention.forward(qkv.astype(np.float64), NH)
    dqkv_ref = layers.attention.backward(dy.astype(np.float64), cache_ref)
    return compare({"y": rel_err(y, y_ref), "lse": rel_err(cache[3], cache_ref[2]),
                    "dqkv": rel_err(dqkv, dqkv_ref)}, F32_LIMIT if dtype == np.float32 else F64_LIMIT)


def check_attention_bf16(B, T, NH, path="mma"):
    """The bf16 attention path (tensor cores, or with path="simt" the float32
    kernels) against float64 attention of the same bf16 inputs."""
    import cupy as cp

    os.environ[kernels.attention.BF16_PATH_ENV] = path

    rng = np.random.default_rng(T + 1)
    qkv = np.asarray(rng.standard_normal((B, T, 3 * NH * 64)) * 1.5, dtype=np.float32).astype(bf16())
    dy = np.asarray(rng.standard_normal((B, T, NH * 64)), dtype=np.float32).astype(bf16())
    y, cache = kernels.attention.forward(cp.asarray(qkv), NH)
    dqkv = kernels.attention.backward(cp.asarray(dy), cache)
    assert y.dtype == bf16() and dqkv.dtype == bf16()
    y_ref, cache_ref = layers.attention.forward(qkv.astype(np.float64), NH)
    dqkv_ref = layers.attention.backward(dy.astype(np.float64), cache_ref)
    os.environ[kernels.attention.BF16_PATH_ENV] = "mma"
    lse = kernels.attention.lse_of(cache)
    row = compare({"y": rel_err(y, y_ref), "lse": rel_err(lse, cache_ref[2]), "dqkv": rel_err(dqkv, dqkv_ref)},
                  BF16_ATTENTION_LIMIT)
    row["result"] += f" path {kernels.attention.path_of(cache)}"
    return row


def check_layernorm(shape, dtype):
    import cupy as cp

    rng = np.random.default_rng(1)
    C = shape[-1]
    x, dout = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype), rng.standard_normal(shape).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    out, cache = kernels.layernorm.forward(cp.asarray(x), cp.asarray(w), cp.asarray(b))
    dx, dw, db = kernels.layernorm.backward(cp.asarray(dout), cache)
    f64 = [a.astype(np.float64) for a in (x, w, b, dout)]
    out_ref, cache_ref = layers.layernorm.forward(*f64[:3])
    dx_ref, dw_ref, db_ref = layers.layernorm.backward(f64[3], cache_ref)
    return compare({"out": rel_err(out, out_ref), "dx": rel_err(dx, dx_ref), "dw": rel_err(dw, dw_ref),
                    "db": rel_err(db, db_ref)}, F32_LIMIT if dtype == np.float32 else F64_LIMIT)


def check_gelu(shape, dtype):
    import cupy as cp

    rng = np.random.default_rng(2)
    x, dout = (rng.standard_normal(shape) * 3).astype(dtype), rng.standard_normal(shape).astype(dtype)
    out, cache = kernels.gelu.forward(cp.asarray(x))
    dx = kernels.gelu.backward(cp.asarray(dout), cache)
    out_ref, cache_ref = layers.gelu.forward(x.astype(np.float64))
    dx_ref = layers.gelu.backward(dout.astype(np.float64), cache_ref)
    return compare({"out": rel_err(out, out_ref), "dx": rel_err(dx, dx_ref)},
                   F32_LIMIT if dtype == np.float32 else F64_LIMIT)


def check_cross_entropy(B, T, V, dtype):
    import cupy as cp

    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((B, T, V)) * 3).astype(dtype)
    targets = rng.integers(0, V, (B, T))
    loss, cache = kernels.cross_entropy.forward(cp.asarray(logits), cp.asarray(targets))
    dlogits = kernels.cross_entropy.backward(1.0, cache)
    loss_ref, cache_ref = layers.cross_entropy.forward(logits.astype(np.float64), targets)
    dlogits_ref = layers.cross_entropy.backward(1.0, cache_ref)
    return compare({"loss": rel_err(loss, loss_ref), "dlogits": rel_err(dlogits, dlogits_ref)},
                   F32_LIMIT if dtype == np.float32 else F64_LIMIT)


def check_adamw(n, dtype):
    import cupy as cp

    rng = np.random.default_rng(4)
    p, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    m, v = (rng.standard_normal(n) * 0.1).astype(dtype), (rng.random(n) * 0.01).astype(dtype)
    spans = [(0, n // 3), (n // 2, n - 5)]  # decayed spans
    lr, wd, b1, b2, eps, t = 6e-4, 0.1, 0.9, 0.95, 1e-8, 3
    step_size, bc2 = lr / (1 - b1**t), math.sqrt(1 - b2**t)
    gpu = [cp.asarray(a) for a in (p, g, m, v)]
    kernels.adamw.step(*gpu, cp.asarray(kernels.adamw.decay_bounds(spans)), 1 - lr * wd, b1, b2, eps, step_size, bc2)
    ref = [a.astype(np.float64) for a in (p, g, m, v)]
    for lo, hi in spans:
        ref[0][lo:hi] *= 1 - lr * wd
    optim._adam_chunk(*ref, b1, b2, step_size, bc2, eps)
    return compare({"p": rel_err(gpu[0], ref[0]), "m": rel_err(gpu[2], ref[2]), "v": rel_err(gpu[3], ref[3])},
                   F32_LIMIT if dtype == np.float32 else F64_LIMIT)


def check_bf16_layernorm_gelu_ce():
    """LayerNorm float32 -> bf16 (and back in backward), GELU in bf16, cross-entropy
    on bf16 logits: each against float64 formulas of the same (rounded) inputs."""
    import cupy as cp

    B, T, C, V = SIZES["bf16_rows"]
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((B, T, C)) * 2 + 0.5).astype(np.float32)
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    dout = np.asarray(rng.standard_normal((B, T, C)), dtype=np.float32).astype(bf16())
    out, cache = kernels.layernorm.forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), out_dtype=bf16())
    dx, dw, db = kernels.layernorm.backward(cp.asarray(dout), cache)
    out_ref, cache_ref = layers.layernorm.forward(*(a.astype(np.float64) for a in (x, w, b)))
    dx_ref, dw_ref, db_ref = layers.layernorm.backward(host_f64(dout), cache_ref)
    errors = {"ln out": rel_err(out, out_ref), "ln dx": rel_err(dx, dx_ref), "ln dw": rel_err(dw, dw_ref)}
    h = np.asarray(rng.standard_normal((B, T, 4 * C)) * 3, dtype=np.float32).astype(bf16())
    dh = np.asarray(rng.standard_normal((B, T, 4 * C)), dtype=np.float32).astype(bf16())
    g, gcache = kernels.gelu.forward(cp.asarray(h))
    g_ref, gcache_ref = layers.gelu.forward(h.astype(np.float64))
    errors["gelu"] = rel_err(g, g_ref)
    errors["gelu dx"] = rel_err(kernels.gelu.backward(cp.asarray(dh), gcache),
                                layers.gelu.backward(dh.astype(np.float64), gcache_ref))
    logits = np.asarray(rng.standard_normal((B, T, V)) * 3, dtype=np.float32).astype(bf16())
    targets = rng.integers(0, V, (B, T))
    loss, ccache = kernels.cross_entropy.forward(cp.asarray(logits), cp.asarray(targets))
    dlogits = kernels.cross_entropy.backward(1.0, ccache)
    loss_ref, ccache_ref = layers.cross_entropy.forward(logits.astype(np.float64), targets)
    errors["ce loss"] = rel_err(loss, loss_ref)
    errors["ce dlogits"] = rel_err(dlogits, layers.cross_entropy.backward(1.0, ccache_ref))
    return compare(errors, BF16_LIMIT)


def check_fused_bf16():
    """fused.cu in bf16 against its formulas (kernels/fused.py states them)."""
    import cupy as cp

    B, T, C, _ = SIZES["bf16_rows"]
    rng = np.random.default_rng(6)
    pre, dout = (np.asarray(rng.standard_normal((B * T, 4 * C)), dtype=np.float32).astype(bf16()) for _ in range(2))
    a = np.asarray(rng.standard_normal((B, T, C)), dtype=np.float32).astype(bf16())
    x = rng.standard_normal((B, T, C)).astype(np.float32)
    b4, b1 = rng.standard_normal(4 * C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    u = pre.astype(np.float64) + b4
    gelu_ref, gcache = layers.gelu.forward(u)
    dpre_ref = layers.gelu.backward(dout.astype(np.float64), gcache)
    dpre, dbias = kernels.fused.bias_gelu_backward(cp.asarray(dout), cp.asarray(pre), cp.asarray(b4))
    cast, sums = kernels.fused.cast_column_sums(cp.asarray(x).reshape(-1, C), bf16())
    errors = {
        "bias_gelu": rel_err(kernels.fused.bias_gelu_forward(cp.asarray(pre), cp.asarray(b4)), gelu_ref),
        "dpre": rel_err(dpre, dpre_ref), "dbias": rel_err(dbias, dpre_ref.sum(axis=0)),
        "bias_residual": rel_err(kernels.fused.bias_residual(cp.asarray(x), cp.asarray(a), cp.asarray(b1)),
                                 x.astype(np.float64) + a.astype(np.float64) + b1),
        "cast": rel_err(cast, x.reshape(-1, C)), "column sums": rel_err(sums, x.reshape(-1, C).astype(np.float64).sum(0)),
    }
    return compare(errors, BF16_LIMIT)


def check_gemm(M, K, N):
    """kernels/gemm.py (cuBLAS gemmEx) in bf16 for the three products of a linear
    layer: y = x @ W.T (bf16 out), dx = dy @ W (bf16 out), dW += dy.T @ x (float32,
    added into an existing float32 array)."""
    import cupy as cp

    gemm = kernels.gemm
    rng = np.random.default_rng(M + K + N)
    x = np.asarray(rng.standard_normal((M, K)), dtype=np.float32).astype(bf16())
    W = np.asarray(rng.standard_normal((N, K)) * 0.05, dtype=np.float32).astype(bf16())
    dy = np.asarray(rng.standard_normal((M, N)), dtype=np.float32).astype(bf16())
    dW0 = rng.standard_normal((N, K)).astype(np.float32)
    x64, W64, dy64 = (a.astype(np.float64) for a in (x, W, dy))
    dW = cp.asarray(dW0)
    gemm.matmul(cp.asarray(dy), cp.asarray(x), out=dW, trans_a=True, beta=1.0)
    errors = {"y": rel_err(gemm.matmul(cp.asarray(x), cp.asarray(W), trans_b=True), x64 @ W64.T),
              "dx": rel_err(gemm.matmul(cp.asarray(dy), cp.asarray(W)), dy64 @ W64),
              "dW+=": rel_err(dW, dW0 + dy64.T @ x64)}
    # the float32 path, for the float32/float64 modes of the same schedule
    x32 = rng.standard_normal((M, K)).astype(np.float32)
    errors["f32 y"] = rel_err(gemm.matmul(cp.asarray(x32), cp.asarray(W.astype(np.float32)), trans_b=True),
                              x32.astype(np.float64) @ W64.T)
    return compare(errors, BF16_LIMIT)


def section_kernels():
    for B, T, NH, dtype in SIZES["attention"]:
        record("1", f"attention B{B} T{T} NH{NH} {np.dtype(dtype).name}", lambda: check_attention(B, T, NH, dtype))
    for B, T, NH in SIZES["attention_bf16"]:
        record("1", f"attention B{B} T{T} NH{NH} bf16", lambda: check_attention_bf16(B, T, NH))
    B, T, NH = SIZES["attention_bf16"][-1]
    record("1", f"attention B{B} T{T} NH{NH} bf16 via f32 kernels", lambda: check_attention_bf16(B, T, NH, "simt"))
    for shape, dtype in SIZES["layernorm"]:
        record("1", f"layernorm {shape} {np.dtype(dtype).name}", lambda: check_layernorm(shape, dtype))
    for shape, dtype in SIZES["gelu"]:
        record("1", f"gelu {shape} {np.dtype(dtype).name}", lambda: check_gelu(shape, dtype))
    for B, T, V, dtype in SIZES["cross_entropy"]:
        record("1", f"cross_entropy B{B} T{T} V{V} {np.dtype(dtype).name}",
               lambda: check_cross_entropy(B, T, V, dtype))
    for n, dtype in SIZES["adamw"]:
        record("1", f"adamw n={n} {np.dtype(dtype).name}", lambda: check_adamw(n, dtype))
    record("1", "bf16 layernorm, gelu, cross_entropy", check_bf16_layernorm_gelu_ce)
    record("1", "bf16 fused bias/gelu/residual/cast", check_fused_bf16)
    for M, K, N in SIZES["gemm"]:
        record("1", f"gemmEx bf16 M{M} K{K} N{N}", lambda: check_gemm(M, K, N))


# ---- 2. the whole model, GPU against NumPy -------------------------------------------------

BF16_MODEL_LIMIT = 5e-2  # bf16 activations: each of ~10 roundings per block costs a relative 2^-9


def run_model(cfg, dtype, backend_name, idx, targets, tf32=False):
    """(loss, logits on the host, flat grads on the host) of one forward + backward."""
    if backend_name == "cupy":
        backend.set_tf32(tf32)
    model = GPT(cfg, dtype=dtype, seed=1, backend=backend_name)
    model.zero_grad()
    logits, loss = model.forward(idx, targets)
    logits = host_f64(logits)
    model.backward()
    grads = backend.to_host(model.flat_grads)
    del model
    if backend_name == "cupy":
        backend.set_tf32(False)
        free_gpu_memory()
    return loss, logits, grads


def split_flat(flat, cfg):
    """{name: view} of a flat parameter or gradient buffer, in the model's order."""
    views, offset = {}, 0
    for name, shape in parameter_shapes(cfg):
        size = math.prod(shape)
        views[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return views


def compare_models(cfg, got, ref, limit, judge_per_tensor=True):
    loss, logits, grads = got
    loss_ref, logits_ref, grads_ref = ref
    g, g_ref = split_flat(grads, cfg), split_flat(grads_ref, cfg)
    per_tensor = {name: rel_err(g[name], g_ref[name]) for name in g}
    worst = max(per_tensor, key=per_tensor.get)
    errors = {"loss": abs(loss - loss_ref) / abs(loss_ref), "logits": rel_err(logits, logits_ref),
              "grads": per_tensor[worst] if judge_per_tensor else rel_err(grads, grads_ref)}
    row = compare(errors, limit)
    row["result"] += f" worst grad {worst} {per_tensor[worst]:.1e}"
    return row


def section_model():
    cfg, B, T = SIZES["small_model"]
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))
    ref = run_model(cfg, np.float64, "numpy", idx, targets)
    record("2", "model small f64 GPU vs f64 NumPy",
           lambda: compare_models(cfg, run_model(cfg, np.float64, "cupy", idx, targets), ref, 1e-9))
    record("2", "model small f32 GPU vs f64 NumPy",
           lambda: compare_models(cfg, run_model(cfg, np.float32, "cupy", idx, targets), ref, 1e-3))
    record("2", "model small bf16 GPU vs f64 NumPy",
           lambda: compare_models(cfg, run_model(cfg, "bf16", "cupy", idx, targets), ref, BF16_MODEL_LIMIT,
                                  judge_per_tensor=False))

    cfg, B, T = SIZES["big_model"]
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))
    t0 = time.time()
    ref = run_model(cfg, np.float64, "numpy", idx, targets)
    print(f"  (NumPy float64 reference for 124M, B={B}, T={T}: {time.time() - t0:.1f}s)", flush=True)
    record("2", f"model 124M T{T} f32 GPU vs f64 NumPy",
           lambda: compare_models(cfg, run_model(cfg, np.float32, "cupy", idx, targets), ref, 1e-3))
    record("2", f"model 124M T{T} bf16 GPU vs f64 NumPy",
           lambda: compare_models(cfg, run_model(cfg, "bf16", "cupy", idx, targets), ref, BF16_MODEL_LIMIT,
                                  judge_per_tensor=False))

    def tf32():  # TF32 rounds matmul inputs to 10 mantissa bits: reported, not judged
        row = compare_models(cfg, run_model(cfg, np.float32, "cupy", idx, targets, tf32=True), ref, 1.0)
        return dict(row, limit="", ok=None)

    record("2", f"model 124M T{T} f32+TF32 GPU vs f64 NumPy", tf32)


# ---- 3. training steps track NumPy ---------------------------------------------------------

def markov_tokens(V, n, seed=0):
    """A token stream where each token has 4 likely successors: a loss that can fall."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, V, (V, 4))
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    choices = rng.integers(0, 4, n)
    for i in range(1, n):
        out[i] = successors[out[i - 1], choices[i]]
    return out


def train(cfg, backend_name, stream, steps, B, T, dtype=np.float32, lr=1e-3, warmup=5, batch_seed=1):
    """`steps` AdamW steps on random windows of `stream` -> (losses, fused AdamW used)."""
    model = GPT(cfg, dtype=dtype, seed=0, backend=backend_name)
    opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    fused = opt._fused is not None and len(opt._segments(model.grads)) == 1
    rng = np.random.default_rng(batch_seed)
    losses = []
    for step in range(steps):
        starts = rng.integers(0, stream.size - T - 1, B)
        batch = np.stack([stream[s : s + T + 1] for s in starts])
        model.zero_grad()
        _, loss = model.forward(batch[:, :-1], batch[:, 1:])
        model.backward()
        optim.clip_grad_norm(model.grads, 1.0)
        opt.step(model.grads, lr=optim.cosine_lr(step, lr, lr / 10, warmup, steps))
        losses.append(loss)
    del model, opt
    return np.array(losses), fused


def section_training():
    cfg, steps, B, T = SIZES["train"]
    stream = markov_tokens(cfg.vocab_size, 50_000)

    def run():
        gpu, fused = train(cfg, "cupy", stream, steps, B, T)
        cpu, _ = train(cfg, "numpy", stream, steps, B, T)
        diff = np.abs(gpu - cpu) / np.abs(cpu)
        free_gpu_memory()
        return dict(result=f"max rel loss diff {diff.max():.1e} over {steps} steps; loss {cpu[0]:.3f} -> "
                           f"{cpu[-1]:.3f} (NumPy) / {gpu[-1]:.3f} (GPU); fused AdamW {'yes' if fused else 'NO'}",
                    limit="1e-03", ok=bool(diff.max() <= 1e-3 and fused and cpu[-1] < cpu[0]))

    record("3", f"{steps} AdamW steps f32, GPU vs NumPy", run)
    record("3", "overlapped NCCL allreduce, 1 rank", check_overlap)


class SoloComm:
    """MPI's communicator for a single process, as far as NCCLTransport needs it."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Bcast(self, buf, root=0):
        pass


def check_overlap():
    """The bucketed allreduce's GPU mechanics (distributed.GradientBuckets over a
    one-rank NCCL communicator: a side stream, events, a bucket after every block)
    during a real bf16 backward. A sum over one rank is the identity, so the
    gradients must equal those of a backward without buckets (up to cupy.add.at's
    atomic order in the embedding)."""
    import cupy as cp

    from nanogpt_np import distributed

    if not distributed.nccl_available(cp):
        return dict(result="skipped: cupy.cuda.nccl unavailable (pip install nvidia-nccl-cu12)", limit="", ok=None)
    cfg, B, T = SIZES["small_model"]
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))
    model = GPT(cfg, dtype="bf16", seed=0, backend="cupy")
    model.zero_grad()
    model.forward(idx, targets)
    model.backward()
    want = host_f64(model.flat_grads)
    buckets = distributed.GradientBuckets(model.flat_grads, 1, distributed.NCCLTransport(SoloComm(), cp))
    model.zero_grad()
    model.forward(idx, targets)
    model.backward(grads_final=buckets.ready)
    buckets.finish()
    err = rel_err(model.flat_grads, want)
    n = len(buckets.spans)
    return dict(result=f"{n} buckets (want {cfg.n_layer + 2}), grads vs no buckets {err:.1e}", limit="1e-06",
                ok=bool(n == cfg.n_layer + 2 and err <= 1e-6))


# ---- 4. a 124M training step: tokens/s, MFU, host time and memory against build-nanogpt ------

def torch_sync():
    import torch

    if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, sync, reps=10, warmup=2):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def flops_per_token(n_params):
    """6 per parameter (forward 2, backward 4) plus attention's scores, causal half:
    6N + 6 L C T, as llm.c counts it."""
    cfg, _, T = SIZES["speed"]
    return 6 * n_params + 6 * cfg.n_layer * cfg.n_embd * T


def peak_bf16():
    """(dense bf16 peak FLOP/s, the card it was taken for) or (None, name)."""
    name = device_name()
    for key, peak in BF16_PEAK:
        if all(part in name for part in key.split()):
            return peak, key
    return None, name


def throughput(step_ms, n_params, B, T):
    tok_s = B * T / (step_ms / 1e3)
    peak, card = peak_bf16()
    mfu = flops_per_token(n_params) * tok_s / peak if peak else None
    text = f"{step_ms:.1f} ms/step, {tok_s:,.0f} tok/s, MFU " + (
        f"{mfu * 100:.1f}% (of {card}'s {peak / 1e12:.0f} TFLOPS bf16)" if peak else f"n/a (unknown card {card})")
    return tok_s, mfu, text


class CountingRunner:
    """Counts kernel launches (or gemm calls) on their way to the real runner."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def launch(self, *args):
        self.count += 1
        self.inner.launch(*args)

    def gemm_ex(self, *args):
        self.count += 1
        self.inner.gemm_ex(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def make_step(model, opt, idx, targets):
    def step():
        model.zero_grad()
        model.forward(idx, targets)
        model.backward()
        optim.clip_grad_norm(model.grads, 1.0)
        opt.step(model.grads)
    return step


def ours_step(dtype, tf32, B, T, steps=5):
    """(ms per step, parameters, {memory}, launches per step) of our 124M training step."""
    import cupy as cp
    from nanogpt_np.kernels import gemm, loader

    os.environ["NANOGPT_CUDA_SYNC"] = "0"
    free_gpu_memory()
    backend.set_tf32(tf32)
    cfg = SIZES["speed"][0]
    pool = cp.get_default_memory_pool()
    model = GPT(cfg, dtype=dtype, seed=0, backend="cupy")
    opt = optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    V = min(50257, cfg.vocab_size)
    idx, targets = cp.asarray(rng.integers(0, V, (B, T))), cp.asarray(rng.integers(0, V, (B, T)))
    step = make_step(model, opt, idx, targets)
    ms = median_ms(step, cp.cuda.Device().synchronize, reps=steps, warmup=2)
    kernels_runner, gemm_runner = CountingRunner(loader._state["runner"]), CountingRunner(gemm._state["runner"])
    loader.use_runner(kernels_runner)
    gemm.use_runner(gemm_runner)
    try:
        step()
    finally:
        loader.use_runner(kernels_runner.inner)
        gemm.use_runner(gemm_runner.inner)
    cp.cuda.Device().synchronize()
    free, total = cp.cuda.runtime.memGetInfo()
    memory = dict(pool=pool.total_bytes() / 2**30, device=(total - free) / 2**30)
    n = model.num_parameters()
    del model, opt, step
    backend.set_tf32(False)
    free_gpu_memory()
    return ms, n, memory, (kernels_runner.count, gemm_runner.count)


def largest_fitting_batch(fn, B):
    """fn(B), halving B on a GPU out-of-memory error -> (result, B used)."""
    import cupy as cp

    while True:
        try:
            return fn(B), B
        except cp.cuda.memory.OutOfMemoryError:
            if B == 1:
                raise
            free_gpu_memory()
            B //= 2


def torch_step_ms(compile_model, steps=5):
    import torch

    from tests.torch_gpt import TorchGPT

    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    cfg, B, T = SIZES["speed"]
    model = TorchGPT(cfg).to(TORCH_DEVICE)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = dict(fused=True) if TORCH_DEVICE == "cuda" else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **fused)
    run = torch.compile(model) if compile_model else model
    idx = torch.randint(0, min(50257, cfg.vocab_size), (B, T), device=TORCH_DEVICE)
    targets = torch.randint(0, min(50257, cfg.vocab_size), (B, T), device=TORCH_DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=TORCH_DEVICE, dtype=torch.bfloat16):
            _, loss = run(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    cuda = TORCH_DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, torch_sync, reps=steps, warmup=3 if compile_model else 2)
    memory = dict(allocated=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
                  reserved=torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"))
    n = sum(p.numel() for p in model.parameters())
    del model, run, opt
    free_gpu_memory()
    return ms, n, memory


def section_speed():
    cfg, B0, T = SIZES["speed"]

    def ours(dtype, tf32, key):
        (ms, n, memory, (launches, gemms)), B = largest_fitting_batch(lambda B: ours_step(dtype, tf32, B, T), B0)
        tok_s, mfu, text = throughput(ms, n, B, T)
        text += (f"; memory: CuPy pool {memory['pool']:.1f} GiB (its high-water mark), device {memory['device']:.1f}"
                 f" GiB in use; {launches} kernels + {gemms} gemms per step")
        return dict(result=f"B{B}: " + text, limit="", ok=None,
                    metrics={f"{key}_tok_s": tok_s, f"{key}_mfu": mfu, f"{key}_pool_gib": memory["pool"],
                             f"{key}_launches": launches + gemms, f"{key}_ms": ms})

    record("4", f"ours bf16, B{B0} T{T} (or the largest B that fits)", lambda: ours("bf16", False, "ours_bf16"))
    record("4", "ours f32 + TF32 matmuls", lambda: ours(np.float32, True, "ours_tf32"))

    def host():  # the same step where the GPU's work is negligible: what remains is the host's
        hB, hT = SIZES["host"]
        ms, _, _, (launches, gemms) = ours_step("bf16", False, hB, hT, steps=10)
        return dict(result=f"{ms:.1f} ms of host time per step (B{hB} T{hT}: the GPU is idle most of it), "
                           f"{launches} kernel launches + {gemms} gemm calls: {1e3 * ms / (launches + gemms):.0f} us "
                           "each; the GPU keeps busy while this is below its own step time", limit="", ok=None,
                    metrics={"host_ms": ms})

    record("4", "host time per step (launch overhead)", host)

    def torch_run(compiled):
        ms, n, memory = torch_step_ms(compiled)
        tok_s, mfu, text = throughput(ms, n, B0, T)
        key = "torch_compile" if compiled else "torch_eager"
        return dict(result=f"B{B0}: {text}; peak allocated {memory['allocated']:.1f} GiB, reserved "
                           f"{memory['reserved']:.1f} GiB", limit="", ok=None,
                    metrics={f"{key}_tok_s": tok_s, f"{key}_gib": memory["allocated"],
                             f"{key}_reserved_gib": memory["reserved"]})

    record("4", "torch bf16 autocast, eager", lambda: torch_run(False))


def section_compile(args):
    """torch.compile last: it may take minutes, and gets what is left of --budget."""
    if args.no_compile:
        record("4", "torch bf16 + torch.compile", lambda: dict(result="skipped (--no-compile)", limit="", ok=None))
        return
    left = args.budget - (time.time() - args.start)
    if left < 90:
        record("4", "torch bf16 + torch.compile",
               lambda: dict(result=f"skipped: {left:.0f} s of --budget left (needs 90)", limit="", ok=None))
        return
    cfg, B0, T = SIZES["speed"]

    def run():
        ms, n, memory = with_time_limit(left, lambda: torch_step_ms(True))
        tok_s, mfu, text = throughput(ms, n, B0, T)
        return dict(result=f"B{B0}: {text}; peak allocated {memory['allocated']:.1f} GiB", limit="", ok=None,
                    metrics={"torch_compile_tok_s": tok_s, "torch_compile_gib": memory["allocated"]})

    record("4", "torch bf16 + torch.compile", run)


def summary_rows():
    """The ratio, MFU and memory verdicts, from the metrics the speed rows left."""
    metrics = {}
    for row in all_rows():
        metrics.update(row.get("metrics", {}))

    def ratio():
        torch_runs = {k[:-len("_tok_s")]: v for k, v in metrics.items() if k.startswith("torch") and k.endswith("_tok_s")}
        best = max(torch_runs, key=torch_runs.get)
        r = metrics["ours_bf16_tok_s"] / torch_runs[best]
        return dict(result=f"ours bf16 {metrics['ours_bf16_tok_s']:,.0f} tok/s = {r:.2f}x {best} "
                           f"{torch_runs[best]:,.0f} tok/s (target 1.0x)", limit=">= 1.0", ok=bool(r >= 1.0))

    def mfu():
        value = metrics.get("ours_bf16_mfu")
        if value is None:
            return dict(result="n/a: unknown card", limit="", ok=None)
        return dict(result=f"ours bf16 MFU {100 * value:.1f}% (target 45%)", limit=">= 45%", ok=bool(value >= 0.45))

    def memory():
        ours = metrics["ours_bf16_pool_gib"]
        theirs = {k: v for k, v in metrics.items()
                  if k.startswith("torch") and k.endswith("_gib") and not k.endswith("reserved_gib")}
        best = min(theirs, key=theirs.get)
        return dict(result=f"ours bf16 pool high-water {ours:.1f} GiB vs {best} {theirs[best]:.1f} GiB "
                           "(torch: max_memory_allocated)", limit="below", ok=bool(ours < theirs[best]))

    record("4", "ratio ours bf16 / PyTorch best (tok/s)", ratio)
    record("4", "MFU of ours bf16", mfu)
    record("4", "peak GPU memory, ours bf16 vs PyTorch", memory)


# ---- 5. attention kernel time against SDPA -------------------------------------------------

def section_attention_speed():
    import cupy as cp

    os.environ["NANOGPT_CUDA_SYNC"] = "0"
    B, NH, T, hs = SIZES["attention_bench"]
    flops_fwd = 4 * B * NH * T * T * hs / 2  # two matmuls, causal half
    sync = cp.cuda.Device().synchronize
    ours = {}
    for label in ("f32", "bf16"):
        def ours_row(label=label):
            rng = cp.random.RandomState(0)
            qkv = rng.standard_normal((B, T, 3 * NH * hs), dtype=cp.float32)
            dy = rng.standard_normal((B, T, NH * hs), dtype=cp.float32)
            if label == "bf16":
                qkv, dy = kernels.fused.cast(qkv, bf16()), kernels.fused.cast(dy, bf16())

            def fwd_bwd():
                _, cache = kernels.attention.forward(qkv, NH)
                kernels.attention.backward(dy, cache)

            f = median_ms(lambda: kernels.attention.forward(qkv, NH), sync)
            fb = median_ms(fwd_bwd, sync)
            ours[label] = (f, fb)
            path = kernels.attention.path_of(kernels.attention.forward(qkv, NH)[1])
            return dict(result=f"{f:.2f} ms ({flops_fwd / f / 1e9:.1f} TFLOP/s) / {fb:.2f} ms "
                               f"({3.5 * flops_fwd / fb / 1e9:.1f} TFLOP/s), path {path}", limit="", ok=None)

        record("5", f"attention ours {label} fwd / fwd+bwd", ours_row)
        free_gpu_memory()
    import torch
    import torch.nn.functional as F

    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
        def torch_row(dtype=dtype, label=label):
            q, k, v = (torch.randn(B, NH, T, hs, device=TORCH_DEVICE, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            g = torch.randn(B, NH, T, hs, device=TORCH_DEVICE, dtype=dtype)

            def t_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def t_fwd_bwd():
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

            f = median_ms(t_fwd, torch_sync)
            fb = median_ms(t_fwd_bwd, torch_sync)
            mine = ours.get(label)
            vs = f"; ours takes {mine[0] / f:.1f}x its time (fwd), {mine[1] / fb:.1f}x (fwd+bwd)" if mine else ""
            return dict(result=f"{f:.2f} ms / {fb:.2f} ms{vs}", limit="", ok=None)

        record("5", f"attention torch SDPA {label} fwd / fwd+bwd", torch_row)
        free_gpu_memory()


# ---- 6. bf16 tracks float32 on real text -----------------------------------------------------

def text_tokens(path):
    """(token ids, where they came from). A .npy of ids; a text file through GPT-2's
    BPE (nanogpt_np.tokenizer), or its UTF-8 bytes where that tokenizer is not
    installed; no path: the bytes of this Python's standard library sources."""
    if path and str(path).endswith(".npy"):
        tokens = np.load(path, allow_pickle=False).astype(np.int64)
        return tokens, f"{Path(path).name}: {tokens.size:,} GPT-2 tokens"
    if path:
        text = Path(path).read_text(encoding="utf-8")
        try:
            from nanogpt_np.tokenizer import get_encoding

            return np.array(get_encoding().encode_ordinary(text), dtype=np.int64), f"{Path(path).name}, GPT-2 BPE"
        except Exception as e:  # the tokenizer files are not installed here
            data = text.encode("utf-8")
            why = type(e).__name__
            return np.frombuffer(data, dtype=np.uint8).astype(np.int64), f"{Path(path).name}, bytes ({why})"
    from nanogpt_np.corpus import stdlib_files

    root, files = stdlib_files()
    chunks, size = [], 0
    for rel in files:
        data = (root / rel).read_bytes()
        chunks.append(data)
        size += len(data)
        if size > 4_000_000:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int64), "stdlib sources as bytes"


def section_curve(args):
    cfg, steps, B, T = SIZES["curve"]
    stream, source = text_tokens(args.text)
    stream = stream[stream < cfg.vocab_size]

    def run():
        os.environ["NANOGPT_CUDA_SYNC"] = "0"
        low, _ = train(cfg, "cupy", stream, steps, B, T, dtype="bf16", lr=6e-4, warmup=10)
        free_gpu_memory()
        full, _ = train(cfg, "cupy", stream, steps, B, T, dtype=np.float32, lr=6e-4, warmup=10)
        free_gpu_memory()
        diff = np.abs(low - full) / np.abs(full)
        return dict(result=f"max rel diff {diff.max():.2e} (step {int(diff.argmax())}), mean {diff.mean():.1e}; loss "
                           f"{full[0]:.3f} -> {full[-1]:.3f} (f32) / {low[-1]:.3f} (bf16); {source}",
                    limit="1e-02", ok=bool(diff.max() <= 1e-2 and full[-1] < full[0]),
                    metrics={"curve_bf16": low.tolist(), "curve_f32": full.tolist()})

    record("6", f"{steps} steps 124M B{B} T{T}: bf16 vs f32 loss", run)


# ---- running it --------------------------------------------------------------------------------

# (name, function, seconds it may take at most) in the order they run; each in its own process
SECTIONS = [
    ("environment", lambda args: section_environment(), 180),
    ("kernels", lambda args: section_kernels(), 240),
    ("model", lambda args: section_model(), 300),
    ("speed", lambda args: section_speed(), 300),
    ("attention", lambda args: section_attention_speed(), 120),
    ("curve", section_curve, 240),
    ("training", lambda args: section_training(), 120),
    ("compile", section_compile, 600),
]


def run_section(name, args):
    fn = dict((n, f) for n, f, _ in SECTIONS)[name]
    try:
        backend.set_tf32(False)
    except RuntimeError:  # no CuPy: the section's rows say so one by one
        pass
    os.environ["NANOGPT_CUDA_SYNC"] = "1"  # correctness rows: an error names its kernel
    fn(args)


def run_in_subprocesses(args):
    """Each section in a fresh process: a sticky CUDA error, a crash or a hang loses
    that section's remaining rows only (the section's own timeout, and --budget,
    bound it)."""
    rows_file = Path(os.environ.get("OUT") or "/tmp") / f"gpu_check_rows_{os.getpid()}.jsonl"
    rows_file.unlink(missing_ok=True)
    os.environ[ROWS_ENV] = str(rows_file)
    passthrough = [f"--budget={args.budget}", f"--start={args.start}"] + (["--no-compile"] if args.no_compile else [])
    if args.text:
        passthrough.append(f"--text={args.text}")
    for name, _, limit in SECTIONS:
        if name != "compile" and time.time() - args.start > args.budget + 120:
            add_row(dict(section="-", name=name, seconds=0, result="skipped: --budget spent", limit="", status="info"))
            continue
        before = len(all_rows())
        cmd = [sys.executable, str(Path(__file__).resolve()), f"--section={name}"] + passthrough
        try:
            proc = subprocess.run(cmd, timeout=limit, stderr=subprocess.PIPE, text=True)
            code, tail = proc.returncode, proc.stderr[-1500:]
        except subprocess.TimeoutExpired as e:
            code, tail = "timeout", (e.stderr or b"")[-1500:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        if tail:
            sys.stderr.write(tail)
        if code != 0:
            detail = " | ".join(tail.strip().splitlines()[-3:])
            add_row(dict(section="!", name=f"section {name} ended early", seconds=0, limit="", status="FAIL",
                         ok=False, result=f"exit {code} after {len(all_rows()) - before} rows: {detail[:300]}"))
    summary_rows()


def prepare_text(src, dst):
    """Tokenize a text file with GPT-2's BPE into a .npy of uint16 ids (on a machine
    that has the tokenizer files; the GPU machine then needs only the .npy)."""
    from nanogpt_np.data import write_shard
    from nanogpt_np.tokenizer import get_encoding

    ids = get_encoding().encode_ordinary(Path(src).read_text(encoding="utf-8"))
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    write_shard(dst, ids)  # uint16 .npy, written whole or not at all
    print(f"{src}: {len(ids):,} tokens -> {dst}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=270,
                        help="seconds for the whole run; torch.compile gets what is left, and is skipped under 90 s")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--text", default=None,
                        help="real text for section 6: token ids (.npy) or a text file (default: stdlib source bytes)")
    parser.add_argument("--prepare-text", nargs=2, metavar=("TEXT", "OUT_NPY"),
                        help="tokenize TEXT with GPT-2's BPE into OUT_NPY for --text, then exit (no GPU needed)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every section in this process (faster to start; one CUDA error then ends the rest)")
    parser.add_argument("--section", choices=[n for n, _, _ in SECTIONS], help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare_text:
        prepare_text(*args.prepare_text)
        return 0
    args.start = START if args.start is None else args.start
    if args.section:  # one section, in a process the parent started
        run_section(args.section, args)
        return 0
    try:
        backend.get_xp("cupy")
    except RuntimeError as e:  # no CuPy or no GPU: say so once instead of failing every row
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    if args.in_process:
        for name, _, _ in SECTIONS:
            run_section(name, args)
        summary_rows()
    else:
        run_in_subprocesses(args)
    save()
    print("\n" + table())
    return 1 if any(r["status"] == "FAIL" for r in all_rows()) else 0


if __name__ == "__main__":
    sys.exit(main())
