"""scripts/gpu_check.py --counts: one steady-state GPU step counted on a CPU, by a
stand-in for CuPy whose arrays hold no data (nanogpt_np/gpucheck/counts.py)."""
import json
import subprocess
import sys
from pathlib import Path

from nanogpt_np import GPTConfig
from nanogpt_np.gpucheck import counts

ROOT = Path(__file__).resolve().parents[2]
KEYS = ["launches", "gemms", "syncs", "allocations", "gbytes"]


def test_counts_command_prints_one_json_object_last():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--counts"], capture_output=True,
                         text=True, timeout=170, check=True).stdout
    last = json.loads(out.strip().splitlines()[-1])
    assert list(last) == KEYS
    assert "gemm" in out and last["gemms"] >= 12 * 12  # every linear layer's three products, at least
    assert last["launches"] > last["gemms"] > 0 and last["gbytes"] > 0
    assert "of the eager time the package's own code" in out


def test_the_package_share_of_host_time_is_a_fraction_that_sees_the_package():
    share = counts.package_share(B=2, T=64)
    assert 0.05 < share < 0.99  # both the package's wrappers and the stand-in's arrays take some time


def test_counting_arrays_hold_no_data():
    undo = counts.installed()
    try:
        import cupy

        a = cupy.empty((16384, 50304), dtype=cupy.float32)  # 3.3 GB, were it real
        assert a.nbytes == 16384 * 50304 * 4 and a[3:5].shape == (2, 50304)
        assert a.reshape(-1)[10:].data.ptr == a.data.ptr + 40
        assert not a[:, :7].flags.c_contiguous and a[:, :7].base is a
    finally:
        undo()


def test_a_small_step_is_counted_the_same_twice():
    config = GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=128)
    first = counts.count_step(config, B=2, T=64)
    assert first == counts.count_step(config, B=2, T=64)
    summary, kinds, _ = first
    assert summary["launches"] == sum(kinds.values())


def test_the_step_syncs_once_and_allocates_nothing_after_warm_up():
    config = GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=128)
    for accum, recompute, graphs in [(1, False, True), (2, True, True), (1, False, False)]:
        summary, kinds, _ = counts.count_step(config, B=2, T=64, accum=accum, recompute=recompute,
                                              cuda_graphs=graphs)
        assert summary["syncs"] == 1 and summary["allocations"] == 0, (accum, recompute, graphs, summary)
        assert not [k for k in kinds if k.startswith("cupy:")]  # no CuPy kernels: only the project's
        assert kinds["copy H2D"] == accum + 1  # idx and targets in one copy per micro-step; the hyperparameters
