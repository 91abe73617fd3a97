"""Long runs survive: non-finite steps, spikes, damaged checkpoints, failed writes.

The multi-rank and signal cases are in tests/test_mpi.py (resilience_ranks.py)
and at the end of this file (a real scripts/train.py process)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import checkpoint, train
from nanogpt_np.checkpoint import CheckpointError, load_checkpoint
from nanogpt_np.resilience import SpikeDetector, StepGuard
from nanogpt_np.train import TrainConfig, Trainer, TrainingStopped
from tests.helpers import write_random_shards

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *a, **k: None)
REAL_ACCUMULATE = train.accumulate_gradients


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_random_shards(tmp_path_factory.mktemp("shards"), 2, 3000, 37, "r_val_000000.npy", 400))


def small(data_dir, log_dir, **overrides):
    cfg = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50304, batch_size=2,
               total_batch_size=64, max_lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=8,
               val_every=0, sample_every=0, ckpt_every=0, hellaswag_every=0, dtype="float64",
               data_dir=data_dir, log_dir=str(log_dir), peak_tflops=1.0)
    cfg.update(overrides)
    return TrainConfig(**cfg)


class Recorder:
    """Wraps trainer.train_one_step: the weights and AdamW state after every step, and
    a hook that may poison the gradients of chosen steps (called after backward)."""

    def __init__(self, trainer, poison=None):
        self.trainer, self.poison, self.after = trainer, poison, {}
        real_step = trainer.train_one_step

        def step(k):
            self.current = k
            result = real_step(k)
            opt = trainer.optimizer
            self.after[k] = (trainer.model.flat_params.copy(), opt.exp_avg.copy(), opt.exp_avg_sq.copy(),
                             opt.step_count)
            return result

        def accumulate(model, *args, **kwargs):
            out = REAL_ACCUMULATE(model, *args, **kwargs)
            if self.poison:
                self.poison(self.current, model.flat_grads)
            return out

        trainer.train_one_step = step
        self._patch = accumulate


@pytest.fixture
def recorded(monkeypatch):
    def make(trainer, poison=None):
        rec = Recorder(trainer, poison)
        monkeypatch.setattr("nanogpt_np.train.accumulate_gradients", rec._patch)
        return rec

    return make


# ---- 1. non-finite steps ----------------------------------------------------------------


def test_spike_detector_zscore_against_the_values_before():
    det = SpikeDetector(window=4, min_count=3)
    assert np.isnan(det.zscore(1.0))  # too few values yet
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):  # the window keeps 2, 3, 4, 5
        det.push(v)
    kept = np.array([2.0, 3.0, 4.0, 5.0])
    assert det.zscore(9.0) == pytest.approx((9.0 - kept.mean()) / kept.std())
    assert det.state() == [2.0, 3.0, 4.0, 5.0]
    again = SpikeDetector(window=4, min_count=3)
    again.load_state(det.state())
    assert again.zscore(9.0) == det.zscore(9.0)


def test_guard_skips_non_finite_and_counts_them_in_a_row():
    guard = StepGuard(max_bad_steps=2)
    assert guard.judge(3.0, 1.0) is None
    assert "loss nan" in guard.judge(float("nan"), 1.0)
    assert "grad norm inf" in guard.judge(3.0, float("inf")) and guard.must_stop
    assert guard.judge(3.0, 1.0) is None and guard.bad_in_row == 0 and not guard.must_stop


def test_a_nan_gradient_skips_the_step_and_training_goes_on(data_dir, tmp_path, recorded):
    trainer = Trainer(small(data_dir, tmp_path), **QUIET)

    def poison(step, grads):
        if step == 3:
            grads[5] = np.nan

    rec = recorded(trainer, poison)
    history = trainer.run()
    for before, after in zip(rec.after[2], rec.after[3]):  # step 3 changed nothing
        assert np.array_equal(before, after)
    assert rec.after[3][3] == 3  # AdamW's own step count did not advance
    assert not np.array_equal(rec.after[3][0], rec.after[4][0])  # step 4 trained again
    assert rec.after[7][3] == 7
    assert list(history["skipped"]) == [3] and "grad norm nan" in history["skipped"][3]
    log = (tmp_path / "log.txt").read_text()
    assert "3 skipped grad norm nan (non-finite; 1 in a row)" in log
    assert np.isfinite(trainer.model.flat_params).all()


def test_too_many_bad_steps_stop_with_the_last_good_weights(data_dir, tmp_path, recorded):
    trainer = Trainer(small(data_dir, tmp_path, max_bad_steps=3), **QUIET)

    def poison(step, grads):
        if step >= 2:
            grads[:] = np.inf

    rec = recorded(trainer, poison)
    with pytest.raises(TrainingStopped, match=r"3 non-finite steps in a row \(the last: step 4.*model_00005\.npz"):
        trainer.run()
    ckpt = load_checkpoint(tmp_path / "model_00005.npz")
    good = rec.after[1]  # the weights after step 1, the last good step
    flat = np.concatenate([ckpt["params"][n].ravel() for n in trainer.model.parameters()])
    assert np.array_equal(flat, good[0])
    assert np.array_equal(ckpt["exp_avg_sq"], good[2]) and ckpt["meta"]["optimizer"]["step"] == 2
    # resumed with the poison gone: it trains on, starting with a clean count
    rec.poison = None
    again = Trainer(small(data_dir, tmp_path, max_bad_steps=3, resume=True), **QUIET)
    assert again.guard.bad_in_row == 0
    history = again.run()
    assert sorted(history["train"]) == [5, 6, 7] and not history["skipped"]


def test_max_bad_steps_zero_never_stops(data_dir, tmp_path, recorded):
    trainer = Trainer(small(data_dir, tmp_path, max_bad_steps=0, max_steps=4), **QUIET)
    recorded(trainer, lambda step, grads: grads.__setitem__(0, np.nan))
    history = trainer.run()
    assert sorted(history["skipped"]) == [0, 1, 2, 3]


# ---- 2. spikes ------------------------------------------------------------------------------


def test_a_gradient_spike_is_skipped_and_resume_keeps_the_statistics(data_dir, tmp_path, recorded):
    kw = dict(max_steps=30, skip_zscore=4.0, warmup_steps=0, max_lr=1e-3, min_lr=1e-3)

    def spike(step, grads):
        if step == 24:
            grads *= 1e3

    straight = Trainer(small(data_dir, tmp_path / "a", **kw), **QUIET)
    rec = recorded(straight, spike)
    h = straight.run()
    assert list(h["skipped"]) == [24] and "spike: grad norm" in h["skipped"][24]
    assert np.array_equal(rec.after[23][0], rec.after[24][0])
    # without --skip-zscore the same spike is applied
    off = Trainer(small(data_dir, tmp_path / "off", **dict(kw, skip_zscore=0.0)), **QUIET)
    rec_off = recorded(off, spike)
    assert not off.run()["skipped"] and not np.array_equal(rec_off.after[23][0], rec_off.after[24][0])
    # stopped at 20 and resumed: the detector's window came back with the checkpoint
    first = Trainer(small(data_dir, tmp_path / "b", ckpt_every=20, **kw), **QUIET)
    recorded(first, spike)
    first.run(stop_at=20)
    resumed = Trainer(small(data_dir, tmp_path / "b", ckpt_every=20, resume=True, **kw), **QUIET)
    recorded(resumed, spike)
    h2 = resumed.run()
    assert list(h2["skipped"]) == [24]
    assert resumed.guard.state() == straight.guard.state()  # 29 values: 20 came from the checkpoint
    assert len(resumed.guard.norm_stats.values) == 29
    assert all(h2["train"][s] == h["train"][s] for s in range(20, 30))
    assert np.array_equal(resumed.model.flat_params, straight.model.flat_params)


# ---- 5. checkpoints kept and checked ---------------------------------------------------------


def run_with_checkpoints(data_dir, log_dir, stop_at=None, **kw):
    trainer = Trainer(small(data_dir, log_dir, ckpt_every=2, **kw), **QUIET)
    return trainer, trainer.run(stop_at=stop_at)


def test_keep_last_deletes_older_checkpoints(data_dir, tmp_path):
    run_with_checkpoints(data_dir, tmp_path, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "model_00006.npz", "model_00008.npz", "run.json"]
    run_with_checkpoints(data_dir, tmp_path / "all", keep_last=0)
    assert len(checkpoint.list_checkpoints(tmp_path / "all")) == 4


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_with(path, name, change):
    """The same npz with one array changed and every zip CRC right: only the stored
    sha256 can tell."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays[name] = change(arrays[name].copy())
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", ["truncated by one byte", "one flipped byte", "altered array, valid zip",
                                    "altered meta, valid zip"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(data_dir, tmp_path, damage):
    straight, h_straight = run_with_checkpoints(data_dir, tmp_path / "straight")
    log_dir = tmp_path / "run"
    run_with_checkpoints(data_dir, log_dir, stop_at=6, keep_last=0)
    latest = log_dir / "model_00006.npz"
    if damage == "truncated by one byte":
        latest.write_bytes(latest.read_bytes()[:-1])
    elif damage == "one flipped byte":
        flip_byte(latest, latest.stat().st_size // 2)
    elif damage == "altered array, valid zip":
        rewrite_with(latest, "optim/exp_avg_sq", lambda a: a + 1e-9)
    else:
        rewrite_with(latest, "meta", lambda a: np.array(str(a).replace('"step": 6', '"step": 7')))
    with pytest.raises(CheckpointError, match=str(latest)):
        load_checkpoint(latest)
    lines = []
    resumed = Trainer(small(data_dir, log_dir, ckpt_every=2, resume=True), log=lines.append)
    h = resumed.run()
    said = "\n".join(lines)
    assert f"warning: checkpoint {latest}" in said and "trying the previous checkpoint" in said
    assert "resumed from " + str(log_dir / "model_00004.npz") in said
    assert sorted(h["train"]) == [4, 5, 6, 7]
    assert all(h["train"][s] == h_straight["train"][s] for s in range(4, 8))
    assert np.array_equal(resumed.model.flat_params, straight.model.flat_params)


def test_every_checkpoint_damaged_is_an_error_naming_each(data_dir, tmp_path):
    run_with_checkpoints(data_dir, tmp_path, max_steps=4)
    for p in checkpoint.list_checkpoints(tmp_path):
        Path(p).write_bytes(Path(p).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies.*model_00004.*model_00002"):
        Trainer(small(data_dir, tmp_path, resume=True), **QUIET).run()


def test_version_1_checkpoints_without_checksums_still_load(tmp_path, data_dir):
    trainer, _ = run_with_checkpoints(data_dir, tmp_path, max_steps=2)
    path = tmp_path / "model_00002.npz"
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "meta_sha256"}
    import json

    meta = json.loads(str(arrays["meta"]))
    meta["version"] = 1
    del meta["checksums"]
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    assert load_checkpoint(path)["meta"]["step"] == 2


# ---- 6. a checkpoint that cannot be written ------------------------------------------------


def make_read_only(directory, monkeypatch):
    """Really read-only: chmod for a normal user; root ignores modes, so chattr +i
    (an immutable folder). Where neither works, opening a new file there fails as the
    kernel would. -> an undo function."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        return lambda: os.chmod(directory, 0o755)
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(directory)], capture_output=True).returncode == 0:
        return lambda: subprocess.run([chattr, "-i", str(directory)], check=True)
    real_open = open

    def refusing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and os.path.dirname(os.path.abspath(file)) == os.path.abspath(directory):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    return lambda: monkeypatch.undo()


def test_a_read_only_log_dir_during_a_checkpoint(data_dir, tmp_path, monkeypatch):
    trainer = Trainer(small(data_dir, tmp_path, ckpt_every=2, max_steps=6), **QUIET)
    real_save, undo = trainer.save, []

    def save_then_lock():
        if trainer.step == 4:  # the second checkpoint finds the folder read-only
            undo.append(make_read_only(tmp_path, monkeypatch))
        return real_save()

    trainer.save = save_then_lock
    try:
        with pytest.raises(CheckpointError) as err:
            trainer.run()
    finally:
        for u in undo:
            u()
    message = str(err.value)
    assert "could not write checkpoint" in message and "model_00004.npz" in message
    assert "Permission denied" in message or "Operation not permitted" in message
    assert "model_00002.npz is intact" in message
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "model_00002.npz", "run.json"]  # no partial file
    assert load_checkpoint(tmp_path / "model_00002.npz")["meta"]["step"] == 2


TRAIN_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
               "--total-batch-size", "64", "--val-every", "0", "--sample-every", "0", "--hellaswag-every", "0",
               "--peak-tflops", "1", "--dtype", "float64"]


def train_script(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *TRAIN_FLAGS, *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, **kw)


def test_disk_full_during_a_checkpoint(data_dir, tmp_path):
    """A real process whose files may not grow past half a checkpoint (RLIMIT_FSIZE:
    the kernel's EFBIG, as a full disk's ENOSPC, refuses the write midway)."""
    log = ["--data-dir", data_dir, "--log-dir", str(tmp_path), "--ckpt-every", "2"]
    first = train_script([*log, "--max-steps", "2"])
    assert first.returncode == 0, first.stderr
    size = (tmp_path / "model_00002.npz").stat().st_size

    def limit_file_size():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    r = train_script([*log, "--max-steps", "6", "--resume"], preexec_fn=limit_file_size)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "could not write checkpoint" in lines[0] and "model_00004.npz" in lines[0]
    assert "model_00002.npz is intact" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "model_00002.npz", "run.json"]
    assert load_checkpoint(tmp_path / "model_00002.npz")["meta"]["step"] == 2


# ---- 3. preemption: a real process, signalled ------------------------------------------------


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def train_lines(log_dir):
    return [line for line in (log_dir / "log.txt").read_text().splitlines() if " train " in line]


SIGNAL_RUN = ["--max-steps", "80", "--ckpt-every", "0"]


@pytest.fixture(scope="module")
def never_stopped_log(data_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("never_stopped")
    straight = train_script([*SIGNAL_RUN, "--data-dir", data_dir, "--log-dir", str(log_dir)])
    assert straight.returncode == 0, straight.stderr
    return (log_dir / "log.txt").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_the_resumed_run_equals_one_never_stopped(data_dir, tmp_path, sig,
                                                                           never_stopped_log):
    common = [*SIGNAL_RUN, "--data-dir", data_dir]
    log_dir = tmp_path / "b"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *TRAIN_FLAGS, *common, "--log-dir", str(log_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    wait_for(lambda: (log_dir / "log.txt").exists() and len(train_lines(log_dir)) >= 5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stopped = len(train_lines(log_dir))
    assert 5 <= stopped < 80
    assert f"stopped by {sig.name} after step {stopped - 1} ({stopped} steps done)" in out
    # the thread settings the run had are part of the command that continues it bit for bit
    assert ("Continue with: OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python3 scripts/train.py" in out
            and out.rstrip().endswith("--resume"))
    assert checkpoint.list_checkpoints(log_dir) == [str(log_dir / f"model_{stopped:05d}.npz")]
    resumed = train_script([*common, "--log-dir", str(log_dir), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert (log_dir / "log.txt").read_text() == never_stopped_log


def test_a_second_signal_exits_at_once(data_dir, tmp_path):
    # slow steps (a wider model), so the second signal lands inside the step
    flags = [*TRAIN_FLAGS, "--n-embd", "128", "--block-size", "64", "--batch-size", "8",
             "--total-batch-size", "1024", "--max-steps", "50", "--ckpt-every", "0",
             "--data-dir", data_dir, "--log-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out_path = tmp_path / "stdout.txt"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *flags], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        wait_for(lambda: (tmp_path / "log.txt").exists() and len(train_lines(tmp_path)) >= 1)
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "finishing this step" in out_path.read_text())
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, out_path.read_text()
    assert "SIGINT again: exiting now, without a checkpoint" in out_path.read_text()
    assert checkpoint.list_checkpoints(tmp_path) == []
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_a_hard_exit_during_a_checkpoint_leaves_no_temporary_file(data_dir, tmp_path, monkeypatch):
    """The second Ctrl-C may land while a checkpoint is being written: the handler
    removes the temporary file before os._exit."""
    from nanogpt_np.resilience import StopRequest

    exits = []

    def fake_exit(code):  # what a real os._exit would leave behind: the folder as it is now
        exits.append((code, [n for n in os.listdir(tmp_path) if ".tmp" in n]))

    monkeypatch.setattr("os._exit", fake_exit)
    trainer = Trainer(small(data_dir, tmp_path, max_steps=2), **QUIET)
    trainer.run()
    request = StopRequest(say=lambda msg: None)
    real_savez = np.savez

    def savez_then_second_signal(f, **arrays):
        real_savez(f, **arrays)
        request._handle(signal.SIGINT, None)  # the first one
        request._handle(signal.SIGINT, None)  # the second, mid-write: before the rename

    monkeypatch.setattr(np, "savez", savez_then_second_signal)
    try:
        checkpoint.save_checkpoint(tmp_path / "model_00009.npz", trainer.model, trainer.optimizer, 9,
                                   [trainer.train_loader.state()], trainer.rng.bit_generator.state)
    except Exception:
        pass  # os._exit returned here (patched); the write may go on or fail after it
    assert exits == [(128 + signal.SIGINT, [])]  # at the moment of the exit, no temporary file
