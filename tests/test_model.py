import math

import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig
from nanogpt_np.model import LM_HEAD, WTE, parameter_shapes
from tests.helpers import DTYPES, assert_close, needs_torch

CONFIGS = [  # (config, B, T)
    (GPTConfig(block_size=64, vocab_size=101, n_layer=2, n_head=4, n_embd=32), 2, 17),  # odd T, odd V
    (GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=1, n_embd=8), 1, 1),  # T=1, one head, B=1
    (GPTConfig(block_size=8, vocab_size=257, n_layer=3, n_head=2, n_embd=12), 3, 8),  # T = block_size
    (GPTConfig(block_size=300, vocab_size=64, n_layer=1, n_head=3, n_embd=24), 1, 261),  # several attention tiles
]


def batch(cfg, B, T, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


def check_against_torch(cfg, B, T, dtype):
    torch = needs_torch()
    from tests.torch_gpt import torch_gpt_like, torch_grads
    model = GPT(cfg, dtype=dtype, seed=1)
    idx, targets = batch(cfg, B, T)
    ref = torch_gpt_like(model, torch.float64 if dtype == np.float64 else torch.float32)
    logits_t, loss_t = ref(torch.from_numpy(idx), torch.from_numpy(targets))
    loss_t.backward()

    model.zero_grad()
    logits, loss = model.forward(idx, targets)
    logits = logits.copy()  # backward reuses the logits buffer for dlogits
    grads = model.backward()

    assert logits.dtype == dtype and isinstance(loss, float)
    assert_close(logits, logits_t.detach().numpy(), dtype, "logits")
    assert_close(loss, loss_t.item(), dtype, "loss")
    expected = torch_grads(ref)
    assert set(grads) == set(expected) == set(model.parameters())
    for name, g in expected.items():
        assert grads[name].dtype == dtype
        assert_close(grads[name], g, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg,B,T", CONFIGS)
def test_model_matches_torch(cfg, B, T, dtype):
    check_against_torch(cfg, B, T, dtype)


@pytest.mark.slow
def test_gpt2_124m_shape_matches_torch():
    check_against_torch(GPTConfig(), 1, 8, np.float64)


def test_model_finite_differences():
    """Directional derivative of the loss w.r.t. all parameters at once."""
    cfg, B, T = CONFIGS[0]
    model = GPT(cfg, dtype=np.float64, seed=3)
    idx, targets = batch(cfg, B, T)
    model.zero_grad()
    model.forward(idx, targets)
    g = model.backward()
    flat_grad = np.concatenate([g[n].ravel() for n, _ in parameter_shapes(cfg)])
    assert np.array_equal(flat_grad, model.flat_grads)  # grads are views of one buffer
    theta = model.flat_params.copy()
    rng = np.random.default_rng(0)
    eps = 1e-5
    for _ in range(3):
        u = rng.standard_normal(theta.shape)
        u /= np.linalg.norm(u)
        model.flat_params[...] = theta + eps * u
        plus = model.forward(idx, targets)[1]
        model.flat_params[...] = theta - eps * u
        minus = model.forward(idx, targets)[1]
        numeric = (plus - minus) / (2 * eps)
        analytic = float(flat_grad @ u)
        assert abs(numeric - analytic) <= 1e-6 * max(abs(numeric), 1e-8), (numeric, analytic)
    model.flat_params[...] = theta


def test_gradient_accumulation_adds_and_zero_grad_clears():
    cfg, B, T = CONFIGS[0]
    model = GPT(cfg, dtype=np.float64, seed=0)
    (idx1, t1), (idx2, t2) = batch(cfg, B, T, 1), batch(cfg, B, T, 2)
    single = {}
    for key, (i, t) in {"a": (idx1, t1), "b": (idx2, t2)}.items():
        model.zero_grad()
        model.forward(i, t)
        single[key] = {n: g.copy() for n, g in model.backward().items()}
    model.zero_grad()
    model.forward(idx1, t1)
    model.backward()
    model.forward(idx2, t2)
    both = model.backward()
    for name in both:
        np.testing.assert_allclose(both[name], single["a"][name] + single["b"][name], rtol=1e-12, atol=1e-15)
    model.zero_grad()
    assert all(not g.any() for g in model.grads.values())


@pytest.mark.parametrize("accumulate", [False, True])
def test_backward_reports_final_gradient_suffixes(accumulate):
    """grads_final(offset) promises flat_grads[offset:] will not change again in this
    backward; the overlapped allreduce sends that part at once. Snapshot it at each
    report and compare with the end of backward (also when adding to earlier grads)."""
    cfg, B, T = CONFIGS[2]  # 3 blocks
    model = GPT(cfg, dtype=np.float64, seed=0)
    model.zero_grad()
    if accumulate:  # a first micro-step, so this backward adds instead of writing
        model.forward(*batch(cfg, B, T, 1))
        model.backward()
    model.forward(*batch(cfg, B, T, 2))
    reports = []
    model.backward(grads_final=lambda offset: reports.append((offset, model.flat_grads[offset:].copy())))
    offsets = [offset for offset, _ in reports]
    names = [name for name, _ in parameter_shapes(cfg)]
    sizes = [math.prod(shape) for _, shape in parameter_shapes(cfg)]
    start = dict(zip(names, np.cumsum([0] + sizes[:-1]).tolist()))
    # ln_f after the head, each block's first parameter after the block, then everything
    assert offsets == [start["transformer.ln_f.weight"]] + [
        start[f"transformer.h.{i}.ln_1.weight"] for i in reversed(range(cfg.n_layer))] + [0]
    for offset, snapshot in reports:
        np.testing.assert_array_equal(snapshot, model.flat_grads[offset:])
        assert snapshot.any()


def test_state_dict_names_layout_and_tying():
    cfg = GPTConfig(block_size=64, vocab_size=101, n_layer=2, n_head=4, n_embd=32)
    model = GPT(cfg, dtype=np.float64, seed=0)
    sd = model.state_dict()
    assert sd[LM_HEAD] is sd[WTE]
    assert sd["transformer.h.1.attn.c_attn.weight"].shape == (96, 32)  # (out, in)
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (32, 128)
    assert sd["transformer.wpe.weight"].shape == (64, 32)
    params = model.parameters()
    assert LM_HEAD not in params and set(sd) == set(params) | {LM_HEAD}
    assert sum(p.size for p in params.values()) == model.num_parameters()


def test_load_state_dict_copies_values():
    cfg = CONFIGS[0][0]
    a, b = GPT(cfg, dtype=np.float64, seed=0), GPT(cfg, dtype=np.float32, seed=1)
    b.load_state_dict(a.state_dict())
    for name, p in a.parameters().items():
        np.testing.assert_array_equal(b.params[name], p.astype(np.float32))
        assert not np.shares_memory(b.params[name], p)
    idx, targets = batch(cfg, 2, 5)
    assert abs(a.forward(idx, targets)[1] - b.forward(idx, targets)[1]) < 1e-5


def test_load_state_dict_names_every_problem():
    cfg = CONFIGS[0][0]
    model = GPT(cfg, dtype=np.float64)
    sd = {n: p.copy() for n, p in model.state_dict().items()}
    del sd["transformer.h.0.ln_1.bias"]
    sd["transformer.h.7.attn.bias"] = np.zeros(3)
    sd["transformer.wpe.weight"] = np.zeros((65, 32))
    with pytest.raises(ValueError) as e:
        model.load_state_dict(sd)
    msg = str(e.value)
    assert "missing keys: transformer.h.0.ln_1.bias" in msg
    assert "unexpected keys: transformer.h.7.attn.bias" in msg
    assert "transformer.wpe.weight: shape (65, 32)" in msg


def test_load_state_dict_refuses_untied_lm_head():
    model = GPT(CONFIGS[0][0], dtype=np.float64)
    sd = {n: p.copy() for n, p in model.state_dict().items()}
    sd[LM_HEAD] += 1
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        model.load_state_dict(sd)
    del sd[LM_HEAD]  # a tied checkpoint may leave it out
    model.load_state_dict(sd)


def test_init_follows_build_nanogpt():
    cfg = GPTConfig(block_size=128, vocab_size=500, n_layer=4, n_head=4, n_embd=64)
    p = GPT(cfg, dtype=np.float64, seed=0).parameters()
    assert abs(p[WTE].std() - 0.02) < 0.001 and abs(p["transformer.wpe.weight"].std() - 0.02) < 0.001
    assert abs(p["transformer.h.2.mlp.c_fc.weight"].std() - 0.02) < 0.001
    for proj in ("attn.c_proj.weight", "mlp.c_proj.weight"):
        assert abs(p[f"transformer.h.3.{proj}"].std() - 0.02 / math.sqrt(8)) < 0.0005
    assert not p["transformer.h.0.attn.c_attn.bias"].any()
    assert (p["transformer.h.1.ln_2.weight"] == 1).all() and not p["transformer.ln_f.bias"].any()


def test_seed_makes_init_reproducible_across_dtypes():
    cfg = CONFIGS[0][0]
    a, b = GPT(cfg, dtype=np.float64, seed=5), GPT(cfg, dtype=np.float64, seed=5)
    c, d = GPT(cfg, dtype=np.float32, seed=5), GPT(cfg, dtype=np.float64, seed=6)
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
    np.testing.assert_array_equal(c.flat_params, a.flat_params.astype(np.float32))
    assert not np.array_equal(a.flat_params, d.flat_params)


def test_inference_forward_has_no_loss_and_keeps_nothing():
    cfg, B, T = CONFIGS[0]
    model = GPT(cfg)
    idx, _ = batch(cfg, B, T)
    logits, loss = model.forward(idx)
    assert loss is None and logits.shape == (B, T, cfg.vocab_size) and logits.dtype == np.float32
    with pytest.raises(ValueError, match="needs a preceding forward"):
        model.backward()


def test_default_dtype_and_config_are_gpt2_124m():
    cfg = GPTConfig()
    assert (cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (1024, 50257, 12, 12, 768)
    small = GPT(CONFIGS[1][0])
    assert small.dtype == np.float32 and small.flat_params.dtype == np.float32


@pytest.mark.slow
def test_gpt2_124m_parameter_count():
    model = GPT(GPTConfig())
    assert model.num_parameters() == 124_439_808  # GPT-2 small, lm_head tied


# ---- bad input ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return GPT(CONFIGS[0][0], dtype=np.float64)


@pytest.mark.parametrize(
    "idx,match",
    [
        (np.array([[1, 2, 101]]), r"token id 101, outside \[0, 101\)"),
        (np.array([[1, -1, 3]]), r"token id -1, outside \[0, 101\)"),
        (np.zeros((1, 65), dtype=np.int64), "T=65 exceeds block_size=64"),
        (np.array([1, 2, 3]), "must be a 2-D integer array"),
        (np.zeros((1, 2, 3), dtype=np.int64), "must be a 2-D integer array"),
        (np.array([[1.0, 2.0]]), "must hold integer token ids; got dtype float64"),
        (np.zeros((1, 0), dtype=np.int64), "is empty"),
    ],
)
def test_bad_idx_is_named(small, idx, match):
    with pytest.raises(ValueError, match=match):
        small.forward(idx)


def test_bad_targets_are_named(small):
    idx = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"targets holds token id 500"):
        small.forward(idx, np.array([[1, 2, 500]]))
    with pytest.raises(ValueError, match="targets shape"):
        small.forward(idx, np.array([[1, 2]]))


def test_backward_needs_a_forward_with_targets(small):
    idx = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="needs a preceding forward"):
        small.backward()
    small.forward(idx, idx)
    small.backward()
    with pytest.raises(ValueError, match="needs a preceding forward"):
        small.backward()  # each forward allows one backward


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be a positive integer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="float32 or float64"):
        GPT(CONFIGS[1][0], dtype=np.int32)


