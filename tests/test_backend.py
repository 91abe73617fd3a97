import sys

import numpy as np
import pytest

from nanogpt_np import backend


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,V,C", [(1, 1, 1), (7, 3, 2), (1000, 50, 16), (5, 100, 3)])
def test_scatter_add_rows_equals_add_at(N, V, C, dtype):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, V, N)
    rows = rng.standard_normal((N, C)).astype(dtype)
    start = rng.standard_normal((V, C)).astype(dtype)
    expected = start.copy()
    np.add.at(expected, idx, rows)
    got = backend.scatter_add_rows(start.copy(), idx, rows)
    np.testing.assert_allclose(got, expected, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-6)


def test_resolve_dtype():
    assert backend.resolve_dtype("float32") == np.float32
    assert backend.resolve_dtype(np.float64) == np.float64
    with pytest.raises(ValueError, match="float32 or float64"):
        backend.resolve_dtype("float16")
    with pytest.raises(ValueError, match="not supported"):
        backend.resolve_dtype(np.int64)


def test_numpy_backend_and_unknown_name():
    assert backend.get_xp("numpy") is np
    assert backend.array_module(np.zeros(2)) is np
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backend.get_xp("tpu")


def test_missing_cupy_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    with pytest.raises(RuntimeError, match="pip install cupy-cuda12x"):
        backend.get_xp("cupy")


def test_host_round_trip():
    a = np.arange(6.0).reshape(2, 3)
    assert backend.to_host(a) is a
    b = backend.to_device(a, np, np.float32)
    assert b.dtype == np.float32 and np.array_equal(b, a)
