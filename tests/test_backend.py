import sys

import numpy as np
import pytest

from nanogpt_np import backend, cpu, ops


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,V,C", [(1, 1, 1), (7, 3, 2), (1000, 50, 16), (5, 100, 3)])
def test_scatter_add_rows_equals_add_at(N, V, C, dtype):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, V, N)
    rows = rng.standard_normal((N, C)).astype(dtype)
    start = rng.standard_normal((V, C)).astype(dtype)
    expected = start.copy()
    np.add.at(expected, idx, rows)
    got = cpu.scatter_add_rows(start.copy(), idx, rows)
    np.testing.assert_allclose(got, expected, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-6)


def test_resolve_dtype():
    assert backend.resolve_dtype("float32") == np.float32
    assert backend.resolve_dtype(np.float64) == np.float64
    with pytest.raises(ValueError, match="float32, float64 or"):
        backend.resolve_dtype("float16")
    with pytest.raises(ValueError, match="not supported"):
        backend.resolve_dtype(np.int64)


def test_precision_policy():
    """(parameter dtype, compute dtype): bf16 is mixed precision, and GPU-only."""
    assert backend.resolve_precision("float32") == (np.float32, np.float32)
    assert backend.resolve_precision(np.float64, "cupy") == (np.float64, np.float64)
    params, compute = backend.resolve_precision("bf16", "cupy")
    assert params == np.float32 and compute == backend.bfloat16() and compute.itemsize == 2
    assert backend.resolve_precision("bfloat16", "cupy")[1] == compute
    assert backend.resolve_precision(compute, "cupy") == (np.float32, compute)
    with pytest.raises(ValueError, match="runs on the GPU only: use --backend cupy"):
        backend.resolve_precision("bf16", "numpy")
    assert backend.default_precision("cupy") == "bf16" and backend.default_precision("numpy") == "float32"


