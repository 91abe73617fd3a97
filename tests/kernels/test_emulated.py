"""The CUDA kernels, run on the CPU by the emulator, against the NumPy layers.

These run the real kernels/*.cu source and the real Python wrappers (the same
launch configurations and argument lists the GPU gets), with NumPy arrays where
the GPU has CuPy arrays. See tests/kernels/emulator.py for what is and is not
emulated.
"""
import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig, kernels, layers, optim
from nanogpt_np.backend import bfloat16
from nanogpt_np.kernels import loader
from tests.helpers import DTYPES, assert_close, randn, rel_err

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


CE_FUSED_SHAPES = [  # B, T, V, against cross_entropy.THREADS = 256 threads per row
    (1, 1, 1),  # N=1, V=1: the target is 0 and V-1
    (1, 1, 300),  # N=1, V not a multiple of the block: the target V-1 in the second stride
    (2, 3, 5),  # V smaller than the block: most threads hold nothing
    (1, 4, 256),  # V exactly the block
    (3, 2, 1000),  # several strides, the last one short
]


def _bits(a):
    """a's raw bits, so that NaN and -0.0 compare exactly too."""
    return np.ascontiguousarray(a).view(f"u{np.dtype(a.dtype).itemsize}")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bf16"])
@pytest.mark.parametrize("B,T,V", CE_FUSED_SHAPES)
def test_cross_entropy_forward_backward_equals_the_two_kernels(emulated, B, T, V, dtype):
    """The training step's one launch gives the losses and the dlogits of the
    separate forward and backward kernels, bit for bit, and the NumPy formula beside
    its wrapper to rounding."""
    dtype = bfloat16() if dtype == "bf16" else np.dtype(dtype)
    rng = np.random.default_rng(V)
    logits = (rng.standard_normal((B, T, V)) * 4).astype(dtype)
    targets = rng.integers(0, V, (B, T))
    targets[0, 0], targets[-1, -1] = 0, V - 1  # the first and the last class
    two, one = logits.copy(), logits.copy()
    losses_two, cache = kernels.cross_entropy.forward_losses(two, targets)
    dlogits_two = kernels.cross_entropy.backward(0.7, cache)
    del emulated.launches[:]
    losses, dlogits = kernels.cross_entropy.forward_backward(one, targets, 0.7)
    assert emulated.launches == [f"cross_entropy_forward_backward<{loader.ctype(dtype)}>"]
    assert np.shares_memory(dlogits, one) and dlogits.shape == logits.shape  # written over the logits
    assert losses.dtype == losses_two.dtype == loader.accumulate_dtype(dtype) and losses.shape == (B * T,)
    np.testing.assert_array_equal(_bits(losses), _bits(losses_two))
    np.testing.assert_array_equal(_bits(dlogits), _bits(dlogits_two))
    wide = logits.astype(np.float64)  # the formula on the very values the kernel read
    losses_ref, dlogits_ref = kernels.cross_entropy.reference_forward_backward(0.7, wide, targets)
    if dtype == bfloat16():  # float32 arithmetic, then dlogits rounded to bf16 (a relative 2^-8)
        assert_close(losses, losses_ref, np.float32, "losses")
        assert rel_err(dlogits, dlogits_ref) <= 2.0**-8, "dlogits"
    else:
        assert_close(losses, losses_ref, dtype, "losses")
        assert_close(dlogits, dlogits_ref, dtype, "dlogits")


def test_cross_entropy_forward_backward_with_a_target_out_of_range(emulated):
    """A target outside [0, V): a NaN loss and a row of softmax * scale, as the two kernels give."""
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((1, 3, 40)).astype(np.float32)
    targets = np.array([[5, -1, 40]])
    two, one = logits.copy(), logits.copy()
    losses_two, cache = kernels.cross_entropy.forward_losses(two, targets)
    dlogits_two = kernels.cross_entropy.backward(1.0, cache)
    losses, dlogits = kernels.cross_entropy.forward_backward(one, targets, 1.0)
    assert np.isnan(losses[1:]).all() and np.isfinite(losses[0])
    np.testing.assert_array_equal(_bits(losses), _bits(losses_two))
    np.testing.assert_array_equal(_bits(dlogits), _bits(dlogits_two))


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
    """The emulator's own checks work: deadlocks, writes past an array, and a
    barrier in a kernel run thread after thread. (Races between warps over
    shared memory: test_a_missing_barrier_is_a_race_naming_both_lines.)"""
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


