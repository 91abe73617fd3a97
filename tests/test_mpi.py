"""Real MPI: collectives and failure handling under `mpiexec -n 2`."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install -e '.[mpi]')")


def run_mpi(script, n=2, timeout=120, args=()):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [MPIEXEC, "-n", str(n), sys.executable, str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_collectives_on_two_ranks():
    result = run_mpi(ROOT / "tests" / "mpi" / "primitives.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout


def test_a_failing_rank_stops_the_job_quickly():
    start = time.monotonic()
    result = run_mpi(ROOT / "tests" / "mpi" / "fail_on_rank1.py", timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert "[rank 1] failed with RuntimeError: simulated failure on this rank" in result.stderr


# ---- the training loop on two ranks ---------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.helpers import write_random_shards

    return str(write_random_shards(tmp_path_factory.mktemp("shards"), 2, 900, 41, "r_val_000000.npy", 300))


def test_two_ranks_equal_one_rank_with_grad_accumulation(shards, tmp_path):
    """2 ranks x B=2 read the same 64 tokens per step as 1 rank x B=2 x 2 micro-steps."""
    import json

    from nanogpt_np.train import Trainer
    from tests.mpi.train_ranks_config import config_for_one_rank

    result = run_mpi(ROOT / "tests" / "mpi" / "train_ranks.py", args=("equivalence", shards, str(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [np.load(tmp_path / f"params_rank{r}.npy") for r in range(2)]
    assert np.array_equal(ranks[0], ranks[1])  # the copies never drift apart
    losses = json.loads((tmp_path / "losses.json").read_text())

    single = Trainer(config_for_one_rank(shards, tmp_path / "single"), log=lambda *a, **k: None)
    assert single.accum == 2
    history = single.run()
    for step, loss in enumerate(losses):
        assert abs(loss - history["train"][step]) <= 1e-10 * abs(loss), (step, loss, history["train"][step])
    np.testing.assert_allclose(ranks[0], single.model.flat_params, rtol=1e-9, atol=1e-12)


def test_resume_on_two_ranks_is_bit_identical(shards, tmp_path):
    result = run_mpi(ROOT / "tests" / "mpi" / "train_ranks.py", args=("resume", shards, str(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "resume_ok").exists()


def test_a_failing_rank_in_training_stops_the_job(shards, tmp_path):
    start = time.monotonic()
    result = run_mpi(ROOT / "tests" / "mpi" / "train_ranks.py", args=("fail", shards, str(tmp_path)), timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - start < 30
    assert "error on rank 1: shard edu_train_000007.npy is truncated (simulated on rank 1)" in result.stderr
