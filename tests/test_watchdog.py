"""The collective watchdog (nanogpt_np/watchdog.py): a stalled rank ends the job, is
named, and the checkpoint it leaves resumes exactly; slow ranks are reported.

In one process: the records, the diagnosis, the thread, and the NCCL path on a fake
CuPy. Under `mpiexec -n 2` and `-n 3`: real scripts/train.py jobs with one rank
stopped by SIGSTOP, or asleep inside a step (tests/mpi/stall_ranks.py).
"""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import watchdog
from nanogpt_np.watchdog import CollectiveWatch, CollectiveWatchdog, diagnose, read_records, write_record

ROOT = Path(__file__).resolve().parents[1]


def record_of(folder, rank, watch, heartbeat):
    os.makedirs(folder, exist_ok=True)
    write_record(watchdog.record_path(folder, rank), rank, watch, heartbeat)


def test_records_name_who_never_arrived_and_who_stopped(tmp_path):
    now = time.time()
    waiting, busy, frozen, arrived = (CollectiveWatch() for _ in range(4))
    for w in (waiting, busy, frozen, arrived):
        w.at(7, "training step")
    for w in (busy, frozen):  # both left the loss allreduce of step 6 ...
        with w.collective("loss allreduce"):
            pass
    for w in (waiting, arrived):  # ... and are now inside the next collective
        w.collective("loss allreduce").__enter__()
        w.collective("gradient allreduce").__enter__()
    fresh = now + 3.4  # the diagnosis below is at now + 3.5
    for rank, (w, beat) in enumerate([(waiting, fresh), (busy, fresh), (frozen, now - 30), (arrived, fresh)]):
        record_of(tmp_path, rank, w, beat)
    records = read_records(tmp_path, 5)
    assert records[4] is None and records[1].name == "loss allreduce" and records[0].name == "gradient allreduce"
    stall = diagnose(waiting.oldest_open(), records, 0, timeout=3, now=now + 3.5)
    assert sorted(stall.missing) == [1, 2] and stall.unknown == [4] and stall.healthy == [0, 3, 4]
    line = stall.describe()
    assert line.startswith("collective timeout: the gradient allreduce of step 7 (training step) did not complete "
                           "in 3.5 s (--collective-timeout 3): rank 1 never arrived (pid ")
    assert "rank 2 is not responding" in line and "no heartbeat for 33.5 s" in line
    assert "no record from rank(s) 4" in line


def test_every_rank_inside_and_none_done_blames_the_network(tmp_path):
    watches = [CollectiveWatch() for _ in range(2)]
    for rank, w in enumerate(watches):
        w.collective("broadcast from rank 0").__enter__()
        record_of(tmp_path, rank, w, time.time())
    stall = diagnose(watches[0].oldest_open(), read_records(tmp_path, 2), 0, timeout=1)
    assert not stall.missing and "every rank entered it and none finished it" in stall.describe()


def run_watchdog(tmp_path, watch, other_heartbeat, timeout=0.3):
    """A watchdog for rank 0 of 2 (rank 1's record written here, frozen); -> (stalls seen, exit codes)."""
    other = CollectiveWatch()
    record_of(tmp_path, 1, other, other_heartbeat)
    seen, exits, fired = [], [], threading.Event()
    dog = CollectiveWatchdog(watch, str(tmp_path), 0, 2, timeout, on_stall=seen.append)
    dog.exit = lambda code: (exits.append(code), fired.set())
    return dog, seen, exits, fired


def test_the_thread_fires_once_on_a_collective_left_open(tmp_path):
    watch = CollectiveWatch()
    dog, seen, exits, fired = run_watchdog(tmp_path, watch, other_heartbeat=time.time() - 60)
    with dog:
        with watch.collective("loss allreduce"):  # a collective that completes in time
            pass
        time.sleep(0.5)
        assert not seen
        watch.at(3, "training step")
        watch.collective("gradient allreduce").__enter__()  # ... and one that never does
        assert fired.wait(10)
    (stall,), (code,) = seen, exits
    assert code == 1 and watch.halted.is_set()
    assert (stall.name, stall.step, list(stall.missing)) == ("gradient allreduce", 3, [1])