def _bf16_attention_call(path, backward=False):
    """A bf16 attention call through NANOGPT_BF16_ATTENTION=path, three key tiles long."""
    import os

    from nanogpt_np.backend import bfloat16

    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((1, 130, 3 * 64)).astype(np.float32).astype(bfloat16())
    previous = os.environ.get(kernels.attention.BF16_PATH_ENV)
    os.environ[kernels.attention.BF16_PATH_ENV] = path
    try:
        y, cache = kernels.attention.forward(qkv, 1)
        if backward:
            kernels.attention.backward(rng.standard_normal(y.shape).astype(np.float32).astype(bfloat16()), cache)
    finally:
        if previous is None:
            del os.environ[kernels.attention.BF16_PATH_ENV]
        else:
            os.environ[kernels.attention.BF16_PATH_ENV] = previous


def _cross_entropy_call():
    x = np.random.default_rng(0).standard_normal((2, 3, 1000)).astype(np.float32)
    kernels.cross_entropy.forward(x, np.zeros((2, 3), np.int64))


MISSING_BARRIERS = {  # kernel file, the text whose __syncthreads is removed, a call that runs it
    "block_logsumexp: warp 0 reads partial sums not yet written": (
        "common.cuh", "cross_entropy.cu", "        shared_s[warp] = s;\n    }\n    __syncthreads();\n",
        "__syncthreads();\n", _cross_entropy_call, r"block_logsumexp.*common\.cuh:\d+.*common\.cuh:\d+"),
    "attention_mma forward: a warp overwrites the K/V tile another warp still reads": (
        "attention_mma.cu", "attention_mma.cu", "        __syncthreads();  // everyone is done with the previous tile\n",
        "__syncthreads();", lambda: _bf16_attention_call("mma"),
        r"flash_attention_mma_forward.*_tile.*attention_mma\.cu:\d+.*attention_mma\.cu:\d+"),
    "fa2 forward: cp.async refills a stage another warp still reads": (
        "attention_mma.cu", "attention_mma.cu",
        "        __syncthreads();     // ... everyone's; and every warp is done with stage (j + 1) % 2\n",
        "__syncthreads();", lambda: _bf16_attention_call("fa2"),
        r"flash_attention_fa2_forward.*::kv.*attention_mma\.cu:\d+.*attention_mma\.cu:\d+"),
    "fa2 backward: warps read ds^T before every warp has written its rows": (
        "attention_mma.cu", "attention_mma.cu", "        __syncthreads();  // ds^T complete\n",
        "__syncthreads();", lambda: _bf16_attention_call("fa2", backward=True),
        r"flash_attention_fa2_backward<64>.*ds_tile.*attention_mma\.cu:\d+.*attention_mma\.cu:\d+"),
}
MISSING_WAIT = "        cp_async_wait<0>();  // tile j has landed (this thread's copies) ...\n"


@pytest.mark.parametrize("case", sorted(MISSING_BARRIERS))
def test_a_missing_barrier_is_a_race_naming_both_lines(case, tmp_path):
    """Each __syncthreads listed, removed from a copy of the source, makes the
    emulator fail the launch with a race naming the kernel, the shared array and
    both source lines; so a passing emulated test means no barrier is missing,
    even where the numbers would come out right."""
    from nanogpt_np.kernels import loader
    from tests.kernels import emulator

    filename, built, text, barrier, call, message = MISSING_BARRIERS[case]
    source = (loader.KERNEL_DIR / filename).read_text()
    assert source.count(text) == 1 and barrier in text
    broken = source.replace(text, text.replace(barrier, ""))
    lib = emulator.build(tmp_path, replace={filename: broken}, files=(built,))
    previous = loader.use_runner(emulator.EmulatedRunner(lib))
    try:
        with pytest.raises(RuntimeError, match="race on shared memory in .*" + message):
            call()
    finally:
        loader.use_runner(previous)


