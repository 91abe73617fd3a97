"""Shared checks for the gradient suite: PyTorch autograd and finite differences.

PyTorch is imported only by the comparisons with it, so a test that does not compare
with PyTorch runs on the base install (pip install -e .), and one that does skips there."""
import numpy as np
import pytest

# Relative tolerances: float64 should agree to rounding, float32 to a few ulps of
# the largest value after sums over a few hundred terms.
TOL = {np.float64: 1e-10, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


def rel_err(actual, expected):
    """max |actual - expected| relative to the largest |expected| (scale-aware)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    return float(np.abs(actual - expected).max(initial=0.0) / scale)


def assert_close(actual, expected, dtype, what="", factor=1.0):
    err = rel_err(actual, expected)
    tol = TOL[np.dtype(dtype).type] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def needs_torch():
    """PyTorch, or a clean skip where it is not installed (the test extra installs it)."""
    return pytest.importorskip("torch", reason="PyTorch is in the test extra: pip install -e '.[test]'")


def to_torch(a, requires_grad=False):
    torch = needs_torch()
    t = torch.from_numpy(np.ascontiguousarray(a))
    if requires_grad:
        t.requires_grad_(True)
    return t


def torch_dtype(dtype):
    torch = needs_torch()
    return torch.float64 if np.dtype(dtype) == np.float64 else torch.float32


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def directional_fd_check(loss_fn, inputs, grads, rng, n_dirs=3, eps=1e-6, tol=1e-6):
    """Central finite differences of a float64 scalar loss along random directions.

    loss_fn(*inputs) -> float.  For each input array with an analytic gradient g,
    the directional derivative <g, u> along a random unit u must match
    (loss(x + eps u) - loss(x - eps u)) / (2 eps).
    """
    for k, (x, g) in enumerate(zip(inputs, grads)):
        if g is None:
            continue
        for _ in range(n_dirs):
            u = rng.standard_normal(x.shape)
            u /= np.linalg.norm(u)
            plus = list(inputs)
            minus = list(inputs)
            plus[k] = x + eps * u
            minus[k] = x - eps * u
            numeric = (loss_fn(*plus) - loss_fn(*minus)) / (2 * eps)
            analytic = float(np.sum(g * u))
            denom = max(abs(numeric), abs(analytic), 1e-8)
            assert abs(numeric - analytic) / denom < tol, (
                f"input {k}: finite difference {numeric:.10e} vs backward {analytic:.10e}"
            )


def write_random_shards(directory, n_train, train_tokens, doc_every, val_name, val_tokens, seed=0):
    """Random GPT-2 token shards in `directory`: n_train train shards of train_tokens
    tokens, an <|endoftext|> every doc_every tokens (documents), and one val shard
    named val_name (.npy or .bin) of val_tokens tokens. Returns the directory."""
    from nanogpt_np.data import write_shard

    rng = np.random.default_rng(seed)
    for i in range(n_train):
        tokens = rng.integers(0, 50257, train_tokens)
        tokens[::doc_every] = 50256
        write_shard(directory / f"r_train_{i:06d}.npy", tokens)
    write_shard(directory / val_name, rng.integers(0, 50257, val_tokens))
    return directory


def assert_same_as_reference(fast, reference, what, tol=1e-12):
    """A layer's fast result equals its plain reference: the same tuple (or array),
    element by element, to float64 rounding relative to each array's scale."""
    fast = fast if isinstance(fast, tuple) else (fast,)
    reference = reference if isinstance(reference, tuple) else (reference,)
    assert len(fast) == len(reference), f"{what}: {len(fast)} results, the reference has {len(reference)}"
    for i, (a, b) in enumerate(zip(fast, reference)):
        if a is None or b is None:
            assert a is None and b is None, f"{what}[{i}]: one is None"
            continue
        err = rel_err(a, b)
        assert err <= tol, f"{what}[{i}]: relative error {err:.2e} > {tol:.0e}"


def loader_state(rank=0, base=0, world_size=1):
    """A DataLoader.state() as a checkpoint holds it, for checkpoints written by tests."""
    return {"split": "train", "B": 2, "T": 8, "rank": rank, "world_size": world_size, "shuffle": False,
            "seed": 0, "shards": ["x_train_000000.npy"], "epoch": 0, "shard_index": 0, "base": base, "tokens": 0}