# ---- sampling -----------------------------------------------------------------------


def test_generate_greedy_follows_argmax_and_crops_context():
    cfg = GPTConfig(block_size=8, vocab_size=23, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg, dtype=np.float64, seed=0)
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    out = model.generate(idx, 10, temperature=0)
    assert out.shape == (2, 13)
    np.testing.assert_array_equal(out[:, :3], idx)
    for t in range(3, 13):  # each token is the argmax given the (cropped) context before it
        context = out[:, max(0, t - 8) : t]
        np.testing.assert_array_equal(out[:, t], model.forward(context)[0][:, -1].argmax(-1))


def test_generate_seed_and_top_k():
    cfg = GPTConfig(block_size=8, vocab_size=23, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg, dtype=np.float64, seed=0)
    idx = np.zeros((3, 1), dtype=np.int64)
    a = model.generate(idx, 6, temperature=1.0, top_k=5, seed=1)
    b = model.generate(idx, 6, temperature=1.0, top_k=5, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, model.generate(idx, 6, temperature=1.0, top_k=5, seed=2))
    # top_k=1 is greedy whatever the seed
    np.testing.assert_array_equal(model.generate(idx, 4, top_k=1, seed=3), model.generate(idx, 4, temperature=0))


def test_sample_next_draws_from_the_softmax():
    from nanogpt_np.model import sample_next

    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.2, 1e-9]] * 20000))
    counts = np.bincount(sample_next(logits, 1.0, None, rng), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2, 0.0], atol=0.015)
    counts = np.bincount(sample_next(logits, 1.0, 2, rng), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.625, 0.375, 0.0, 0.0], atol=0.015)


