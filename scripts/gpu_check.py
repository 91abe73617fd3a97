#!/usr/bin/env python3
"""Check the CuPy backend on a GPU, in one command, and print a table.

    python scripts/gpu_check.py            # about 3 minutes on an H100
    python scripts/gpu_check.py --budget 200 --no-compile

Needs only this repository and a GPU machine's Python with NumPy, CuPy and a CUDA
build of PyTorch (PyTorch is the speed reference; the package never imports it).
Sections, each row measured on its own (a failing row prints its error and the
others still run):
  1. every kernel against its NumPy layer on random inputs, odd T included: the
     max relative error max|gpu - ref| / max|ref| per row (float32 kernels against
     a float64 reference, float64 kernels against float64);
  2. the whole model's loss, logits and every gradient, GPU against the NumPy
     backend, for a small config and for the GPT-2 124M shape at T=1024;
  3. 20 AdamW training steps on the GPU against the same steps in NumPy;
  4. tokens/s and MFU of a 124M training step at B=16, T=1024, against
     build-nanogpt's PyTorch recipe (bf16 autocast, flash SDPA, fused AdamW, and
     torch.compile when there is time) on the same card in the same run;
  5. the attention kernels' time against PyTorch's scaled_dot_product_attention
     at B=16, NH=12, T=1024, hs=64.
With $OUT set, the table also goes to $OUT/gpu_check.txt and $OUT/gpu_check.json.
"""
import argparse
import gc
import json
import math
import os
import signal
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
# Every size the checks use, in one place (the CPU dry run in tests/test_gpu_check.py shrinks them).
SIZES = dict(
    attention=[(2, 1, 2, np.float32), (2, 77, 3, np.float32), (1, 333, 2, np.float64), (2, 1024, 12, np.float32),
               (1, 1000, 4, np.float64)],  # B, T, NH (head size 64), dtype
    layernorm=[((2, 77, 768), np.float32), ((2, 77, 768), np.float64), ((8, 1023, 768), np.float32)],
    gelu=[((4, 1023, 3072), np.float32), ((2, 77, 3072), np.float64)],
    cross_entropy=[(2, 77, 50257, np.float32), (2, 77, 50257, np.float64), (4, 1024, 50304, np.float32)],
    adamw=[(3_000_001, np.float32), (100_003, np.float64)],
    small_model=(GPTConfig(block_size=128, vocab_size=1000, n_layer=2, n_head=4, n_embd=256), 2, 77),
    big_model=(GPTConfig(), 1, 1024),  # GPT-2 124M, vocab 50257
    train=(GPTConfig(block_size=128, vocab_size=2048, n_layer=4, n_head=4, n_embd=256), 20, 8, 128),
    attention_bench=(16, 12, 1024, 64),  # B, NH, T, hs
    speed=(GPTConfig(vocab_size=50304), 16, 1024),  # build-nanogpt's 124M step
)
TORCH_DEVICE = "cuda"
F32_LIMIT, F64_LIMIT = 1e-4, 1e-10  # kernel rows: float32 vs a float64 reference, float64 vs float64
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
    ROWS.append(row)
    print(f"[{time.time() - START:6.1f}s] {section} {name}: {row['result']} {row['status']}", flush=True)
    save()  # after every row: a run cut short still leaves what it measured
    return row


def save():
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.txt").write_text(table() + "\n")
        (Path(out) / "gpu_check.json").write_text(json.dumps(ROWS, indent=1) + "\n")


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


def table():
    lines = [f"{'#':<3} {'check':<44} {'result':<58} {'limit':<10} {'status':<6} {'s':>5}"]
    for r in sorted(ROWS, key=lambda r: r["section"]):
        lines.append(f"{r['section']:<3} {r['name'][:44]:<44} {r['result'][:300]:<58} {r['limit']:<10} "
                     f"{r['status']:<6} {r['seconds']:>5}")
    failed = sum(r["status"] == "FAIL" for r in ROWS)
    lines.append(f"{len(ROWS)} rows, {failed} failed, {time.time() - START:.0f}s")
    return "\n".join(lines)


def rel_err(actual, expected):
    actual = np.asarray(backend.to_host(actual), dtype=np.float64)
    expected = np.asarray(backend.to_host(expected), dtype=np.float64)
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


# ---- 0. where we are --------------------------------------------------------------------

def environment():
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    text = (f"{name}, cc {props['major']}.{props['minor']}, {props['totalGlobalMem'] / 2**30:.0f} GiB; "
            f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
            f"NVRTC {'.'.join(map(str, cupy.cuda.nvrtc.getVersion()))}")
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


def section_kernels():
    for B, T, NH, dtype in SIZES["attention"]:
        record("1", f"attention B{B} T{T} NH{NH} {np.dtype(dtype).name}", lambda: check_attention(B, T, NH, dtype))
    for shape, dtype in SIZES["layernorm"]:
        record("1", f"layernorm {shape} {np.dtype(dtype).name}", lambda: check_layernorm(shape, dtype))
    for shape, dtype in SIZES["gelu"]:
        record("1", f"gelu {shape} {np.dtype(dtype).name}", lambda: check_gelu(shape, dtype))
    for B, T, V, dtype in SIZES["cross_entropy"]:
        record("1", f"cross_entropy B{B} T{T} V{V} {np.dtype(dtype).name}",
               lambda: check_cross_entropy(B, T, V, dtype))
    for n, dtype in SIZES["adamw"]:
        record("1", f"adamw n={n} {np.dtype(dtype).name}", lambda: check_adamw(n, dtype))