def test_the_nccl_path_stays_open_until_its_event_completes(tmp_path, monkeypatch):
    """The GPU dry run: NCCL calls return at once; the watchdog polls the CUDA event
    recorded behind each bucket's allreduce (on the fake CuPy of test_distributed)."""
    from nanogpt_np import distributed as dist
    from tests.test_distributed import FakeComm, FakeDeviceArray, fake_cupy, fake_mpi

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    cupy, nccl, _ = fake_cupy(monkeypatch, True)
    gpu_done = threading.Event()

    class Event:
        def __init__(self, stream_ptr):
            self.stream_ptr = stream_ptr

        @property
        def done(self):  # cudaEventQuery: has the GPU run everything queued before the event?
            return gpu_done.is_set()

    monkeypatch.setattr(cupy.cuda.get_current_stream().__class__, "record", lambda self: Event(self.ptr))
    d = dist.MPIDistributed(FakeComm(), fake_mpi(False), env={})
    dog, seen, exits, fired = run_watchdog(tmp_path, d.watch, other_heartbeat=time.time() - 60, timeout=0.4)
    with dog:
        d.watch.at(5, "training step")
        buckets = d.gradient_buckets(FakeDeviceArray(np.zeros(8, dtype=np.float32)), bucket_bytes=0)
        buckets.finish()  # queued on the GPU; the host goes on
        assert d.watch.current is None and len(d.watch.pending) == 1
        time.sleep(0.2)
        gpu_done.set()  # this one completes within the timeout
        time.sleep(0.6)
        assert not seen and not d.watch.pending
        gpu_done.clear()
        d.allreduce_sum_(FakeDeviceArray(np.zeros(3, dtype=np.float32)))  # this one never does
        assert fired.wait(10)
    (stall,) = seen
    assert stall.name == "allreduce" and stall.step == 5 and list(stall.missing) == [1]


@pytest.mark.parametrize("busy,expect", [([10.0, 11.0, 10.5], None), ([10.0, 13.0, 10.5], "rank 1 took 13.0 ms")])
def test_straggler_report(busy, expect):
    line, message = watchdog.straggler_report(99, busy)
    assert line.startswith("99 ranks median_ms 10.50 slowest_rank 1 slowest_ms ")
    assert (message is None) == (expect is None)
    if expect:
        assert expect in message and "+24%" in message


@pytest.mark.parametrize("gpu", [False, True])
def test_a_ranks_own_step_time(gpu):
    """CPU: the step's time less the time inside collectives; NCCL: the GPU time between
    the events around forward and backward (the host never waits inside NCCL calls)."""
    from types import SimpleNamespace

    from nanogpt_np.resilience import StepGuard
    from nanogpt_np.training.watching import WatchingMixin

    trainer = WatchingMixin()
    trainer.dist, trainer.step = SimpleNamespace(watch=CollectiveWatch()), 1
    trainer.xp = SimpleNamespace(cuda=SimpleNamespace(get_elapsed_time=lambda start, end: end - start))  # ms
    trainer.train_loader, trainer.guard = SimpleNamespace(state=dict), StepGuard()
    trainer.rng = np.random.default_rng(0)
    trainer.busy = []
    trainer.watch_at(0, "training step")
    if gpu:
        trainer.dist.watch.gpu_work = (10.0, 35.0)
    else:
        time.sleep(0.05)
        with trainer.dist.watch.collective("gradient allreduce"):
            time.sleep(0.2)
    trainer.remember_completed_step()
    (busy,) = trainer.busy
    assert busy == 0.025 if gpu else 0.04 < busy < 0.15
    assert trainer.dist.watch.gpu_work is None and trainer.completed["step"] == 1


def test_plot_log_ignores_the_ranks_lines(tmp_path):
    from nanogpt_np.logplot import read_log

    (tmp_path / "log.txt").write_text("0 train 10.9\n9 ranks median_ms 1.00 slowest_rank 1 slowest_ms 2.00\n")
    assert list(read_log(tmp_path)) == ["train"]


# ---- real jobs under mpiexec ------------------------------------------------------------------

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install -e '.[mpi]')")
TIMEOUT = 3  # --collective-timeout of the stalled jobs
STEPS = 12  # of 192 tokens: 3 micro-steps on 2 ranks, 2 on 3 (B=2, T=16)
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    pytest.importorskip("mpi4py")
    from tests.helpers import write_random_shards

    return str(write_random_shards(tmp_path_factory.mktemp("shards"), 2, 900, 41, "r_val_000000.npy", 300))


def flags(shards, log_dir, timeout=TIMEOUT):
    return ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
            "--total-batch-size", "192", "--max-steps", str(STEPS), "--val-every", "0", "--sample-every", "0",
            "--ckpt-every", "0", "--hellaswag-every", "0", "--peak-tflops", "1", "--dtype", "float64",
            "--straggler-every", "4", "--collective-timeout", str(timeout), "--data-dir", shards,
            "--log-dir", str(log_dir)]


