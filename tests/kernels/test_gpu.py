"""The CuPy backend on a real GPU: every kernel against its NumPy layer, the whole
model against the NumPy backend, training steps, checkpoints moving between GPU
and CPU. Marked `gpu`; skipped where CuPy or an NVIDIA GPU is missing (the CPU
suite covers the same kernels through the emulator, tests/kernels/test_emulated.py).
"""
import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig, backend, kernels, layers, optim
from nanogpt_np.kernels import loader
from tests.helpers import DTYPES, assert_close, randn


def _gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu_available(), reason="needs CuPy and an NVIDIA GPU")]


@pytest.fixture
def cp(monkeypatch):
    import cupy

    monkeypatch.setenv("NANOGPT_CUDA_SYNC", "1")
    loader.sync_each_launch(True)  # an error inside a kernel names that kernel
    backend.set_tf32(False)
    yield cupy
    loader.sync_each_launch(False)


def test_every_kernel_compiles_with_nvrtc_on_this_gpu(cp):
    runner = loader.CupyRunner()
    for kf in loader.ALL_FILES:
        for name in kf.names:
            assert runner.function(kf, name) is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,NH", [(1, 1, 1), (2, 77, 3), (1, 200, 2), (2, 1024, 2)])
def test_attention_on_gpu(cp, B, T, NH, dtype):
    rng = np.random.default_rng(T)
    qkv, dy = randn(rng, (B, T, 3 * NH * 64), dtype, 1.5), randn(rng, (B, T, NH * 64), dtype)
    y, cache = kernels.attention.forward(cp.asarray(qkv), NH)
    dqkv = kernels.attention.backward(cp.asarray(dy), cache)
    y_ref, cache_ref = layers.attention.forward(qkv, NH)
    assert_close(y.get(), y_ref, dtype, "y")
    assert_close(dqkv.get(), layers.attention.backward(dy, cache_ref), dtype, "dqkv", factor=10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_gelu_cross_entropy_on_gpu(cp, dtype):
    rng = np.random.default_rng(0)
    x, dout = randn(rng, (3, 77, 768), dtype, 2.0), randn(rng, (3, 77, 768), dtype)
    w, b = randn(rng, (768,), dtype), randn(rng, (768,), dtype)
    out, cache = kernels.layernorm.forward(cp.asarray(x), cp.asarray(w), cp.asarray(b))
    out_ref, cache_ref = layers.layernorm.forward(x, w, b)
    assert_close(out.get(), out_ref, dtype, "layernorm out")
    for got, want in zip(kernels.layernorm.backward(cp.asarray(dout), cache), layers.layernorm.backward(dout, cache_ref)):
        assert_close(got.get(), want, dtype, "layernorm grad", factor=10)

    out, cache = kernels.gelu.forward(cp.asarray(x))
    out_ref, cache_ref = layers.gelu.forward(x)
    assert_close(out.get(), out_ref, dtype, "gelu out")
    assert_close(kernels.gelu.backward(cp.asarray(dout), cache).get(), layers.gelu.backward(dout, cache_ref),
                 dtype, "gelu dx")

    logits, targets = randn(rng, (2, 77, 50257), dtype, 3.0), rng.integers(0, 50257, (2, 77))
    loss, cache = kernels.cross_entropy.forward(cp.asarray(logits), cp.asarray(targets))
    loss_ref, cache_ref = layers.cross_entropy.forward(logits.copy(), targets)
    assert_close(float(loss), float(loss_ref), dtype, "loss")
    assert_close(kernels.cross_entropy.backward(1.0, cache).get(), layers.cross_entropy.backward(1.0, cache_ref),
                 dtype, "dlogits")


def _model_pair(cfg, dtype, seed=1):
    gpu, cpu = GPT(cfg, dtype=dtype, seed=seed, backend="cupy"), GPT(cfg, dtype=dtype, seed=seed)
    assert gpu.ops is kernels and cpu.ops is layers
    return gpu, cpu


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_loss_and_grads_match_numpy(cp, dtype):
    cfg = GPTConfig(block_size=128, vocab_size=1000, n_layer=2, n_head=4, n_embd=256)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 1000, (2, 77)), rng.integers(0, 1000, (2, 77))
    out = []
    for model in _model_pair(cfg, dtype):
        model.zero_grad()
        logits, loss = model.forward(idx, targets)
        logits = backend.to_host(logits).copy()
        model.backward()
        out.append((logits, loss, backend.to_host(model.flat_grads)))
    (lg, l, g), (lg_ref, l_ref, g_ref) = out
    assert_close(l, l_ref, dtype, "loss")
    assert_close(lg, lg_ref, dtype, "logits")
    assert_close(g, g_ref, dtype, "grads", factor=10)


def test_training_steps_track_numpy(cp):
    cfg = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=128)
    losses = []
    for model in _model_pair(cfg, np.float32):
        opt = optim.AdamW(model.parameters(), lr=1e-3)
        assert (opt._fused is not None) == (model.xp is not np)
        assert len(opt._segments(model.grads)) == 1  # one flat buffer: the fused kernel runs on the GPU
        data = np.random.default_rng(1)
        run = []
        for _ in range(5):
            idx = data.integers(0, 512, (4, 64))
            model.zero_grad()
            _, loss = model.forward(idx, np.roll(idx, -1, axis=1))
            model.backward()
            optim.clip_grad_norm(model.grads, 1.0)
            opt.step(model.grads)
            run.append(loss)
        losses.append(run)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_checkpoints_move_between_gpu_and_cpu(cp):
    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=1, n_embd=64)
    gpu, cpu = GPT(cfg, seed=3, backend="cupy"), GPT(cfg, seed=4)
    cpu.load_state_dict(gpu.state_dict())  # CuPy arrays into a NumPy model
    np.testing.assert_array_equal(cpu.flat_params, gpu.flat_params.get())
    cpu.flat_params *= 2
    gpu.load_state_dict(cpu.state_dict())  # and back
    np.testing.assert_array_equal(gpu.flat_params.get(), cpu.flat_params)
    opt_gpu, opt_cpu = optim.AdamW(gpu.parameters()), optim.AdamW(cpu.parameters())
    opt_gpu.exp_avg[...] = 1.5
    opt_cpu.load_state_dict(opt_gpu.state_dict())
    assert (opt_cpu.exp_avg == 1.5).all()


def test_tf32_switch(cp):
    backend.set_tf32(True)
    try:
        assert backend.tf32_enabled()
    finally:
        backend.set_tf32(False)
    assert not backend.tf32_enabled()
