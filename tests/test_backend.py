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


def test_layer_ops_picks_the_formulas_for_numpy(monkeypatch):
    from nanogpt_np import kernels, layers

    assert backend.layer_ops(np) is layers

    class FakeCupy:  # any module other than numpy gets the kernels
        pass

    assert backend.layer_ops(FakeCupy) is kernels
    monkeypatch.setenv("NANOGPT_KERNELS", "0")
    assert backend.layer_ops(FakeCupy) is layers
    for name in layers.__all__:  # a new layer module needs a GPU version (or a re-export) too
        for ops in (kernels, layers):
            assert callable(getattr(ops, name).forward) and callable(getattr(ops, name).backward)


def test_numpy_model_uses_the_formula_layers():
    from nanogpt_np import GPT, GPTConfig, layers

    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=4))
    assert model.ops is layers


def test_to_device_to_numpy_goes_through_to_host(monkeypatch):
    """A GPU checkpoint loads into a CPU model: CuPy arrays refuse np.asarray, so
    to_device(a, numpy) must copy through .get()."""

    class DeviceArray:  # stands in for a CuPy array
        def __init__(self, a):
            self.a = a

        def get(self):
            return self.a

        def __array__(self, *args, **kwargs):
            raise TypeError("implicit conversion to a NumPy array is not allowed")

    monkeypatch.setitem(sys.modules, "cupy", type("cupy", (), {"ndarray": DeviceArray}))
    out = backend.to_device(DeviceArray(np.arange(3.0)), np, np.float32)
    assert out.dtype == np.float32 and np.array_equal(out, [0, 1, 2])


def test_use_gpu_checks_the_index(monkeypatch):
    from tests.kernels import fake_cupy

    fake_cupy.install(monkeypatch)  # one fake GPU
    assert backend.use_gpu(0) is sys.modules["cupy"]
    with pytest.raises(ValueError, match="GPU index 1 is out of range: this machine has 1 GPU"):
        backend.use_gpu(1)
