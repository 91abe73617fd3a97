import math

import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig
from nanogpt_np.optim import AdamW, clip_grad_norm, contiguous_base, cosine_lr
from tests.helpers import needs_torch


def torch_adamw(named_tensors, lr, wd):
    torch = needs_torch()
    decay = [t for t in named_tensors.values() if t.dim() >= 2]
    no_decay = [t for t in named_tensors.values() if t.dim() < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


@pytest.mark.parametrize("flat", [True, False])
def test_adamw_matches_torch(flat):
    torch = needs_torch()
    rng = np.random.default_rng(0)
    shapes = {"w": (4, 3), "b": (3,), "e": (5, 2)}
    if flat:  # views of one buffer, as the model holds them
        buffer = rng.standard_normal(sum(math.prod(s) for s in shapes.values()))
        params, offset = {}, 0
        for n, s in shapes.items():
            params[n] = buffer[offset : offset + math.prod(s)].reshape(s)
            offset += math.prod(s)
        assert contiguous_base(params.values()) is not None
    else:
        params = {n: rng.standard_normal(s) for n, s in shapes.items()}
        assert contiguous_base(params.values()) is None
    tparams = {n: torch.tensor(p.copy(), requires_grad=True) for n, p in params.items()}
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    topt = torch_adamw(tparams, 1e-2, 0.1)
    for step in range(5):
        grads = {n: rng.standard_normal(s) for n, s in shapes.items()}
        lr = 1e-2 * (step + 1)
        opt.step(grads, lr=lr)
        for g in topt.param_groups:
            g["lr"] = lr
        for n, t in tparams.items():
            t.grad = torch.from_numpy(grads[n])
        topt.step()
    for n in shapes:
        np.testing.assert_allclose(params[n], tparams[n].detach().numpy(), rtol=1e-13, atol=1e-15)


def test_clip_grad_norm_matches_torch():
    torch = needs_torch()
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    tgrads = [torch.tensor(g.copy()) for g in grads.values()]
    tparams = [torch.zeros_like(g, requires_grad=True) for g in tgrads]
    for p, g in zip(tparams, tgrads):
        p.grad = g
    expected = torch.nn.utils.clip_grad_norm_(tparams, 1.0).item()
    norm = clip_grad_norm(grads, 1.0)
    assert abs(norm - expected) < 1e-12
    for g, p in zip(grads.values(), tparams):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-14)
    # under the limit: unchanged
    before = {n: g.copy() for n, g in grads.items()}
    assert clip_grad_norm(grads, 10.0) < 10.0
    for n in grads:
        np.testing.assert_array_equal(grads[n], before[n])


def build_nanogpt_get_lr(it, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073):
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return min_lr
    decay_ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (max_lr - min_lr)


@pytest.mark.parametrize("step", [0, 1, 714, 715, 716, 5000, 19072, 19073, 19074, 30000])
def test_cosine_lr_is_build_nanogpts(step):
    assert cosine_lr(step) == pytest.approx(build_nanogpt_get_lr(step), rel=1e-15)
    assert cosine_lr(step, 1.0, 0.1, 10, 100) == pytest.approx(
        build_nanogpt_get_lr(step, 1.0, 0.1, 10, 100), rel=1e-15
    )


def test_ten_training_steps_match_pytorch():
    """Same init and batches, grad accumulation 2, clip 1.0, cosine lr, AdamW with
    two decay groups: the float64 losses agree with PyTorch step by step."""
    torch = needs_torch()
    from tests.torch_gpt import torch_gpt_like
    cfg = GPTConfig(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg, dtype=np.float64, seed=0)
    ref = torch_gpt_like(model, torch.float64)
    named = {n: p for n, p in ref.named_parameters()}
    topt = torch_adamw(named, 3e-3, 0.1)
    opt = AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rng = np.random.default_rng(0)
    accum, B, T = 2, 2, 12
    for step in range(10):
        lr = cosine_lr(step, max_lr=3e-3, min_lr=3e-4, warmup_steps=3, max_steps=10)
        model.zero_grad()
        topt.zero_grad()
        loss_np = loss_t = 0.0
        for _ in range(accum):
            idx = rng.integers(0, cfg.vocab_size, (B, T))
            tgt = rng.integers(0, cfg.vocab_size, (B, T))
            _, loss = model.forward(idx, tgt)
            model.backward()
            loss_np += loss / accum
            _, tl = ref(torch.from_numpy(idx), torch.from_numpy(tgt))
            (tl / accum).backward()
            loss_t += tl.item() / accum
        # the model's backward gives the mean loss's gradient; accumulation scales it
        model.flat_grads /= accum
        norm = clip_grad_norm(model.grads, 1.0)
        tnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0).item()
        opt.step(model.grads, lr=lr)
        for g in topt.param_groups:
            g["lr"] = lr
        topt.step()
        assert abs(loss_np - loss_t) <= 1e-6 * abs(loss_t), (step, loss_np, loss_t)
        assert abs(norm - tnorm) <= 1e-6 * tnorm
    for n, p in model.parameters().items():
        np.testing.assert_allclose(p, named[n].detach().numpy(), rtol=1e-6, atol=1e-9)


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(0)
    a = {"w": rng.standard_normal((3, 3)), "b": rng.standard_normal(3)}
    b = {n: p.copy() for n, p in a.items()}
    opt_a = AdamW(a, lr=1e-2)
    grads = [{n: rng.standard_normal(p.shape) for n, p in a.items()} for _ in range(4)]
    for g in grads[:2]:
        opt_a.step(g)
    state = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in opt_a.state_dict().items()}
    for n in b:
        b[n][...] = a[n]
    opt_b = AdamW(b, lr=1e-2)
    opt_b.load_state_dict(state)
    for g in grads[2:]:
        opt_a.step(g)
        opt_b.step(g)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])
    with pytest.raises(ValueError, match="another model config"):
        AdamW({"w": np.zeros(2)}).load_state_dict(state)


def test_step_names_a_missing_gradient():
    opt = AdamW({"w": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="no gradient for w"):
        opt.step({})
