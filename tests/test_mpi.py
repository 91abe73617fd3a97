"""Real MPI: collectives and failure handling under `mpiexec -n 2`."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
