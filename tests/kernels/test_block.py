"""kernels/block.py, the GPU's schedule of the transformer step, against the
readable block of model.py: in float64 to rounding (so no index, transpose or
gradient-accumulation slip can hide), and in bf16 mixed precision against float32
within bf16's accuracy. All on the CPU: kernels in the emulator, cuBLAS in NumPy,
and for bf16 a stand-in CuPy (the GPU-only dtype needs backend="cupy")."""
import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig, kernels, layers, optim
from nanogpt_np.backend import bfloat16, to_host
from tests.helpers import assert_close, rel_err

CFG = GPTConfig(block_size=40, vocab_size=67, n_layer=2, n_head=2, n_embd=128)  # head size 64


def _batches(n, B=2, T=33, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, CFG.vocab_size, (B, T)), rng.integers(0, CFG.vocab_size, (B, T))) for _ in range(n)]


def _grads_after(model, batches):
    """zero_grad, then forward + backward over each batch (gradient accumulation)."""
    model.zero_grad()
    losses = []
    for idx, targets in batches:
        _, loss = model.forward(idx, targets)
        model.backward()
        losses.append(loss)
    return losses, to_host(model.flat_grads).copy()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_schedule_matches_the_readable_block_with_accumulation(emulated, dtype):
    batches = _batches(2)
    fused_model, readable = GPT(CFG, dtype=dtype, seed=3), GPT(CFG, dtype=dtype, seed=3)
    fused_model.ops = kernels  # the GPU schedule (kernels/block.py) on NumPy arrays
    assert fused_model.fused is kernels.block and readable.fused is None
    losses, grads = _grads_after(fused_model, batches)
    losses_ref, grads_ref = _grads_after(readable, batches)
    assert_close(losses, losses_ref, dtype, "losses")
    assert_close(grads, grads_ref, dtype, "accumulated grads", factor=10)
    # a forward without targets: fresh logits in the parameter dtype, as the readable head
    logits, loss = fused_model.forward(batches[0][0])
    logits_ref, _ = readable.forward(batches[0][0])
    assert loss is None and logits.dtype == dtype
    assert_close(logits, logits_ref, dtype, "inference logits")


def test_fused_backward_reports_final_gradient_suffixes(emulated):
    """The GPU schedule keeps the promise the overlapped allreduce relies on:
    flat_grads[offset:] never changes after grads_final(offset)."""
    model = GPT(CFG, dtype=np.float64, seed=3)
    model.ops = kernels
    model.zero_grad()
    model.forward(*_batches(1)[0])
    reports = []
    model.backward(grads_final=lambda offset: reports.append((offset, model.flat_grads[offset:].copy())))
    offsets = [offset for offset, _ in reports]
    assert offsets == sorted(offsets, reverse=True) and offsets[-1] == 0 and len(offsets) == CFG.n_layer + 2
    for offset, snapshot in reports:
        np.testing.assert_array_equal(snapshot, model.flat_grads[offset:])


def _cross_entropy_launches(monkeypatch):
    """The cross-entropy kernels launched from now on, by name (the runner still runs them)."""
    names, launch = [], kernels.cross_entropy._cu.launch

    def recording(name, *args, **kwargs):
        names.append(name.split("<")[0])
        return launch(name, *args, **kwargs)

    monkeypatch.setattr(kernels.cross_entropy._cu, "launch", recording)
    return names


def _head_both_ways(model, monkeypatch):
    """From zeroed gradients, forward + backward as evaluation-then-backward runs them
    (forward_losses, then backward: two kernels) and as the training step does
    (backward_follows=True: one kernel) -> [(logits, loss, flat grads, kernels launched)]."""
    launched = _cross_entropy_launches(monkeypatch)
    runs = []
    for follows in (False, True):
        model.zero_grad()
        del launched[:]
        logits, loss = model.forward_on_device(*_batches(1)[0], backward_follows=follows)
        logits = None if logits is None else to_host(logits).copy()  # backward overwrites them
        model.backward()
        runs.append((logits, to_host(loss).copy(), to_host(model.flat_grads).copy(), list(launched)))
    return runs


