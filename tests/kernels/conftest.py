import shutil

import pytest

from nanogpt_np.kernels import loader


@pytest.fixture(scope="session")
def emulator_lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH: the CUDA emulator cannot be built")
    from tests.kernels import emulator

    return emulator.build(tmp_path_factory.mktemp("cuda_emulator"))


@pytest.fixture(scope="session")
def fast_emulator_lib(tmp_path_factory):
    """The emulator without its race detector (emulator.FAST_FLAGS), for tests that run
    a whole model step: the kernel-level tests (the `emulated` fixture) run every
    kernel under the detector, so here it would only cost time."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH: the CUDA emulator cannot be built")
    from tests.kernels import emulator

    return emulator.build(tmp_path_factory.mktemp("cuda_emulator_fast"), race_detector=False)


@pytest.fixture
def emulated(emulator_lib, monkeypatch):
    """Kernel launches go to the CPU emulator, and gemm calls to a NumPy model of
    cuBLAS, for the duration of a test; yields the kernel runner."""
    from tests.kernels import emulator

    from nanogpt_np.kernels import gemm

    runner = emulator.EmulatedRunner(emulator_lib)
    previous = loader.use_runner(runner)
    previous_gemm = gemm.use_runner(emulator.NumpyCublas())  # cuBLAS calls, in NumPy
    yield runner
    loader.use_runner(previous)
    gemm.use_runner(previous_gemm)


@pytest.fixture
def fake_gpu(emulator_lib, monkeypatch):
    """A stand-in CuPy (tests/kernels/fake_cupy.py) whose kernel launches go to the
    emulator and whose cuBLAS calls go to NumPy: the package's CuPy code paths, run
    on the CPU. Yields the fake cupy module."""
    from nanogpt_np.kernels import gemm
    from tests.kernels import emulator, fake_cupy

    cupy = fake_cupy.install(monkeypatch)
    monkeypatch.setattr(emulator.EmulatedCupyRunner, "lib_path", emulator_lib)
    monkeypatch.setattr(loader, "CupyRunner", emulator.EmulatedCupyRunner)
    previous = loader.use_runner(emulator.EmulatedCupyRunner())
    previous_gemm = gemm.use_runner(emulator.NumpyCublas())
    yield cupy
    loader.use_runner(previous)
    gemm.use_runner(previous_gemm)
