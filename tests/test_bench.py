"""scripts/bench.py on a tiny model: its modes run and print what they promise."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16",
        "--batch-size", "2", "--vocab", "64", "--steps", "2", "--warmup", "1", "--threads", "1"]


def bench(*args):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *TINY, *args],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bench_compares_numpy_and_torch():
    out = bench()
    assert "n_layer=1 n_embd=32 n_head=2 T=16 B=2 vocab=64 float32, threads=1" in out
    assert "ratio numpy/torch tokens/s (median):" in out
    for impl in ("numpy", "torch"):
        assert any(line.startswith(impl) for line in out.splitlines())


def test_bench_json_has_both_medians():
    result = json.loads(bench("--json").strip().splitlines()[-1])
    assert result["config"]["n_layer"] == 1 and result["threads"] == 1
    assert set(result["results"]) == {"numpy", "torch"}
    assert all(r["tok_per_s"] > 0 and r["steps"] == 2 for r in result["results"].values())


def test_bench_profile_names_the_parts():
    out = bench("--profile")
    for part in ("linear.forward", "attention.backward", "AdamW.step", "clip_grad_norm", "step (median)"):
        assert part in out


@pytest.mark.parametrize("impl", ["numpy", "both"])
def test_bench_memory_runs_each_library_in_its_own_process(impl):
    result = json.loads(bench("--memory", "--json", "--impl", impl).strip().splitlines()[-1])
    expected = {"numpy", "torch"} if impl == "both" else {"numpy"}
    assert set(result["memory"]) == expected
    assert all(r["peak_rss"] > r["rss_after_imports"] > 0 for r in result["memory"].values())


def test_bench_rejects_a_bad_shape():
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--n-embd", "30", "--n-head", "4"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "not divisible" in result.stderr


def test_bench_ranks_times_one_and_two_ranks():
    pytest.importorskip("mpi4py")
    result = json.loads(bench("--ranks", "1,2", "--json").strip().splitlines()[-1])
    one, two = result["ranks"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["bare_allreduce_s"] == 0 and two["bare_allreduce_s"] > 0 and two["allreduce_s"] > 0
    assert two["grad_bytes"] == one["grad_bytes"] > 0
    assert all(r["tok_per_s"] > 0 and r["threads_per_rank"] == 1 for r in result["ranks"])
    assert one["speedup"] == 1.0
    assert two["speedup"] == pytest.approx(two["tok_per_s"] / one["tok_per_s"])
    out = bench("--ranks", "2", "--bucket-mb", "0")
    assert "bare Allreduce ms" in out and "ratio" in out and "0 MiB gradient buckets" in out


def test_bench_cupy_backend_is_for_ranks_only():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--backend", "cupy"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "--backend cupy works with --ranks only" in result.stderr
