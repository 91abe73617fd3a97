"""The CUDA kernels, run on the CPU by the emulator, against the NumPy layers.

These run the real kernels/*.cu source and the real Python wrappers (the same
launch configurations and argument lists the GPU gets), with NumPy arrays where
the GPU has CuPy arrays. See tests/kernels/emulator.py for what is and is not
emulated.
"""
import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig, kernels, layers, optim
from tests.helpers import DTYPES, assert_close, randn

ATTN_SHAPES = [  # B, T, NH (head size 64, the kernels')
    (1, 1, 1),  # T=1, B=1, one head
    (2, 7, 2),  # shorter than every tile
    (1, 64, 1),  # exactly one forward tile
    (2, 65, 2),  # one row into the second tile
    (1, 97, 3),  # odd T over several tiles of each kind
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,NH", ATTN_SHAPES)
def test_attention_kernels(emulated, B, T, NH, dtype):
    rng = np.random.default_rng(T)
    C = NH * 64
    qkv = randn(rng, (B, T, 3 * C), dtype, scale=1.5)
    dy = randn(rng, (B, T, C), dtype)
    qkv0, dy0 = qkv.copy(), dy.copy()
    y, cache = kernels.attention.forward(qkv, NH)
    dqkv = kernels.attention.backward(dy, cache)
    y_ref, cache_ref = layers.attention.forward(qkv, NH)
    dqkv_ref = layers.attention.backward(dy, cache_ref)
    assert [n.split("<")[0] for n in emulated.launches] == [
        "flash_attention_forward", "flash_attention_backward_dq", "flash_attention_backward_dkdv"]
    assert y.dtype == dtype and dqkv.dtype == dtype and y.shape == (B, T, C)
    assert_close(y, y_ref, dtype, "y")
    assert_close(cache[3], cache_ref[2], dtype, "lse")
    assert_close(dqkv, dqkv_ref, dtype, "dqkv", factor=10)
    np.testing.assert_array_equal(qkv, qkv0)
    np.testing.assert_array_equal(dy, dy0)


def test_attention_other_head_sizes_fall_back_to_the_formula(emulated):
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 9, 3 * 2 * 16))  # head size 16: no kernel
    assert not kernels.attention.uses_kernel(qkv, 2)
    y, cache = kernels.attention.forward(qkv, 2)
    dqkv = kernels.attention.backward(np.ones_like(y), cache)
    y_ref, cache_ref = layers.attention.forward(qkv, 2)
    assert emulated.launches == []
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dqkv, layers.attention.backward(np.ones_like(y), cache_ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 45), (1, 13, 768), (3, 5, 33)])
def test_layernorm_kernels(emulated, shape, dtype):
    rng = np.random.default_rng(1)
    C = shape[-1]
    x = randn(rng, shape, dtype, scale=2.0) + 0.5
    w, b = randn(rng, (C,), dtype), randn(rng, (C,), dtype)
    dout = randn(rng, shape, dtype)
    out, cache = kernels.layernorm.forward(x, w, b)
    grads = kernels.layernorm.backward(dout, cache)
    out_ref, cache_ref = layers.layernorm.forward(x, w, b)
    grads_ref = layers.layernorm.backward(dout, cache_ref)
    assert_close(out, out_ref, dtype, "out")
    assert_close(cache[2], cache_ref[2], dtype, "mean")
    assert_close(cache[3], cache_ref[3], dtype, "rstd")
    for got, want, what in zip(grads, grads_ref, ("dx", "dweight", "dbias")):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got, want, dtype, what, factor=10)


def test_layernorm_params_kernel_sums_many_chunks(emulated):
    """More rows than PARAM_CHUNKS: several rows per chunk, the last chunk short."""
    rng = np.random.default_rng(2)
    x, dout = rng.standard_normal((3, 301, 8)), rng.standard_normal((3, 301, 8))
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    _, cache = kernels.layernorm.forward(x, w, b)
    _, cache_ref = layers.layernorm.forward(x, w, b)
    for got, want in zip(kernels.layernorm.backward(dout, cache), layers.layernorm.backward(dout, cache_ref)):
        assert_close(got, want, np.float64, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 45), (4, 300)])
