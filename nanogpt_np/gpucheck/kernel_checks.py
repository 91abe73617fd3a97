"""Section 1: every kernel against its NumPy layer on random inputs."""
import math

import numpy as np

from nanogpt_np import kernels, layers, optim

from . import settings
from .table import bf16, compare, host_f64, record, rel_err


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
                    "dqkv": rel_err(dqkv, dqkv_ref)}, settings.F32_LIMIT if dtype == np.float32 else settings.F64_LIMIT)


def check_attention_bf16(B, T, NH, path="fa2"):
    """The bf16 attention path (tensor cores, or with path="simt" the float32
    kernels) against float64 attention of the same bf16 inputs."""
    import cupy as cp

    with kernels.attention.bf16_path(path):
        rng = np.random.default_rng(T + 1)
        qkv = np.asarray(rng.standard_normal((B, T, 3 * NH * 64)) * 1.5, dtype=np.float32).astype(bf16())
        dy = np.asarray(rng.standard_normal((B, T, NH * 64)), dtype=np.float32).astype(bf16())
        y, cache = kernels.attention.forward(cp.asarray(qkv), NH)
        dqkv = kernels.attention.backward(cp.asarray(dy), cache)
        assert y.dtype == bf16() and dqkv.dtype == bf16()
        y_ref, cache_ref = layers.attention.forward(qkv.astype(np.float64), NH)
        dqkv_ref = layers.attention.backward(dy.astype(np.float64), cache_ref)
    lse = kernels.attention.lse_of(cache)
    row = compare({"y": rel_err(y, y_ref), "lse": rel_err(lse, cache_ref[2]), "dqkv": rel_err(dqkv, dqkv_ref)},
                  settings.BF16_ATTENTION_LIMIT)
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
                    "db": rel_err(db, db_ref)}, settings.F32_LIMIT if dtype == np.float32 else settings.F64_LIMIT)


def check_gelu(shape, dtype):
    import cupy as cp

    rng = np.random.default_rng(2)
    x, dout = (rng.standard_normal(shape) * 3).astype(dtype), rng.standard_normal(shape).astype(dtype)
    out, cache = kernels.gelu.forward(cp.asarray(x))
    dx = kernels.gelu.backward(cp.asarray(dout), cache)
    out_ref, cache_ref = layers.gelu.forward(x.astype(np.float64))
    dx_ref = layers.gelu.backward(dout.astype(np.float64), cache_ref)
    return compare({"out": rel_err(out, out_ref), "dx": rel_err(dx, dx_ref)},
                   settings.F32_LIMIT if dtype == np.float32 else settings.F64_LIMIT)


def _one_kernel_errors(logits, targets, loss, dlogits):
    """The training step's one-kernel cross-entropy (forward_backward) against the two
    kernels' loss and dlogits: 0 when, as on the emulator, they have the same bits."""
    import cupy as cp

    losses, dlogits_one = kernels.cross_entropy.forward_backward(cp.asarray(logits), cp.asarray(targets), 1.0)
    return {"1-kernel loss": rel_err(losses.mean(), loss), "1-kernel dlogits": rel_err(dlogits_one, dlogits)}


def check_cross_entropy(B, T, V, dtype):
    import cupy as cp

    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((B, T, V)) * 3).astype(dtype)
    targets = rng.integers(0, V, (B, T))
    loss, cache = kernels.cross_entropy.forward(cp.asarray(logits), cp.asarray(targets))
    dlogits = kernels.cross_entropy.backward(1.0, cache)
    loss_ref, cache_ref = layers.cross_entropy.forward(logits.astype(np.float64), targets)
    dlogits_ref = layers.cross_entropy.backward(1.0, cache_ref)
    errors = {"loss": rel_err(loss, loss_ref), "dlogits": rel_err(dlogits, dlogits_ref),
              **_one_kernel_errors(logits, targets, loss, dlogits)}
    return compare(errors, settings.F32_LIMIT if dtype == np.float32 else settings.F64_LIMIT)


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
                   settings.F32_LIMIT if dtype == np.float32 else settings.F64_LIMIT)


def check_bf16_layernorm_gelu_ce():
    """LayerNorm float32 -> bf16 (and back in backward), GELU in bf16, cross-entropy
    on bf16 logits: each against float64 formulas of the same (rounded) inputs."""
    import cupy as cp

    B, T, C, V = settings.SIZES["bf16_rows"]
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
    errors.update({"ce " + k: v for k, v in _one_kernel_errors(logits, targets, loss, dlogits).items()})
    return compare(errors, settings.BF16_LIMIT)


def check_fused_bf16():
    """fused.cu in bf16 against its formulas (kernels/fused.py states them)."""
    import cupy as cp

    B, T, C, _ = settings.SIZES["bf16_rows"]
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
    return compare(errors, settings.BF16_LIMIT)


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
    return compare(errors, settings.BF16_LIMIT)


def section_kernels():
    for B, T, NH, dtype in settings.SIZES["attention"]:
        record("1", f"attention B{B} T{T} NH{NH} {np.dtype(dtype).name}", lambda: check_attention(B, T, NH, dtype))
    for B, T, NH in settings.SIZES["attention_bf16"]:
        record("1", f"attention B{B} T{T} NH{NH} bf16", lambda: check_attention_bf16(B, T, NH))
    B, T, NH = settings.SIZES["attention_bf16"][-1]
    record("1", f"attention B{B} T{T} NH{NH} bf16 via f32 kernels", lambda: check_attention_bf16(B, T, NH, "simt"))
    for shape, dtype in settings.SIZES["layernorm"]:
        record("1", f"layernorm {shape} {np.dtype(dtype).name}", lambda: check_layernorm(shape, dtype))
    for shape, dtype in settings.SIZES["gelu"]:
        record("1", f"gelu {shape} {np.dtype(dtype).name}", lambda: check_gelu(shape, dtype))
    for B, T, V, dtype in settings.SIZES["cross_entropy"]:
        record("1", f"cross_entropy B{B} T{T} V{V} {np.dtype(dtype).name}",
               lambda: check_cross_entropy(B, T, V, dtype))
    for n, dtype in settings.SIZES["adamw"]:
        record("1", f"adamw n={n} {np.dtype(dtype).name}", lambda: check_adamw(n, dtype))
    record("1", "bf16 layernorm, gelu, cross_entropy", check_bf16_layernorm_gelu_ce)
    record("1", "bf16 fused bias/gelu/residual/cast", check_fused_bf16)
    for M, K, N in settings.SIZES["gemm"]:
        record("1", f"gemmEx bf16 M{M} K{K} N{N}", lambda: check_gemm(M, K, N))
