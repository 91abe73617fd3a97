import shutil

import pytest

from nanogpt_np.kernels import loader


@pytest.fixture(scope="session")
def emulator_lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH: the CUDA emulator cannot be built")
    from tests.kernels import emulator

    return emulator.build(tmp_path_factory.mktemp("cuda_emulator"))


@pytest.fixture
def emulated(emulator_lib, monkeypatch):
    """Kernel launches go to the CPU emulator for the duration of a test; yields the runner."""
    from tests.kernels import emulator

    runner = emulator.EmulatedRunner(emulator_lib)
    previous = loader.use_runner(runner)
    yield runner
    loader.use_runner(previous)