def test_bfloat16_needs_ml_dtypes(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(RuntimeError, match="pip install ml_dtypes"):
        backend.bfloat16()


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


# ---- threads, chunks and the threaded matmul ------------------------------------------


@pytest.fixture
def threads():
    """set_num_threads(n) for one test, then back to the default."""
    before = cpu._num_threads
    yield cpu.set_num_threads
    cpu._num_threads = before


@pytest.mark.parametrize("n", [1, 2, 3])
def test_parallel_map_keeps_order_and_spreads_work(threads, n):
    threads(n)
    import threading
    import time

    seen = set()

    def work(i):
        seen.add(threading.current_thread().name)
        time.sleep(0.002)  # long enough that the workers get their share
        return i * i

    assert cpu.parallel_map(work, range(12)) == [i * i for i in range(12)]
    assert len(seen) == n
    # nested calls run inline in the worker instead of waiting for the pool
    assert cpu.parallel_map(lambda i: sum(cpu.parallel_map(lambda j: j, range(i))), range(5)) == [
        0, 0, 1, 3, 6]


def test_parallel_map_passes_errors_on(threads):
    threads(2)

    def work(i):
        if i == 7:
            raise KeyError("item 7")
        return i

    with pytest.raises(KeyError, match="item 7"):
        cpu.parallel_map(work, range(10))


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("n,chunk", [(0, 4), (1, 4), (5, 1), (10, 3), (1000, 64), (1001, 2000)])
def test_map_chunks_covers_the_range_once(threads, n_threads, n, chunk):
    threads(n_threads)
    bounds = cpu.map_chunks(lambda lo, hi: (lo, hi), n, chunk)
    covered = [i for lo, hi in bounds for i in range(lo, hi)]
    assert covered == list(range(n))
    assert all(hi - lo <= chunk for lo, hi in bounds)
    if bounds:
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
    whole_rounds = -(-(-(-n // chunk)) // n_threads) * n_threads  # ceil(ceil(n / chunk) / t) * t
    if n_threads > 1 and n >= chunk * 2 and whole_rounds <= n:
        assert len(bounds) == whole_rounds  # every thread gets the same number of chunks


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", [(300, 40, 200), (20, 64, 700), (3, 5, 7), (1, 300, 2000)])
def test_matmul_blocks_equal_one_matmul(threads, n_threads, dtype, M, K, N, monkeypatch):
    threads(n_threads)
    monkeypatch.setattr(cpu, "MIN_SPLIT_FLOPS", 0)  # split even these small products
    calls = []
    parallel_map = cpu.parallel_map
    monkeypatch.setattr(cpu, "parallel_map",
                        lambda fn, items, xp=np: calls.append(1) or parallel_map(fn, items, xp))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(dtype)
    w = rng.standard_normal((N, K)).astype(dtype)  # used as w.T, the linear layer's layout
    bias = rng.standard_normal(N).astype(dtype)
    expected = a.astype(np.float64) @ w.T.astype(np.float64)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cpu.matmul(a, w.T), expected, **tol)
    out = np.empty((M, N), dtype)
    got = cpu.matmul(a, w.T, out=out, bias=bias)
    assert got is out and got.dtype == dtype
    np.testing.assert_allclose(got, expected + bias, **tol)
    # a transposed left operand, as in dweight = dout.T @ x
    dout = rng.standard_normal((M, N)).astype(dtype)
    expected = dout.T.astype(np.float64) @ a.astype(np.float64)  # (N, K)
    np.testing.assert_allclose(cpu.matmul(dout.T, a), expected, **tol)
    assert len(calls) == (3 if n_threads > 1 else 0)  # the threaded path was taken


@pytest.mark.parametrize("n_threads", [1, 2])
def test_column_sums_and_fill(threads, n_threads):
    threads(n_threads)
    a = np.random.default_rng(0).standard_normal((700, 500))  # big enough to be split
    np.testing.assert_allclose(cpu.column_sums(a), a.sum(axis=0), rtol=1e-12, atol=1e-12)
    out = np.empty(500)
    assert cpu.column_sums(a, out=out) is out
    np.testing.assert_allclose(out, a.sum(axis=0), rtol=1e-12, atol=1e-12)
    assert cpu.fill(a, 0) is a and not a.any()


def test_blas_threads_sets_and_restores_openblas():
    if not cpu.blas_threads_available():
        with cpu.blas_threads(1):  # no OpenBLAS found: a no-op, not an error
            pass
        assert "openblas" not in str(np.show_config(mode="dicts")).lower()
        return
    get, _ = cpu._openblas_functions()
    before = get()
    with cpu.blas_threads(1):
        assert get() == 1
        with cpu.blas_threads(1):
            assert get() == 1
        assert get() == 1
    assert get() == before


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError, match="n >= 1"):
        cpu.set_num_threads(0)


def test_num_threads_reads_the_environment(threads, monkeypatch):
    cpu._num_threads = None
    monkeypatch.setenv("NANOGPT_NP_THREADS", "3")
    assert cpu.num_threads() == 3


def test_keep_freed_memory_on_glibc():
    import platform

    kept = cpu.keep_freed_memory()
    assert kept is cpu.keep_freed_memory()  # asked once, remembered
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert kept is True


def test_layer_ops_picks_the_formulas_for_numpy(monkeypatch):
    from nanogpt_np import kernels, layers

    assert ops.layer_ops(np) is layers

    class FakeCupy:  # any module other than numpy gets the kernels
        pass

    assert ops.layer_ops(FakeCupy) is kernels
    monkeypatch.setenv("NANOGPT_KERNELS", "0")
    assert ops.layer_ops(FakeCupy) is layers
    for name in layers.__all__:  # a new layer module needs a GPU version (or a re-export) too
        for impl in (kernels, layers):
            assert callable(getattr(impl, name).forward) and callable(getattr(impl, name).backward)


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