def test_gelu_kernels(emulated, shape, dtype):
    rng = np.random.default_rng(3)
    x, dout = randn(rng, shape, dtype, scale=3.0), randn(rng, shape, dtype)
    out, cache = kernels.gelu.forward(x)
    out_ref, cache_ref = layers.gelu.forward(x)
    assert_close(out, out_ref, dtype, "out")
    assert_close(kernels.gelu.backward(dout, cache), layers.gelu.backward(dout, cache_ref), dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,V", [(1, 1, 1), (2, 7, 101), (1, 3, 1000), (3, 2, 257)])
def test_cross_entropy_kernels(emulated, B, T, V, dtype):
    rng = np.random.default_rng(4)
    logits = randn(rng, (B, T, V), dtype, scale=4.0)
    targets = rng.integers(0, V, (B, T))
    mine, ref = logits.copy(), logits.copy()
    loss, cache = kernels.cross_entropy.forward(mine, targets)
    loss_ref, cache_ref = layers.cross_entropy.forward(ref, targets)
    np.testing.assert_array_equal(mine, logits)  # forward leaves the logits alone
    assert loss.shape == () and loss.dtype == dtype
    assert_close(loss, loss_ref, dtype, "loss")
    dlogits = kernels.cross_entropy.backward(0.5, cache)
    dlogits_ref = layers.cross_entropy.backward(0.5, cache_ref)
    assert np.shares_memory(dlogits, mine)  # written over the logits
    assert_close(dlogits, dlogits_ref, dtype, "dlogits")


def test_cross_entropy_large_logits_are_stable(emulated):
    logits = np.array([[[1000.0, 0.0, -1000.0], [-1e4, -1e4 + 1, -1e4 + 2]]], dtype=np.float32)
    loss, cache = kernels.cross_entropy.forward(logits.copy(), np.array([[0, 2]]))
    loss_ref, _ = layers.cross_entropy.forward(logits.copy(), np.array([[0, 2]]))
    assert np.isfinite(loss) and abs(float(loss) - float(loss_ref)) < 1e-5
    assert np.isfinite(kernels.cross_entropy.backward(1.0, cache)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_kernel_matches_the_formula(emulated, dtype, monkeypatch):
    cfg = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8)
    models = [GPT(cfg, dtype=dtype, seed=0) for _ in range(2)]
    rng = np.random.default_rng(5)
    fused_flags = []
    for fused, model in zip((True, False), models):
        monkeypatch.setattr(optim, "_fused_update", lambda xp, f=fused: kernels.adamw if f else None)
        opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        fused_flags.append(opt._fused is not None)
        rng = np.random.default_rng(5)
        for step in range(3):
            model.flat_grads[...] = rng.standard_normal(model.flat_grads.shape)
            opt.step(model.grads, lr=1e-2 * (step + 1))
    assert fused_flags == [True, False]
    assert [n.split("<")[0] for n in emulated.launches] == ["adamw_step"] * 3
    assert_close(models[0].flat_params, models[1].flat_params, dtype, "params", factor=10)


def test_decay_bounds_merge_adjacent_spans():
    np.testing.assert_array_equal(kernels.adamw.decay_bounds([(10, 20), (0, 5), (5, 8)]), [0, 8, 10, 20])


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_model_through_the_kernels(emulated, dtype):
    """forward + backward of a model whose every layer runs the kernel path: the
    GPU schedule of kernels/block.py against the readable block on NumPy."""
    cfg = GPTConfig(block_size=80, vocab_size=67, n_layer=2, n_head=2, n_embd=128)  # head size 64
    rng = np.random.default_rng(6)
    idx, targets = rng.integers(0, 67, (2, 71)), rng.integers(0, 67, (2, 71))
    results = []
    for ops in (kernels, layers):
        model = GPT(cfg, dtype=dtype, seed=1)
        model.ops = ops
        model.zero_grad()
        logits, loss = model.forward(idx, targets)
        logits = logits.copy()
        model.backward()
        results.append((logits, loss, model.flat_grads.copy()))
    launched = {n.split("<")[0] for n in emulated.launches}
    assert {"flash_attention_forward", "layernorm_forward", "bias_gelu_forward", "cross_entropy_forward",
            "flash_attention_backward_dkdv", "layernorm_backward_fused", "cross_entropy_backward", "bias_add",
            "residual_layernorm_forward", "bias_gelu_backward", "column_sums", "embedding_forward",
            "embedding_backward", "finish_partials", "loss_mean"} <= launched
    (logits, loss, grads), (logits_ref, loss_ref, grads_ref) = results
    assert_close(logits, logits_ref, dtype, "logits")
    assert_close(loss, loss_ref, dtype, "loss")
    assert_close(grads, grads_ref, dtype, "flat grads", factor=10)


def test_launch_rejects_python_scalars_and_wrong_dtypes(emulated):
    """What would silently garble a GPU launch is an error here."""
    from nanogpt_np.kernels import gelu, loader

    x, out = np.zeros(4, np.float32), np.zeros(4, np.float32)
    name = "gelu_forward<float>"
    with pytest.raises(TypeError, match="np.float32/np.float64"):
        gelu._cu.launch(name, (1,), (32,), (x, out, 4))  # a Python int is sent as int64 by CuPy
    with pytest.raises(TypeError, match="takes int64"):
        gelu._cu.launch(name, (1,), (32,), (x, out, np.int32(4)))  # n is long long
    with pytest.raises(TypeError, match="float64 array but the kernel reads float32"):
        gelu._cu.launch(name, (1,), (32,), (x.astype(np.float64), out, np.int64(4)))
    with pytest.raises(ValueError, match="C-contiguous"):
        gelu._cu.launch(name, (1,), (32,), (np.zeros(8, np.float32)[::2], out, np.int64(4)))
    with pytest.raises(KeyError, match="not declared"):
        gelu._cu.launch("gelu_forward<half>", (1,), (32,), (x, out, np.int64(4)))
    assert loader.check_args("k", (np.float32(1), np.int64(2), x)) is None


BAD_KERNELS = r"""
#include "cuda_emulation.h"
template <typename T> __global__ void divergent_barrier(T* x) { if (threadIdx.x < 16) __syncthreads(); x[0] = 1; }
template <typename T> __global__ void writes_past_the_end(T* x, int n) { if (threadIdx.x <= n) x[threadIdx.x] = 1; }
template <typename T> __global__ void syncs_if(T* x, int flag) { if (flag) __syncthreads(); x[threadIdx.x] = 2; }
const std::map<std::string, EmuEntry>& emu_registry() {
    static const std::map<std::string, EmuEntry> r = {
        {"divergent_barrier<float>", emu_entry(&divergent_barrier<float>)},
        {"writes_past_the_end<float>", emu_entry(&writes_past_the_end<float>)},
        {"syncs_if<float>", emu_entry(&syncs_if<float>)}};
    return r;
}
"""


def test_emulator_catches_deadlocks_and_stray_writes(tmp_path):
    """The emulator's own checks work, so a passing emulated test means the
    barriers are placed right and no kernel writes outside its arrays."""
    import shutil
    import subprocess
    from pathlib import Path

    from tests.kernels.emulator import EmulatedRunner

    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH")
    src, lib = tmp_path / "bad.cpp", tmp_path / "bad.so"
    src.write_text(BAD_KERNELS)
    subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", f"-I{Path(__file__).parent}", str(src),
                    "-o", str(lib)], check=True)
    runner = EmulatedRunner(lib)
    x = np.zeros(4, np.float32)
    with pytest.raises(RuntimeError, match="deadlock at __syncthreads: 16 threads wait"):
        runner.launch(None, "divergent_barrier<float>", (1,), (32,), (x,), 0)
    with pytest.raises(RuntimeError, match="wrote outside argument 0"):
        runner.launch(None, "writes_past_the_end<float>", (1,), (32,), (x, np.int32(4)), 0)
    runner.launch(None, "writes_past_the_end<float>", (1,), (32,), (x, np.int32(3)), 0)
    np.testing.assert_array_equal(x, 1)
    # a kernel that reached no barrier on its first launch runs thread after thread later on,
    # and reaching a barrier then is an error, not a silent race
    x = np.zeros(32, np.float32)
    runner.launch(None, "syncs_if<float>", (2,), (32,), (x, np.int32(0)), 0)
    with pytest.raises(RuntimeError, match="barrier was reached by a kernel whose first launch reached none"):
        runner.launch(None, "syncs_if<float>", (2,), (32,), (x, np.int32(1)), 0)
