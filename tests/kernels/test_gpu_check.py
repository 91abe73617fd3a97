"""scripts/gpu_check.py, dry-run on the CPU: a fake CuPy over NumPy, kernels in the
CPU emulator, PyTorch on the CPU, every size shrunk. The GPU run is rare and
short, so each of its rows must already work here; only the numbers are the GPU's."""
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import GPTConfig
from nanogpt_np.kernels import gemm, loader

ROOT = Path(__file__).resolve().parents[2]
TINY = GPTConfig(block_size=32, vocab_size=61, n_layer=1, n_head=2, n_embd=128)  # head size 64
SIZES = dict(
    attention=[(1, 5, 2, np.float32), (1, 70, 1, np.float64)],
    layernorm=[((2, 3, 40), np.float32), ((1, 2, 40), np.float64)],
    gelu=[((3, 50), np.float32)],
    cross_entropy=[(1, 3, 70, np.float32), (2, 2, 33, np.float64)],
    adamw=[(1001, np.float32), (77, np.float64)],
    small_model=(TINY, 1, 9),
    big_model=(TINY, 2, 17),
    train=(TINY, 3, 2, 16),
    attention_bench=(1, 1, 16, 64),
    speed=(TINY, 2, 16),
)


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_limit_stops_a_long_row():
    import time

    gpu_check = load_gpu_check()
    with pytest.raises(gpu_check.TimeLimit):
        gpu_check.with_time_limit(1, lambda: time.sleep(5))
    assert gpu_check.with_time_limit(5, lambda: 42) == 42


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH: no CUDA emulator")
def test_gpu_check_dry_run(emulator_lib, monkeypatch, tmp_path, capsys):
    from tests.kernels import emulator, fake_cupy

    fake_cupy.install(monkeypatch)
    monkeypatch.setattr(emulator.EmulatedCupyRunner, "lib_path", emulator_lib)
    monkeypatch.setattr(loader, "CupyRunner", emulator.EmulatedCupyRunner)
    previous = loader.use_runner(emulator.EmulatedCupyRunner())
    previous_gemm = gemm.use_runner(emulator.NumpyCublas())
    monkeypatch.setenv("NANOGPT_CUDA_SYNC", "0")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--no-compile"])
    gpu_check = load_gpu_check()
    monkeypatch.setattr(gpu_check, "SIZES", SIZES)
    monkeypatch.setattr(gpu_check, "TORCH_DEVICE", "cpu")
    try:
        status = gpu_check.main()
    finally:
        loader.use_runner(previous)
        gemm.use_runner(previous_gemm)
    out = capsys.readouterr().out
    rows = gpu_check.ROWS
    broken = [(r["name"], r["result"]) for r in rows if r["status"] == "FAIL" or r["result"].startswith("ERROR")]
    assert not broken, broken
    assert status == 0
    sections = {r["section"] for r in rows}
    assert sections == {"0", "1", "2", "3", "4", "5"}
    n_kernel_rows = sum(len(SIZES[k]) for k in ("attention", "layernorm", "gelu", "cross_entropy", "adamw"))
    assert len(rows) == 2 + n_kernel_rows + 4 + 1 + 3 + 5
    assert "skipped (--no-compile)" in out and "rows, 0 failed" in out
    assert (tmp_path / "gpu_check.txt").read_text().startswith("#")
    assert (tmp_path / "gpu_check.json").exists()