# ---- 2. the whole model, GPU against NumPy -------------------------------------------------

def run_model(cfg, dtype, backend_name, idx, targets, tf32=False):
    """(loss, logits on the host, flat grads on the host) of one forward + backward."""
    if backend_name == "cupy":
        backend.set_tf32(tf32)
    model = GPT(cfg, dtype=dtype, seed=1, backend=backend_name)
    model.zero_grad()
    logits, loss = model.forward(idx, targets)
    logits = backend.to_host(logits).copy()
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


def compare_models(cfg, got, ref, limit):
    loss, logits, grads = got
    loss_ref, logits_ref, grads_ref = ref
    g, g_ref = split_flat(grads, cfg), split_flat(grads_ref, cfg)
    per_tensor = {name: rel_err(g[name], g_ref[name]) for name in g}
    worst = max(per_tensor, key=per_tensor.get)
    errors = {"loss": abs(loss - loss_ref) / abs(loss_ref), "logits": rel_err(logits, logits_ref),
              "grads": per_tensor[worst]}
    row = compare(errors, limit)
    row["result"] += f" worst grad {worst}"
    return row


def section_model_small():
    cfg, B, T = SIZES["small_model"]
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))
    ref = run_model(cfg, np.float64, "numpy", idx, targets)
    record("2", "model small f64 GPU vs f64 NumPy",
           lambda: compare_models(cfg, run_model(cfg, np.float64, "cupy", idx, targets), ref, 1e-9))
    record("2", "model small f32 GPU vs f64 NumPy",
           lambda: compare_models(cfg, run_model(cfg, np.float32, "cupy", idx, targets), ref, 1e-3))


def section_model_124m():
    cfg, B, T = SIZES["big_model"]
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))
    t0 = time.time()
    ref = run_model(cfg, np.float64, "numpy", idx, targets)
    print(f"  (NumPy float64 reference for 124M, B={B}, T={T}: {time.time() - t0:.1f}s)", flush=True)
    record("2", f"model 124M T{T} f32 GPU vs f64 NumPy",
           lambda: compare_models(cfg, run_model(cfg, np.float32, "cupy", idx, targets), ref, 1e-3))

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


def train(cfg, backend_name, stream, steps, B, T):
    model = GPT(cfg, dtype=np.float32, seed=0, backend=backend_name)
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    fused = opt._fused is not None and len(opt._segments(model.grads)) == 1
    rng = np.random.default_rng(1)
    losses = []
    for step in range(steps):
        starts = rng.integers(0, stream.size - T - 1, B)
        batch = np.stack([stream[s : s + T + 1] for s in starts])
        model.zero_grad()
        _, loss = model.forward(batch[:, :-1], batch[:, 1:])
        model.backward()
        optim.clip_grad_norm(model.grads, 1.0)
        opt.step(model.grads, lr=optim.cosine_lr(step, 1e-3, 1e-4, 5, steps))
        losses.append(loss)
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


# ---- 5. attention kernel time against SDPA -------------------------------------------------

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


def section_attention_speed():
    import cupy as cp

    os.environ["NANOGPT_CUDA_SYNC"] = "0"
    B, NH, T, hs = SIZES["attention_bench"]
    flops_fwd = 4 * B * NH * T * T * hs / 2  # two matmuls, causal half
    rng = cp.random.RandomState(0)
    qkv = rng.standard_normal((B, T, 3 * NH * hs), dtype=cp.float32)
    dy = rng.standard_normal((B, T, NH * hs), dtype=cp.float32)
    sync = cp.cuda.Device().synchronize
    ours = {}

    def fwd():
        return kernels.attention.forward(qkv, NH)

    def fwd_bwd():
        _, cache = kernels.attention.forward(qkv, NH)
        kernels.attention.backward(dy, cache)

    ours["fwd"] = median_ms(fwd, sync)
    ours["fwdbwd"] = median_ms(fwd_bwd, sync)
    record("5", "attention ours f32 fwd / fwd+bwd", lambda: dict(
        result=f"{ours['fwd']:.2f} ms ({flops_fwd / ours['fwd'] / 1e9:.1f} TFLOP/s) / {ours['fwdbwd']:.2f} ms "
               f"({3.5 * flops_fwd / ours['fwdbwd'] / 1e9:.1f} TFLOP/s)", limit="", ok=None))
    del qkv, dy
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
            return dict(result=f"{f:.2f} ms / {fb:.2f} ms; ours takes {ours['fwd'] / f:.1f}x its time (fwd), "
                               f"{ours['fwdbwd'] / fb:.1f}x (fwd+bwd)", limit="", ok=None)

        record("5", f"attention torch SDPA {label} fwd / fwd+bwd", torch_row)
        free_gpu_memory()