# ---- speed machinery: reused buffers and threads --------------------------------------


def test_training_forward_reuses_the_logits_buffer():
    cfg, B, T = CONFIGS[0]
    model = GPT(cfg)
    idx, targets = batch(cfg, B, T)
    first, _ = model.forward(idx, targets)
    second, _ = model.forward(idx, targets)
    assert np.shares_memory(first, second)  # one buffer, allocated once
    inference, _ = model.forward(idx)
    assert not np.shares_memory(inference, second)  # a forward without targets gets its own
    np.testing.assert_array_equal(inference, second)
    other_shape, _ = model.forward(idx[:1], targets[:1])
    assert other_shape.shape == (1, T, cfg.vocab_size)


def test_backward_writes_fresh_grads_and_adds_otherwise():
    """After zero_grad the layers write their gradients straight into model.grads;
    without it they add, so both paths must give the same sums."""
    cfg, B, T = CONFIGS[0]
    model = GPT(cfg, dtype=np.float64, seed=0)
    idx, targets = batch(cfg, B, T)
    model.zero_grad()
    model.forward(idx, targets)
    once = {n: g.copy() for n, g in model.backward().items()}
    model.forward(idx, targets)
    twice = model.backward()  # no zero_grad: this one adds
    for name, g in twice.items():
        np.testing.assert_allclose(g, 2 * once[name], rtol=1e-12, atol=1e-15)


