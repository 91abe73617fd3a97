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


# ---- long runs: the step guard and another number of ranks (tests/mpi/resilience_ranks.py) ----


def test_a_nan_on_one_rank_is_skipped_by_every_rank(shards, tmp_path):
    result = run_mpi(ROOT / "tests" / "mpi" / "resilience_ranks.py", args=("nan", shards, str(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert np.array_equal(np.load(tmp_path / "params_rank0.npy"), np.load(tmp_path / "params_rank1.npy"))


def one_rank_part(shards, out, start, stop):
    import json

    from nanogpt_np.train import Trainer
    from tests.mpi.reshard_config import config, record_reads

    trainer = Trainer(config(shards, out / "log", resume=start > 0, ckpt_every=stop), log=lambda *a, **k: None)
    reads = record_reads(trainer.train_loader)
    trainer.run(stop_at=stop)
    result = {"reads": reads, "accum": trainer.accum, "tokens": trainer.train_loader.tokens_read,
              "losses": {str(k): v for k, v in trainer.history["train"].items()}}
    (out / f"reads_{start}_rank0.json").write_text(json.dumps(result))


def two_rank_part(shards, out, start, stop):
    result = run_mpi(ROOT / "tests" / "mpi" / "resilience_ranks.py",
                     args=("part", shards, str(out), str(start), str(stop)))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("ranks", [(2, 1), (1, 2)], ids=["2->1", "1->2"])
def test_resume_on_another_number_of_ranks(shards, tmp_path, ranks):
    """10 steps on M ranks, checkpoint, 10 more on N: 64 tokens every step, the token
    count carried over, and no token read twice (across a shard change, too)."""
    import json

    parts = {1: one_rank_part, 2: two_rank_part}
    parts[ranks[0]](shards, tmp_path, 0, 10)
    parts[ranks[1]](shards, tmp_path, 10, 20)
    runs = {start: [json.loads((tmp_path / f"reads_{start}_rank{r}.json").read_text()) for r in range(n)]
            for start, n in ((0, ranks[0]), (10, ranks[1]))}
    assert [runs[0][0]["accum"], runs[10][0]["accum"]] == [2 // ranks[0], 2 // ranks[1]]
    assert runs[0][0]["tokens"] == 10 * 64 and runs[10][0]["tokens"] == 20 * 64
    reads = [tuple(r) for run in runs.values() for rank in run for r in rank["reads"]]
    assert sum(stop - start for _, _, start, stop in reads) == 20 * 64
    assert {shard for _, shard, _, _ in reads} == {0, 1}  # the run crossed into the second shard
    by_shard = {}
    for epoch, shard, start, stop in sorted(reads):
        prev = by_shard.get((epoch, shard), 0)
        assert start >= prev, f"tokens {start}..{prev} of shard {shard} read twice"
        by_shard[(epoch, shard)] = stop
    losses = runs[10][0]["losses"]
    assert sorted(map(int, losses)) == list(range(10, 20)) and all(np.isfinite(list(losses.values())))


def test_sigterm_to_a_two_rank_job_checkpoints_and_resumes_exactly(shards, tmp_path):
    from nanogpt_np import checkpoint

    flags = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
             "--total-batch-size", "64", "--max-steps", "150", "--val-every", "0", "--sample-every", "0",
             "--ckpt-every", "0", "--hellaswag-every", "0", "--peak-tflops", "1", "--dtype", "float64",
             "--data-dir", shards]
    script = ROOT / "scripts" / "train.py"
    straight = run_mpi(script, args=(*flags, "--log-dir", str(tmp_path / "a")))
    assert straight.returncode == 0, straight.stderr
    log_dir = tmp_path / "b"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, str(script), *flags, "--log-dir", str(log_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    log = log_dir / "log.txt"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().count(" train ") >= 5):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.terminate()  # SIGTERM to mpiexec, which passes it to both ranks
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    done = log.read_text().count(" train ")
    assert 5 <= done < 150
    assert out.count("stopped by SIGTERM") == 1  # rank 0 speaks for the job
    assert f"({done} steps done)" in out  # the command that continues it, with the ranks' thread settings:
    assert "Continue with: OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 mpiexec -n 2 python3 scripts/train.py" in out
    assert checkpoint.list_checkpoints(log_dir) == [str(log_dir / f"model_{done:05d}.npz")]
    resumed = run_mpi(script, args=(*flags, "--log-dir", str(log_dir), "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert without_step_times(log) == without_step_times(tmp_path / "a" / "log.txt")


def without_step_times(log):
    """log.txt less its `{step} ranks ...` lines: the ranks' step times differ from run to run."""
    return [line for line in Path(log).read_text().splitlines() if line.split()[1:2] != ["ranks"]]


def test_an_error_every_rank_hits_is_printed_once(tmp_path):
    """The same bad flag on both ranks: one `error:` line for the job, not one per rank."""
    train = run_mpi(ROOT / "scripts" / "train.py", args=("--preset", "tiny", "--total-batch-size", "1000",
                                                         "--log-dir", str(tmp_path / "log")), timeout=60)
    assert train.returncode != 0
    lines = [line for line in train.stderr.splitlines() if "error" in line.lower() and "Abort" not in line]
    assert lines == ["error: --total-batch-size 1000 is not divisible by B*T*ranks = 8*128*2 = 2048; pick a "
                     "multiple of 2048"], train.stderr
    hella = run_mpi(ROOT / "scripts" / "hellaswag.py", args=("--path", str(tmp_path / "missing.jsonl"),
                                                             "--llmc-bin", str(tmp_path / "none.bin")), timeout=60)
    assert hella.returncode != 0
    assert hella.stderr.count("error:") == 1 and "missing.jsonl does not exist" in hella.stderr, hella.stderr


@pytest.mark.parametrize("ranks", [2, 3])
def test_zero_1_equals_zero_0_with_an_uneven_split(shards, tmp_path, ranks):
    import json

    from nanogpt_np import checkpoint
    from nanogpt_np.train import Trainer
    from tests.mpi.reshard_config import config

    result = run_mpi(ROOT / "tests" / "mpi" / "zero_ranks.py", n=ranks, args=("compare", shards, str(tmp_path)),
                     timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    r = json.loads((tmp_path / "zero.json").read_text())
    assert r["total"] % ranks  # the split is uneven
    assert sum(r["moment_sizes"]) == r["total"] and max(r["moment_sizes"]) - min(r["moment_sizes"]) == 1
    assert r["moments_without_zero"] == r["total"]  # every rank holds all of them without ZeRO
    np.testing.assert_allclose(r["losses1"], r["losses0"], rtol=1e-12)
    assert r["param_rel_diff"] <= 1e-12
    # checkpoints stay whole: ZeRO's equals the plain one, and resumes on one rank without ZeRO
    plain, zero = (checkpoint.load_checkpoint(tmp_path / f"zero{z}" / "model_00003.npz") for z in (0, 1))
    for key in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_allclose(zero[key], plain[key], rtol=1e-10, atol=1e-18)
    shape = dict(n_layer=2, n_head=1, n_embd=7, vocab_size=50307, max_steps=6, ckpt_every=3, keep_last=0,
                 total_batch_size=16 * 2 * 6, batch_size=2)
    for z in (0, 1):  # from the ZeRO checkpoint at step 3: on one rank, without ZeRO and with it
        log_dir = tmp_path / f"one_rank_from_zero_{z}"
        log_dir.mkdir()
        (log_dir / "model_00003.npz").write_bytes((tmp_path / "zero1" / "model_00003.npz").read_bytes())
        history = Trainer(config(shards, log_dir, resume=True, zero=z, **shape), log=lambda *a, **k: None).run()
        assert sorted(history["train"]) == [3, 4, 5] and np.isfinite(list(history["train"].values())).all()