# ---- 4. a 124M training step: tokens/s and MFU against build-nanogpt ----------------------

def torch_sync():
    import torch

    if TORCH_DEVICE == "cuda":
        torch.cuda.synchronize()


def flops_per_token(n_params):
    """6 per parameter (forward 2, backward 4) plus attention's scores, causal half:
    6N + 6 L C T, as llm.c counts it."""
    cfg, _, T = SIZES["speed"]
    return 6 * n_params + 6 * cfg.n_layer * cfg.n_embd * T


def peak_bf16():
    name = device_name()
    for key, peak in BF16_PEAK:
        if all(part in name for part in key.split()):
            return peak
    return None


def throughput_row(step_ms, n_params, extra=""):
    _, B, T = SIZES["speed"]
    tok_s = B * T / (step_ms / 1e3)
    peak = peak_bf16()
    mfu = f"{flops_per_token(n_params) * tok_s / peak * 100:.1f}%" if peak else "n/a (unknown card)"
    return f"{step_ms:.0f} ms/step, {tok_s:,.0f} tok/s, MFU {mfu}{extra}"


def ours_step_ms(tf32, steps=5):
    import cupy as cp

    os.environ["NANOGPT_CUDA_SYNC"] = "0"
    backend.set_tf32(tf32)
    cfg, B, T = SIZES["speed"]
    model = GPT(cfg, dtype=np.float32, seed=0, backend="cupy")
    opt = optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    idx = cp.asarray(rng.integers(0, min(50257, cfg.vocab_size), (B, T)))
    targets = cp.asarray(rng.integers(0, min(50257, cfg.vocab_size), (B, T)))

    def step():
        model.zero_grad()
        model.forward(idx, targets)
        model.backward()
        optim.clip_grad_norm(model.grads, 1.0)
        opt.step(model.grads)

    ms = median_ms(step, cp.cuda.Device().synchronize, reps=steps, warmup=2)
    pool = cp.get_default_memory_pool().total_bytes() / 2**30
    n = model.num_parameters()
    del model, opt
    backend.set_tf32(False)
    free_gpu_memory()
    return ms, n, pool


def torch_step_ms(compile_model, steps=5):
    import torch

    from tests.torch_gpt import TorchGPT

    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    cfg, B, T = SIZES["speed"]
    model = TorchGPT(cfg).to(TORCH_DEVICE)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
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
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    n = sum(p.numel() for p in model.parameters())
    del model, run, opt
    free_gpu_memory()
    return ms, n, peak


def section_speed(args):
    results = {}

    def ours(tf32):
        ms, n, pool = ours_step_ms(tf32)
        results["ours_tf32" if tf32 else "ours_fp32"] = ms
        return dict(result=throughput_row(ms, n, f"; CuPy pool {pool:.1f} GiB"), limit="", ok=None)

    def torch_run(compiled):
        ms, n, peak = torch_step_ms(compiled)
        results["torch_compile" if compiled else "torch_eager"] = ms
        return dict(result=throughput_row(ms, n, f"; peak {peak:.1f} GiB"), limit="", ok=None)

    cfg, B, T = SIZES["speed"]
    record("4", f"ours f32 + TF32 matmuls, B{B} T{T}", lambda: ours(True))
    record("4", "ours f32 (no TF32)", lambda: ours(False))
    record("4", "torch bf16 autocast, eager", lambda: torch_run(False))
    if args.no_compile:
        record("4", "torch bf16 + torch.compile", lambda: dict(result="skipped (--no-compile)", limit="", ok=None))
    elif time.time() - START > args.budget - 90:
        record("4", "torch bf16 + torch.compile",
               lambda: dict(result="skipped: under 90 s of --budget left", limit="", ok=None))
    else:  # compiling can take minutes: whatever is left of the budget, at most
        left = args.budget - (time.time() - START)
        record("4", "torch bf16 + torch.compile", lambda: with_time_limit(left, lambda: torch_run(True)))

    def ratio():
        torch_best = min(v for k, v in results.items() if k.startswith("torch"))
        best_name = min((v, k) for k, v in results.items() if k.startswith("torch"))[1]
        return dict(result=f"ours (TF32) tok/s = {torch_best / results['ours_tf32']:.2f}x {best_name} tok/s",
                    limit="", ok=None)

    record("4", "ratio ours / PyTorch best", ratio)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=270,
                        help="seconds for the whole run; torch.compile gets what is left, and is skipped under 90 s")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    args = parser.parse_args()
    try:
        backend.get_xp("cupy")
    except RuntimeError as e:  # no CuPy or no GPU: say so once instead of failing every row
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    os.environ["NANOGPT_CUDA_SYNC"] = "1"  # correctness sections: an error names its kernel
    record("0", "environment", environment)
    record("0", "NVRTC compiles every kernel", compile_all)
    section_kernels()
    backend.set_tf32(False)
    section_model_small()
    section_training()
    section_model_124m()
    section_attention_speed()
    section_speed(args)
    save()
    print("\n" + table())
    return 1 if any(r["status"] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
