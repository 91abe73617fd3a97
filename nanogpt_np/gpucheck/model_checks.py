"""Section 2: the whole model, GPU against NumPy."""
import math
import time

import numpy as np

from nanogpt_np import GPT, backend
from nanogpt_np.config import parameter_shapes

from . import settings
from .table import compare, free_gpu_memory, host_f64, record, rel_err


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
    cfg, B, T = settings.SIZES["small_model"]
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

    cfg, B, T = settings.SIZES["big_model"]
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
