"""Inference without backward: the forward pass with a key/value cache, and sampling.

Key: B batch, T time, C channels, NH heads, hs head size, V vocab, L layers,
S the cache's capacity (at most block_size).

Training runs every position of a sequence at once. Sampling adds one token at a
time, and without a cache each new token would run the whole context again,
O(T) positions per token. But in a causal model nothing about position j changes
once it exists: its keys and values in every layer depend only on tokens 0..j.
So we keep them, one (B, NH, S, hs) array per layer for k and for v, and a new
token only needs its own query against the stored keys. Per layer, for the query
at position t (written into the cache first, so it attends to itself):

    s_j = q_t . k_j / sqrt(hs)               j = 0..t     (no mask: no key is in its future)
    p_j = exp(s_j - max_j s_j) / sum_j exp(s_j - max_j s_j)
    y_t = sum_j p_j v_j                      (hs,) per head

which is row t of the full causal attention in layers/attention.py, computed
alone. Everything else in a block (LayerNorm, linear layers, GELU, residuals)
acts on each position independently, so it runs on the one new position.

The window. Positions only go up to block_size - 1 (wpe has block_size rows).
Once the context is longer, the no-cache path crops it to its last block_size
tokens, and every kept token moves to a new position: the stored keys and values
no longer hold. We do exactly what the no-cache path does from then on, a full
forward of the cropped window per token, so both paths give the same tokens.

Nothing here keeps activations for backward: the layer caches are dropped as
soon as each layer returns.
"""
import math

import numpy as np

from .backend import array_module, to_host
from .layers import attention

WTE = "transformer.wte.weight"  # the same names as model.py (not imported: model.py imports us)
WPE = "transformer.wpe.weight"


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    k, v: (L, B, NH, S, hs); positions [0, length) are filled.
    """

    def __init__(self, xp, n_layer, B, n_head, capacity, head_size, dtype):
        shape = (n_layer, B, n_head, capacity, head_size)
        self.k = xp.empty(shape, dtype=dtype)
        self.v = xp.empty(shape, dtype=dtype)
        self.length = 0

    @property
    def capacity(self):
        return self.k.shape[3]


def cached_attention(qkv, n_head, cache, layer, full_attention=attention.forward):
    """Attention for T new positions that follow the cache's `length` stored ones.

    qkv: (B, T, 3C), c_attn's output for the new positions  ->  y: (B, T, C)
    Writes the new keys and values into the cache (the caller advances length).
    full_attention is the layer that runs the prompt (the model's, GPU kernel or formula).
    """
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    t0, t1 = cache.length, cache.length + T
    if t1 > cache.capacity:
        raise ValueError(f"KV cache holds {cache.capacity} positions; {t1} were asked for")
    qkv5 = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (3, B, NH, T, hs)
    cache.k[layer, :, :, t0:t1] = qkv5[1]
    cache.v[layer, :, :, t0:t1] = qkv5[2]
    if t0 == 0:
        # The prompt: plain causal attention over it, the very computation of the
        # training forward, so the first sampled token matches it bit for bit.
        y, _ = full_attention(qkv, n_head)
        return y
    q = qkv5[0] * (1.0 / math.sqrt(hs))  # (B, NH, T, hs), scaled once as in attention.py
    k, v = cache.k[layer, :, :, :t1], cache.v[layer, :, :, :t1]  # (B, NH, t1, hs)
    s = q @ k.swapaxes(-1, -2)  # (B, NH, T, t1)
    if T > 1:  # several new queries: each sees only the keys up to its own position
        future = xp.triu(xp.full((T, T), -xp.inf, dtype=s.dtype), 1)  # (T, T)
        s[..., t0:t1] += future
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)  # unnormalised p
    y = s @ v  # (B, NH, T, hs)
    y /= s.sum(axis=-1, keepdims=True)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C), heads side by side


def hidden_states(model, idx, cache=None):
    """The final LayerNorm's output, the input of lm_head: (B, T) ints -> (B, T, C).

    Without a cache the positions are 0..T-1 (a plain forward). With one, the T
    tokens take positions length..length+T-1 and their keys and values are added.
    idx must already be valid token ids on the model's backend.
    """
    p = model.params
    start = 0 if cache is None else cache.length
    T = idx.shape[1]
    if start + T > model.config.block_size:
        raise ValueError(f"positions up to {start + T} exceed block_size={model.config.block_size}")
    x = p[WTE][idx]  # (B, T, C), as layers/embedding.py
    x += p[WPE][start : start + T]
    for i in range(model.config.n_layer):
        attend = None
        if cache is not None:  # this layer's attention, through the cache
            def attend(qkv, i=i):
                return cached_attention(qkv, model.config.n_head, cache, i, model.ops.attention.forward)
        x, _ = model._block_forward(i, x, attend)  # the training forward's block, caches dropped
    x, _ = model.ops.layernorm.forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    if cache is not None:
        cache.length += T
    return x


def last_logits(model, h):
    """lm_head on the last position only: h: (B, T, C) -> (B, V) on the host."""
    logits, _ = model.ops.linear.forward(h[:, -1], model.params[WTE], None)  # (B, V)
    return to_host(logits)


def check_sampling_args(max_new_tokens, temperature, top_k):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive integer, got {top_k!r}")


def generate_cached(model, idx, max_new_tokens, temperature, top_k, rng, sample_next):
    """idx: (B, T0) int64 on the host -> (B, T0 + max_new_tokens), one position per token.

    sample_next(logits (B, V), temperature, top_k, rng) -> (B,) picks each token;
    the no-cache path uses the same function with the same rng, so both draw alike.
    """
    xp, cfg = model.xp, model.config
    B, T0 = idx.shape
    out = np.empty((B, T0 + max_new_tokens), dtype=np.int64)
    out[:, :T0] = idx
    cache = None
    for n in range(max_new_tokens):
        T = T0 + n  # tokens so far
        if T > cfg.block_size:
            # the window slides: every kept token moves position, so run it whole
            cache = None
            h = hidden_states(model, xp.asarray(out[:, T - cfg.block_size : T]))
        elif cache is None:
            # the prompt fills the cache; it must hold every position we will reach
            capacity = min(cfg.block_size, T0 + max_new_tokens - 1)
            hs = cfg.n_embd // cfg.n_head
            cache = KVCache(xp, cfg.n_layer, B, cfg.n_head, capacity, hs, model.dtype)
            h = hidden_states(model, xp.asarray(out[:, :T]), cache)
        else:
            h = hidden_states(model, xp.asarray(out[:, T - 1 : T]), cache)  # (B, 1, C)
        out[:, T] = sample_next(last_logits(model, h), temperature, top_k, rng)
    return out