def mpi_job(n, args, script=ROOT / "scripts" / "train.py"):
    return subprocess.Popen([MPIEXEC, "-n", str(n), sys.executable, str(script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def train_lines(log_dir):
    """log.txt without the `ranks` lines (step times differ from run to run)."""
    return [line for line in (Path(log_dir) / "log.txt").read_text().splitlines() if " ranks " not in line]


_straight = {}


def straight_run(shards, tmp_path_factory, n):
    """The job never stalled, once per number of ranks."""
    if n not in _straight:
        log_dir = tmp_path_factory.mktemp(f"straight{n}")
        out, err = mpi_job(n, flags(shards, log_dir)).communicate(timeout=120)
        assert " ranks median_ms " in (log_dir / "log.txt").read_text(), err
        _straight[n] = train_lines(log_dir)
        assert len(_straight[n]) == STEPS and not (log_dir / "watchdog").exists()
    return _straight[n]


def wait_for_steps(proc, log_dir, steps):
    deadline = time.monotonic() + 60
    log = Path(log_dir) / "log.txt"
    while not (log.exists() and log.read_text().count(" train ") >= steps):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)


def check_stalled_job(proc, stalled_at, n, rank, why, log_dir, straight=None, shards=None):
    """The job ended within the timeout plus a few seconds with one line naming `rank`,
    and the checkpoint it left verifies and (given the straight run) resumes into the
    losses of the run never stalled."""
    from nanogpt_np import checkpoint

    out, err = proc.communicate(timeout=60)
    elapsed = time.time() - stalled_at
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    line = lines[0]
    # (a rank may have been waiting a moment for the stopped one already when it stopped)
    assert TIMEOUT - 1 <= elapsed < TIMEOUT + 6, f"{elapsed:.1f} s from the stall to the end of the job"
    assert "collective timeout: the " in line and f"rank {rank} {why}" in line, line
    for other in set(range(n)) - {rank}:  # only the stalled rank is named
        assert f"rank {other} never arrived" not in line and f"rank {other} is not responding" not in line, line
    step = int(line.split(" holds the ")[1].split()[0])
    assert f"checkpoint {log_dir}/model_{step:05d}.npz" in line
    continue_with = line.split("Continue with: ")[1]  # the thread settings the job ran with come first
    assert f"mpiexec -n {n} python3 scripts/train.py " in continue_with and continue_with.endswith(" --resume")
    assert step >= 3 and checkpoint.load_checkpoint(checkpoint.checkpoint_path(log_dir, step))["meta"]["step"] == step
    print(f"\n{n} ranks, rank {rank} {why}: {elapsed:.1f} s from the stall to the end; {line}")
    if straight is None:
        return
    resumed = mpi_job(n, flags(shards, log_dir) + ["--resume"])
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resumed from {log_dir}/model_{step:05d}.npz at step {step}" in out
    assert train_lines(log_dir) == straight  # the same losses, to the last digit logged


@mpi
@pytest.mark.parametrize("n,rank", [(2, 1), (3, 0)])
def test_a_stopped_rank_ends_the_job_named_and_the_checkpoint_resumes_exactly(shards, tmp_path, tmp_path_factory,
                                                                              n, rank):
    straight = straight_run(shards, tmp_path_factory, n)
    log_dir = tmp_path / "log"
    proc = mpi_job(n, flags(shards, log_dir))
    wait_for_steps(proc, log_dir, 3)
    pid = read_records(log_dir / "watchdog", n)[rank].pid
    stalled_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    try:
        check_stalled_job(proc, stalled_at, n, rank, "is not responding", log_dir, straight, shards)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # MPI_Abort killed it already; never leave it stopped
        except ProcessLookupError:
            pass


@mpi
@pytest.mark.parametrize("n,rank", [(2, 0), (3, 2)])
def test_a_rank_asleep_inside_a_step_ends_the_job_named(shards, tmp_path, n, rank):
    log_dir, asleep = tmp_path / "log", tmp_path / "asleep_at"
    call = 10 if n == 2 else 9  # its first batch of step 3 (3 micro-steps on 2 ranks) or 4 (2 on 3)
    proc = mpi_job(n, [str(rank), str(call), "600", str(asleep), "--", *flags(shards, log_dir)],
                   script=ROOT / "tests" / "mpi" / "stall_ranks.py")
    deadline = time.monotonic() + 60
    while not (asleep.exists() and asleep.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    check_stalled_job(proc, float(asleep.read_text()), n, rank, "never arrived", log_dir)


@mpi
def test_collective_timeout_0_waits_as_before(shards, tmp_path, tmp_path_factory):
    """No watchdog: a rank asleep longer than the timeout used above only slows the job."""
    straight = straight_run(shards, tmp_path_factory, 2)
    log_dir = tmp_path / "log"
    proc = mpi_job(2, ["1", "10", str(TIMEOUT + 1), str(tmp_path / "asleep_at"), "--",
                       *flags(shards, log_dir, timeout=0)], script=ROOT / "tests" / "mpi" / "stall_ranks.py")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert train_lines(log_dir) == straight and not (log_dir / "watchdog").exists()
    assert "slow rank: rank 1 took" in out  # asleep in step 3: the straggler of steps 0..3