def _step_grads(cfg, B, T, n_threads, dtype=np.float64):
    from nanogpt_np import cpu

    before = cpu._num_threads
    cpu.set_num_threads(n_threads)
    try:
        model = GPT(cfg, dtype=dtype, seed=2)
        idx, targets = batch(cfg, B, T, seed=4)
        model.zero_grad()
        logits, loss = model.forward(idx, targets)
        logits = logits.copy()
        model.backward()
        return loss, logits, model.flat_grads.copy()
    finally:
        cpu._num_threads = before


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_change_rounding_at_most(dtype, monkeypatch):
    from nanogpt_np import cpu

    monkeypatch.setattr(cpu, "MIN_SPLIT_FLOPS", 0)  # thread even this small model's matmuls
    cfg, B, T = CONFIGS[3]  # several attention tiles
    loss1, logits1, grads1 = _step_grads(cfg, B, T, 1, dtype)
    loss2, logits2, grads2 = _step_grads(cfg, B, T, 2, dtype)
    assert_close(loss2, loss1, dtype, "loss")
    assert_close(logits2, logits1, dtype, "logits")
    assert_close(grads2, grads1, dtype, "grads")
    # and with a fixed thread count a step is reproducible bit for bit
    loss3, logits3, grads3 = _step_grads(cfg, B, T, 2, dtype)
    assert loss3 == loss2 and np.array_equal(logits3, logits2) and np.array_equal(grads3, grads2)


@pytest.mark.parametrize("cfg,B,T", CONFIGS[:3])
def test_recompute_gives_bit_identical_gradients(cfg, B, T):
    """--recompute: forward keeps neither LayerNorm output nor the GELU output; backward
    rebuilds them with the same operations, so every gradient has the same bits."""
    idx, targets = batch(cfg, B, T)
    runs = []
    for recompute in (False, True):
        model = GPT(cfg, dtype=np.float64, seed=1)
        model.recompute = recompute
        model.zero_grad()
        _, loss = model.forward(idx, targets)
        if recompute:
            block = model._caches[1][0]
            assert block[1][0] is None and block[5][0] is None and block[7][0] is None  # dropped
        model.backward()
        runs.append((loss, model.flat_grads.copy()))
    assert runs[0][0] == runs[1][0]
    assert np.array_equal(runs[0][1], runs[1][1])


@pytest.mark.slow
def test_gpt2_350m_shape_matches_torch_in_float32():
    """The 350M preset's shape (24 layers, 16 heads, 1024 channels): every gradient
    against PyTorch in float32, at a short T (the shape is what is being checked)."""
    from nanogpt_np.train import PRESETS

    p = PRESETS["350M"]
    check_against_torch(GPTConfig(vocab_size=50304, n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"]),
                        1, 8, np.float32)


@pytest.mark.slow
def test_the_350m_preset_trains_a_few_steps(tmp_path):
    from nanogpt_np.train import Trainer, parse_args
    from tests.helpers import write_random_shards

    data = write_random_shards(tmp_path, 1, 2000, 41, "r_val_000000.npy", 200)
    cfg = parse_args(["--preset", "350M", "--block-size", "16", "--batch-size", "1", "--total-batch-size", "32",
                      "--max-steps", "3", "--warmup-steps", "1", "--val-every", "0", "--sample-every", "0",
                      "--ckpt-every", "0", "--hellaswag-every", "0", "--peak-tflops", "1", "--data-dir", str(data),
                      "--log-dir", str(tmp_path / "log")])
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    assert 350e6 < trainer.model.num_parameters() < 360e6 and trainer.accum == 2
    before = trainer.model.flat_params.copy()
    history = trainer.run()
    assert len(history["train"]) == 3 and all(np.isfinite(list(history["train"].values())))
    assert not history["skipped"] and trainer.optimizer.step_count == 3
    assert np.abs(trainer.model.flat_params - before).max() > 1e-5  # AdamW moved the weights