def test_a_missing_cp_async_wait_fails_the_launch(tmp_path):
    """Without its cp.async.wait_group the FlashAttention-2 forward would read
    tiles that have not landed: the emulator lands copies only at a wait, so the
    data is stale and the thread ends with copies in flight, which is an error."""
    from nanogpt_np.kernels import loader
    from tests.kernels import emulator

    source = (loader.KERNEL_DIR / "attention_mma.cu").read_text()
    assert source.count(MISSING_WAIT) == 1
    lib = emulator.build(tmp_path, replace={"attention_mma.cu": source.replace(MISSING_WAIT, "")},
                         files=("attention_mma.cu",))
    previous = loader.use_runner(emulator.EmulatedRunner(lib))
    try:
        with pytest.raises(RuntimeError, match="flash_attention_fa2_forward.*cp.async copies it never waited for"):
            _bf16_attention_call("fa2")
    finally:
        loader.use_runner(previous)


PROBES = r"""
#include "cuda_emulation.h"
// ldmatrix: input row k (of 32 x 8 16-bit values) is stored at shared row 31 - k, and
// lane k points at it: matrix i's rows are input rows 8i .. 8i+7 only if the
// emulator reads the rows at the addresses the lanes give.
__global__ void ldmatrix_probe(const int* m, int* out, int count, int trans) {
    __shared__ __align__(16) unsigned short tile[32][8];
    const int lane = threadIdx.x;
    for (int c = 0; c < 8; ++c) tile[31 - lane][c] = (unsigned short)m[8 * lane + c];
    __syncthreads();
    unsigned r[4] = {0u, 0u, 0u, 0u};
    emu_ldmatrix(r, count, trans != 0, &tile[31 - lane][0]);
    for (int i = 0; i < 4; ++i) out[4 * lane + i] = (int)r[i];
}
// cp.async: two groups; what shared memory holds before any wait, after
// wait_group 1 (the older group landed), after wait_group 0 (both).
__global__ void cp_async_probe(const float* src, float* out, int unused) {
    __shared__ __align__(16) float buf[2][128];
    const int tid = threadIdx.x;
    for (int k = 0; k < 4; ++k) buf[0][4 * tid + k] = buf[1][4 * tid + k] = -1.0f;
    emu_cp_async(&buf[0][4 * tid], src + 4 * tid, 16);
    emu_cp_async_commit();
    emu_cp_async(&buf[1][4 * tid], src + 128 + 4 * tid, 8);  // 8 bytes, then 8 bytes of zeros
    emu_cp_async_commit();
    for (int step = 0; step < 3; ++step) {
        if (step == 1) emu_cp_async_wait(1);
        if (step == 2) emu_cp_async_wait(0);
        for (int k = 0; k < 4; ++k) {
            out[256 * step + 4 * tid + k] = buf[0][4 * tid + k];
            out[256 * step + 128 + 4 * tid + k] = buf[1][4 * tid + k];
        }
    }
}
__global__ void cp_async_never_waited(const float* src, float* out, int unused) {
    __shared__ __align__(16) float buf[128];
    emu_cp_async(&buf[4 * threadIdx.x], src + 4 * threadIdx.x, 16);
    emu_cp_async_commit();
}
// warp 0 copies, warp 1 reads: a race unless a __syncthreads sits between
__global__ void cp_async_then_read(const float* src, float* out, int sync) {
    __shared__ __align__(16) float buf[128];
    if (threadIdx.x < 32) {
        emu_cp_async(&buf[4 * threadIdx.x], src + 4 * threadIdx.x, 16);
        emu_cp_async_commit();
        emu_cp_async_wait(0);
    }
    if (sync) __syncthreads();
    if (threadIdx.x >= 32)
        for (int k = 0; k < 4; ++k) out[4 * (threadIdx.x - 32) + k] = buf[4 * (threadIdx.x - 32) + k];
}
__global__ void atomic_probe(const float* unused, float* x, int n) {
    atomicAdd(&x[0], 1.0f);
    __syncthreads();  // the fibers interleave between the two adds
    atomicAdd(&x[1 + threadIdx.x % n], 0.25f);
}
const std::map<std::string, EmuEntry>& emu_registry() {
    static const std::map<std::string, EmuEntry> r = {
        {"ldmatrix_probe", emu_entry(&ldmatrix_probe)}, {"cp_async_probe", emu_entry(&cp_async_probe)},
        {"cp_async_never_waited", emu_entry(&cp_async_never_waited)},
        {"cp_async_then_read", emu_entry(&cp_async_then_read)}, {"atomic_probe", emu_entry(&atomic_probe)}};
    return r;
}
"""


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    import shutil

    from tests.kernels.emulator import EmulatedRunner, build_source

    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH")
    return EmulatedRunner(build_source(tmp_path_factory.mktemp("probes"), PROBES))