def _assert_one_kernel_same_bits(runs):
    (logits, loss, grads, launched), (no_logits, loss_one, grads_one, launched_one) = runs
    assert launched == ["cross_entropy_forward", "cross_entropy_backward"]
    assert launched_one == ["cross_entropy_forward_backward"]
    assert logits is not None and no_logits is None  # the training step's buffer holds dlogits: not handed out
    np.testing.assert_array_equal(loss_one, loss)
    np.testing.assert_array_equal(grads_one, grads)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_training_forward_fuses_the_cross_entropy_backward(emulated, monkeypatch, dtype):
    model = GPT(CFG, dtype=dtype, seed=3)
    model.ops = kernels
    _assert_one_kernel_same_bits(_head_both_ways(model, monkeypatch))
    with pytest.raises(ValueError, match="backward_follows=True needs targets"):
        model.forward_on_device(_batches(1)[0][0], backward_follows=True)


def test_bf16_training_forward_fuses_the_cross_entropy_backward(fake_gpu, monkeypatch):
    model = GPT(CFG, dtype="bf16", seed=3, backend="cupy")
    _assert_one_kernel_same_bits(_head_both_ways(model, monkeypatch))


@pytest.fixture
def bf16_pair(fake_gpu):
    gpu = GPT(CFG, dtype="bf16", seed=3, backend="cupy")
    cpu = GPT(CFG, dtype=np.float32, seed=3)
    return gpu, cpu


def test_bf16_model_layout(bf16_pair):
    gpu, cpu = bf16_pair
    assert gpu.mixed and gpu.dtype == np.float32 and gpu.compute_dtype == bfloat16()
    assert gpu.flat_params.dtype == np.float32 and gpu.flat_grads.dtype == np.float32
    assert gpu.compute_flat.dtype == bfloat16() and gpu.compute_flat.size == gpu.flat_params.size
    assert "bf16 (float32 parameters)" in repr(gpu)
    np.testing.assert_array_equal(to_host(gpu.flat_params), cpu.flat_params)  # same init on either backend
    opt = optim.AdamW(gpu.parameters())
    assert opt.exp_avg.dtype == np.float32  # AdamW moments stay float32


def test_bf16_loss_and_grads_track_float32(bf16_pair):
    gpu, cpu = bf16_pair
    batches = _batches(2)
    losses, grads = _grads_after(gpu, batches)
    losses_ref, grads_ref = _grads_after(cpu, batches)
    np.testing.assert_allclose(losses, losses_ref, rtol=2e-3)
    assert rel_err(grads, grads_ref) < 2e-2  # bf16 activations: ~2^-8 per rounding (0.8% seen)
    # the bf16 weight copies really are the rounded masters, refreshed at each forward
    np.testing.assert_array_equal(to_host(gpu.compute_flat).view(np.uint16),
                                  to_host(gpu.flat_params).astype(bfloat16()).view(np.uint16))
    gpu.flat_params *= 2
    gpu.forward(*batches[0])
    np.testing.assert_array_equal(to_host(gpu.compute_flat).astype(np.float32),
                                  to_host(gpu.flat_params).astype(bfloat16()).astype(np.float32))


def test_bf16_training_logits_and_inference_logits(bf16_pair):
    gpu, cpu = bf16_pair
    idx, targets = _batches(1)[0]
    logits, _ = gpu.forward(idx, targets)
    assert logits.dtype == bfloat16()  # the training buffer is bf16: half the bytes of float32
    infer, loss = gpu.forward(idx)
    assert loss is None and infer.dtype == np.float32  # inference hands out float32
    ref, _ = cpu.forward(idx)
    assert rel_err(to_host(infer), ref) < 2e-2
    assert rel_err(to_host(logits).astype(np.float32), ref) < 2e-2


def test_bf16_training_steps_track_float32(bf16_pair):
    gpu, cpu = bf16_pair
    runs = []
    for model in (gpu, cpu):
        opt = optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for idx, targets in _batches(6, seed=1):
            model.zero_grad()
            _, loss = model.forward(idx, targets)
            model.backward()
            optim.clip_grad_norm(model.grads, 1.0)
            opt.step(model.grads)
            losses.append(loss)
        runs.append(np.array(losses))
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-2)


