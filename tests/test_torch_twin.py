"""benchmarks/torch_twin.py's training curve: build-nanogpt's loop in PyTorch, from
nanogpt_np's weights, must take the very steps nanogpt_np takes (gpu_check's row
"ours vs build-nanogpt" compares the two on a GPU; here both run float32 on the CPU)."""
import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig, optim
from nanogpt_np.gpucheck.recipe import text_batches
from nanogpt_np.gpucheck.training_checks import markov_tokens

torch = pytest.importorskip("torch")
from benchmarks import torch_twin  # noqa: E402

CFG = GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32)


def batches(steps, B, T, seed=0):
    stream = markov_tokens(CFG.vocab_size, steps * B * T + 1, seed)  # a loss that can fall
    return text_batches(stream, B, T, steps)


def numpy_curve(model, data, lrs):
    """nanogpt_np's float32 step on the CPU: the reference."""
    opt = optim.AdamW(model.parameters(), lr=lrs[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    losses = []
    for (x, y), lr in zip(data, lrs):
        model.zero_grad()
        _, loss = model.forward(x, y)
        model.backward()
        optim.clip_grad_norm(model.grads, 1.0)
        opt.step(model.grads, lr=lr)
        losses.append(loss)
    return np.array(losses)


@pytest.mark.parametrize("clipped", [False, True])
def test_train_curve_takes_nanogpt_np_steps(clipped):
    """Same weights, batches and learning rates: the same losses, step after step. A
    large lr makes a wrong decay group, a missed lr or a clip that differs show at
    once; `clipped` scales the weights so that every gradient norm is above 1."""
    steps, B, T = 6, 4, 16
    model = GPT(CFG, dtype=np.float32, seed=3)
    if clipped:
        model.flat_params *= 4
    weights = {name: np.array(a) for name, a in model.state_dict().items()}
    lrs = [optim.cosine_lr(s, 1e-2, 1e-3, 2, steps) for s in range(steps)]
    data = batches(steps, B, T)
    torch_losses, seconds = torch_twin.train_curve(CFG, weights, data, lrs, "cpu", compile_model=False, bf16=False)
    ours = numpy_curve(model, data, lrs)
    assert len(torch_losses) == len(seconds) == steps and seconds == sorted(seconds)
    assert ours[-1] < ours[0] - 0.1  # the steps did something to compare
    np.testing.assert_allclose(torch_losses, ours, rtol=2e-5)


def test_train_curve_bf16_autocast_stays_near_float32():
    """The recipe's bf16 autocast (on the CPU here) moves the curve by bf16's rounding only."""
    steps, B, T = 4, 2, 16
    model = GPT(CFG, dtype=np.float32, seed=1)
    weights = {name: np.array(a) for name, a in model.state_dict().items()}
    lrs = [1e-2] * steps
    data = batches(steps, B, T, seed=1)
    full, _ = torch_twin.train_curve(CFG, weights, data, lrs, "cpu", compile_model=False, bf16=False)
    low, _ = torch_twin.train_curve(CFG, weights, data, lrs, "cpu", compile_model=False, bf16=True)
    diff = np.abs(np.array(low) - full) / np.abs(full)
    assert 0 < diff.max() < 1e-2, diff
