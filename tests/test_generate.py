"""Sampling with a key/value cache must give the very tokens of the no-cache path."""
import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig
from nanogpt_np import generate as gen
from nanogpt_np.layers import linear
from tests.helpers import DTYPES

CASES = [  # (config, B, prompt length, new tokens)
    (GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16), 2, 3, 10),
    (GPTConfig(block_size=8, vocab_size=23, n_layer=1, n_head=1, n_embd=8), 1, 1, 7),  # one head, B=1, T0=1
    (GPTConfig(block_size=8, vocab_size=23, n_layer=2, n_head=2, n_embd=8), 3, 5, 12),  # crosses block_size
    (GPTConfig(block_size=6, vocab_size=29, n_layer=2, n_head=3, n_embd=12), 2, 9, 4),  # prompt > block_size
]


def prompt(cfg, B, T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg,B,T,n", CASES)
def test_cached_equals_uncached_greedy_and_seeded(cfg, B, T, n, dtype):
    model = GPT(cfg, dtype=dtype, seed=1)
    # a larger init spreads the logits so that sampling is not near-uniform
    model.flat_params *= 5
    idx = prompt(cfg, B, T)
    for kwargs in (dict(temperature=0), dict(temperature=1.0, seed=3), dict(temperature=0.7, top_k=4, seed=11)):
        cached = model.generate(idx, n, **kwargs)
        uncached = model.generate(idx, n, use_cache=False, **kwargs)
        assert cached.shape == (B, T + n) and cached.dtype == np.int64
        np.testing.assert_array_equal(cached, uncached, err_msg=str(kwargs))
        np.testing.assert_array_equal(cached[:, :T], idx)


def test_zero_new_tokens_returns_the_prompt():
    cfg = CASES[0][0]
    idx = prompt(cfg, 2, 4)
    np.testing.assert_array_equal(GPT(cfg).generate(idx, 0), idx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cached_hidden_states_match_a_full_forward(dtype):
    """Prefill, then one token at a time, then three at once (masked among themselves):
    every position's output equals the plain forward's to rounding."""
    cfg = GPTConfig(block_size=16, vocab_size=41, n_layer=2, n_head=4, n_embd=16)
    model = GPT(cfg, dtype=dtype, seed=2)
    idx = prompt(cfg, 2, 12)
    full = gen.hidden_states(model, idx)  # (B, T, C)
    logits = model.forward(idx)[0]
    np.testing.assert_allclose(full @ model.params["transformer.wte.weight"].T, logits, rtol=0,
                               atol=1e-12 if dtype == np.float64 else 1e-5)
    cache = gen.KVCache(np, cfg.n_layer, 2, cfg.n_head, 12, cfg.n_embd // cfg.n_head, model.dtype)
    parts = [gen.hidden_states(model, idx[:, :5], cache)]
    for t in range(5, 9):
        parts.append(gen.hidden_states(model, idx[:, t : t + 1], cache))
    parts.append(gen.hidden_states(model, idx[:, 9:12], cache))
    assert cache.length == 12
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=0, atol=tol)


def test_each_new_token_runs_one_position(monkeypatch):
    """After the prompt, every layer of a cached step sees T=1; without the cache, T grows."""
    cfg = CASES[0][0]
    model = GPT(cfg, dtype=np.float64, seed=0)
    seen = []
    real_forward = linear.forward

    def spy(x, weight, bias=None):
        seen.append(x.reshape(-1, x.shape[-1]).shape[0])  # positions (B * T) through the layer
        return real_forward(x, weight, bias)

    monkeypatch.setattr(linear, "forward", spy)
    B, T, n = 2, 5, 6
    model.generate(prompt(cfg, B, T), n, temperature=0)
    per_step = 4 * cfg.n_layer + 1  # c_attn, c_proj, c_fc, c_proj per block, then lm_head
    assert len(seen) == n * per_step
    prefill, steps = seen[:per_step], seen[per_step:]
    assert prefill[:-1] == [B * T] * (per_step - 1) and prefill[-1] == B  # lm_head: last position only
    assert steps == [B] * len(steps)
    seen.clear()
    model.generate(prompt(cfg, B, T), n, temperature=0, use_cache=False)
    assert max(seen) == B * (T + n - 1)


def test_the_cache_is_not_used_past_block_size():
    """Past block_size positions shift, so each token reruns the cropped window."""
    cfg = GPTConfig(block_size=4, vocab_size=13, n_layer=1, n_head=1, n_embd=4)
    model = GPT(cfg, dtype=np.float64, seed=0)
    idx = prompt(cfg, 1, 3)
    out = model.generate(idx, 6, temperature=0)
    for t in range(3, 9):
        context = out[:, max(0, t - 4) : t]
        assert out[0, t] == model.forward(context)[0][0, -1].argmax()


def test_cached_attention_refuses_an_overfull_cache():
    cfg = CASES[0][0]
    model = GPT(cfg)
    cache = gen.KVCache(np, cfg.n_layer, 1, cfg.n_head, 3, cfg.n_embd // cfg.n_head, model.dtype)
    gen.hidden_states(model, np.zeros((1, 3), dtype=np.int64), cache)
    with pytest.raises(ValueError, match="KV cache holds 3 positions"):
        gen.hidden_states(model, np.zeros((1, 1), dtype=np.int64), cache)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be None or a positive integer"),
    ],
)
def test_bad_sampling_arguments_are_named(kwargs, match):
    model = GPT(CASES[1][0])
    args = dict(max_new_tokens=2, temperature=1.0)
    args.update(kwargs)
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=match):
            model.generate(np.zeros((1, 1), dtype=np.int64), use_cache=use_cache, **args)