def test_bf16_sampling_runs_on_the_float32_masters(bf16_pair):
    gpu, cpu = bf16_pair
    prompt = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(gpu.generate(prompt, 4, temperature=0), cpu.generate(prompt, 4, temperature=0))


def test_bf16_refused_on_numpy():
    with pytest.raises(ValueError, match="runs on the GPU only"):
        GPT(CFG, dtype="bf16")


def test_train_py_runs_bf16_by_default_on_the_gpu(fake_gpu, tmp_path):
    """scripts/train.py's loop with --backend cupy and no --dtype: bf16, float32
    masters, a checkpoint that a float32 CPU run can resume."""
    from nanogpt_np.checkpoint import load_checkpoint
    from nanogpt_np.data import write_shard
    from nanogpt_np.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        write_shard(tmp_path / f"r_{split}_000000.npy", rng.integers(0, 50257, 400))
    cfg = TrainConfig(n_layer=1, n_head=2, n_embd=128, block_size=16, batch_size=2, total_batch_size=64,
                      max_steps=2, warmup_steps=1, val_every=2, val_steps=1, sample_every=0, ckpt_every=2,
                      data_dir=str(tmp_path), log_dir=str(tmp_path / "log"), backend="cupy", peak_tflops=1.0,
                      hellaswag_every=0)
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    assert trainer.precision == "bf16" and trainer.model.mixed and trainer.accum == 2
    history = trainer.run()
    assert len(history["train"]) == 2 and all(np.isfinite(v) for v in history["train"].values())
    ckpt = load_checkpoint(str(tmp_path / "log" / "model_00002.npz"))
    assert ckpt["meta"]["dtype"] == "float32"  # the masters are what a checkpoint keeps


def test_zero_1_on_the_gpu_path_equals_zero_0(fake_gpu, tmp_path):
    """--zero 1 with --backend cupy (one rank, a fake GPU over NumPy): the sharded AdamW
    keeps its moments as CuPy arrays and its steps equal the fused AdamW's."""
    from nanogpt_np.data import write_shard
    from nanogpt_np.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        write_shard(tmp_path / f"r_{split}_000000.npy", rng.integers(0, 50257, 400))
    runs = {}
    for zero in (0, 1):
        cfg = TrainConfig(n_layer=1, n_head=2, n_embd=128, block_size=16, batch_size=2, total_batch_size=64,
                          max_steps=3, warmup_steps=1, val_every=0, sample_every=0, ckpt_every=3, zero=zero,
                          data_dir=str(tmp_path), log_dir=str(tmp_path / f"log{zero}"), backend="cupy",
                          dtype="float32", peak_tflops=1.0, hellaswag_every=0)
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        runs[zero] = (trainer.run()["train"], np.asarray(trainer.model.flat_params).copy(), trainer.optimizer)
    assert type(runs[1][2]).__name__ == "ShardedAdamW" and runs[1][2].exp_avg.size == runs[1][1].size
    np.testing.assert_allclose([runs[1][0][s] for s in range(3)], [runs[0][0][s] for s in range(3)], rtol=1e-6)
    # float32: a gradient near 0 may round to either sign, and AdamW's update is then
    # +-lr either way; the weights agree to a small fraction of the lr (6e-4)
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_schedule_recompute_is_bit_identical(emulated, dtype):
    """--recompute on the GPU schedule: the LayerNorm and GELU outputs rebuilt in
    backward by the same kernels, so losses and gradients have the same bits."""
    runs = []
    for recompute in (False, True):
        model = GPT(CFG, dtype=dtype, seed=3)
        model.ops = kernels
        model.recompute = recompute
        runs.append(_grads_after(model, _batches(2)))
        model.zero_grad()
        model.forward(*_batches(1)[0])
        a2, m2, hidden = (model._caches[1][0][k] for k in (1, 5, 7))
        assert (a2 is None and m2 is None and hidden is None) == recompute  # dropped only when asked
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