@pytest.mark.parametrize("trans", [0, 1])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_emulated_ldmatrix_follows_the_ptx_fragment_layout(probes, count, trans):
    """ldmatrix.m8n8.x{1,2,4}[.trans].b16, by PTX's description: register i of
    lane l holds row l/4, columns 2(l%4) and +1 of matrix i (of its transpose with
    .trans), the smaller column in the low half."""
    m = np.random.default_rng(count + 10 * trans).integers(0, 1 << 16, (32, 8)).astype(np.int32)
    out = np.zeros((32, 4), np.int32)
    probes.launch(None, "ldmatrix_probe", (1,), (32,), (m, out, np.int32(count), np.int32(trans)), 0)
    matrices = m.reshape(4, 8, 8)
    want = np.zeros((32, 4), np.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(count):
            mat = matrices[i].T if trans else matrices[i]
            want[lane, i] = int(mat[g, 2 * t]) | (int(mat[g, 2 * t + 1]) << 16)
    np.testing.assert_array_equal(out.view(np.uint32), want.astype(np.uint32))


def test_emulated_cp_async_lands_only_at_its_wait(probes):
    src = np.arange(1, 257, dtype=np.float32)
    out = np.zeros(768, np.float32)
    probes.launch(None, "cp_async_probe", (1,), (32,), (src, out, np.int32(0)), 0)
    before, after_older, after_all = out.reshape(3, 2, 128)
    np.testing.assert_array_equal(before, -1.0)  # nothing has landed before a wait
    np.testing.assert_array_equal(after_older[0], src[:128])  # wait_group 1: the older group
    np.testing.assert_array_equal(after_older[1], -1.0)  # ... but not the newer
    np.testing.assert_array_equal(after_all[0], src[:128])
    newer = np.zeros((32, 4), np.float32)
    newer[:, :2] = src[128:].reshape(32, 4)[:, :2]  # 8 bytes copied, 8 zero-filled
    np.testing.assert_array_equal(after_all[1], newer.reshape(-1))
    with pytest.raises(RuntimeError, match="cp.async copies it never waited for"):
        probes.launch(None, "cp_async_never_waited", (1,), (32,), (src, out, np.int32(0)), 0)


def test_a_cp_async_read_by_another_warp_needs_a_barrier(probes):
    src = np.arange(128, dtype=np.float32)
    out = np.zeros(128, np.float32)
    probes.launch(None, "cp_async_then_read", (1,), (64,), (src, out, np.int32(1)), 0)
    np.testing.assert_array_equal(out, src)
    with pytest.raises(RuntimeError, match=r"race on shared memory in cp_async_then_read: warp \d (reads|writes) "
                                           r"the word at shared cp_async_then_read.*::buf \+ \d+ bytes at emulation_"):
        probes.launch(None, "cp_async_then_read", (1,), (64,), (src, out, np.int32(0)), 0)


def test_emulated_atomic_add_loses_no_update(probes):
    x = np.zeros(4, np.float32)
    probes.launch(None, "atomic_probe", (3,), (96,), (np.zeros(1, np.float32), x, np.int32(3)), 0)
    np.testing.assert_array_equal(x, [288.0, 24.0, 24.0, 24.0])
