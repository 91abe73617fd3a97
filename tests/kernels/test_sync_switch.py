"""NANOGPT_CUDA_SYNC is read once, when kernels/loader.py is imported; afterwards only
loader.sync_each_launch reaches the runner. Code that set the environment variable
instead would silently keep the old behaviour (a timed row syncing after every
launch), so no module but the loader may write it."""
import re
from pathlib import Path

from nanogpt_np.kernels import loader

PACKAGE = Path(loader.__file__).resolve().parents[1]


def test_only_the_loader_writes_the_sync_variable():
    writes = re.compile(r"environ\[\s*[\"']NANOGPT_CUDA_SYNC[\"']\s*\]\s*=|setenv\(\s*[\"']NANOGPT_CUDA_SYNC")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "loader.py" and writes.search(p.read_text())]
    assert not offenders, f"set it with kernels.loader.sync_each_launch instead: {offenders}"


def test_sync_each_launch_reaches_the_runner_and_the_environment(monkeypatch):
    runner = loader.CupyRunner()
    previous = loader.use_runner(runner)
    monkeypatch.setenv("NANOGPT_CUDA_SYNC", "0")
    try:
        loader.sync_each_launch(True)
        assert runner.sync_each_launch and loader.os.environ["NANOGPT_CUDA_SYNC"] == "1"
        loader.sync_each_launch(False)
        assert not runner.sync_each_launch and loader.os.environ["NANOGPT_CUDA_SYNC"] == "0"
    finally:
        loader.use_runner(previous)
    monkeypatch.setenv("NANOGPT_CUDA_SYNC", "1")
    assert loader.CupyRunner().sync_each_launch  # a new runner reads the variable
