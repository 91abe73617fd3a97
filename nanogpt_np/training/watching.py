"""Several ranks (WatchingMixin of Trainer): the collective watchdog, the checkpoint
it writes when a rank stalls, and the slow-rank report. nanogpt_np/watchdog.py has
the mechanism; this is what the trainer keeps for it.

What a stall checkpoint can hold. The watchdog fires while this rank's main thread
waits in a collective (and stops it at the next collective boundary, so nothing
moves while it writes). AdamW changes the weights and moments only after the last
collective of a step (without ZeRO), so while any collective of step s is open,
the weights, the moments and AdamW's step count are still those after step s-1;
the loader has moved on, and the sampling RNG and the guard may have, so those
three are kept at the end of every step (`remember_completed_step`: a few small
dicts). Every rank holds the same weights and moments, and the ranks' loader
states differ only in their rank, so one rank can write the whole checkpoint.
Under --zero 1 each rank holds only its slice of the moments: no stall checkpoint.
"""
import contextlib
import os
import time

import numpy as np

from .. import checkpoint
from ..distributed import report_failure
from ..watchdog import RECORD_DIR, CollectiveWatchdog, straggler_report
from .errors import ConfigError

WRITER_GRACE_SECONDS = 120  # how long the other ranks give the writer to checkpoint and end the job


def end_job_on_stall(dist, save, continue_with):
    """The watchdog's on_stall for a training run: the lowest rank still waiting
    (`writer`) saves the last completed step (save(stall) -> a phrase saying what was
    saved) and ends the job with one line, `continue_with` the command that resumes;
    the other waiting ranks leave it to the writer's MPI_Abort and speak only if the
    writer has not ended the job after WRITER_GRACE_SECONDS."""

    def on_stall(stall):
        writer = stall.healthy[0] if stall.healthy else stall.rank
        if stall.rank != writer:
            time.sleep(WRITER_GRACE_SECONDS)
            report_failure(dist, f"{stall.describe()}; rank {writer}, which was to checkpoint and end the job, "
                                 "did not; resume from the latest checkpoint with --resume", speaker=True)
            return
        try:
            saved = save(stall)
        except Exception as e:  # a failed write must not keep the job alive
            saved = f"no checkpoint written ({type(e).__name__}: {e})"
        report_failure(dist, f"{stall.describe()}; {saved}. Continue with: {continue_with}", speaker=True)

    return on_stall


class WatchingMixin:
    """Reads self.cfg, self.dist, self.model, self.optimizer, self.train_loader, self.rng,
    self.guard, self.step; sets self.completed."""

    def watching(self):
        """A context running the watchdog thread (several ranks, --collective-timeout > 0)."""
        self.completed, self.busy = None, []
        self._mark = (time.perf_counter(), 0.0, None)
        watch, timeout = self.dist.watch, self.cfg.collective_timeout
        if watch is None or timeout <= 0:
            return contextlib.nullcontext()
        on_stall = end_job_on_stall(self.dist, self.save_after_stall, self.continue_with)
        try:
            return CollectiveWatchdog(watch, os.path.join(self.cfg.log_dir, RECORD_DIR), self.dist.rank,
                                      self.dist.world_size, timeout, on_stall)
        except OSError as e:
            raise ConfigError(f"cannot write the watchdog's records in --log-dir {self.cfg.log_dir}: "
                              f"{e.strerror or e}") from e

    # the command that resumes this run (scripts/train.py's main sets it from its command line)
    continue_with = "the same command plus --resume"

    def watch_at(self, step, phase):
        """Where the loop is, for the watchdog's message; a training step also starts
        the clock of this rank's own work (the step's time minus its collectives)."""
        watch = self.dist.watch
        if watch is not None:
            watch.at(step, phase)
            self._mark = (time.perf_counter(), watch.blocked, phase)

    def remember_completed_step(self):
        """The state after self.step steps that the weights do not carry (see the module doc)."""
        self.completed = {"step": self.step, "loader": self.train_loader.state(),
                          "rng": self.rng.bit_generator.state, "guard": self.guard.state()}
        watch, (t0, blocked0, phase) = self.dist.watch, self._mark
        if watch is None or phase != "training step":
            return
        gpu, watch.gpu_work = watch.gpu_work, None
        if gpu is not None:  # NCCL: the GPU time of forward and backward, before the wait for the sums
            self.busy.append(self.xp.cuda.get_elapsed_time(*gpu) / 1000)
        else:  # the host waits inside the collectives: the step's time less that
            self.busy.append((time.perf_counter() - t0) - (watch.blocked - blocked0))

    def save_after_stall(self, stall):
        """On the watchdog thread: the checkpoint of the last completed step -> what was saved."""
        done, cfg = self.completed, self.cfg
        latest = checkpoint.latest_checkpoint(cfg.log_dir)
        previous = f"the latest checkpoint is {latest}" if latest else "there is no checkpoint yet"
        if cfg.zero:
            return (f"no checkpoint written: under --zero 1 the stalled rank holds part of AdamW's moments; "
                    f"{previous}")
        if done is None or done["step"] == self.started_at:
            return f"no step completed since the start, nothing new to save; {previous}"
        path = checkpoint.checkpoint_path(cfg.log_dir, done["step"])
        if self.last_saved == done["step"]:
            return f"checkpoint {path} holds the {done['step']} completed steps"
        states = [dict(done["loader"], rank=r) for r in range(self.dist.world_size)]
        with self._off_the_stuck_stream():
            self.write_checkpoint(path, done["step"], states, done["rng"], done["guard"])
        checkpoint.prune_checkpoints(cfg.log_dir, cfg.keep_last, keep=[path])
        return f"checkpoint {path} holds the {done['step']} completed steps (written by rank {self.dist.rank})"

    def _off_the_stuck_stream(self):
        """On a GPU the stalled collective blocks its stream; copying the weights to the
        host on a stream of their own does not queue behind it."""
        if self.xp is np:
            return contextlib.nullcontext()
        cuda = self.xp.cuda
        cuda.Device(self.dist.local_rank % cuda.runtime.getDeviceCount()).use()
        return cuda.Stream(non_blocking=True)

    def report_stragglers(self, step):
        """Every --straggler-every steps and at the last step: the ranks' own step times
        (one allreduce); rank 0 logs them and prints the slowest when it lags."""
        every, ranks = self.cfg.straggler_every, self.dist.world_size
        last = step == self.cfg.max_steps - 1
        if not every or ranks == 1 or not self.busy or not ((step + 1) % every == 0 or last):
            return
        mine = [0.0] * ranks
        mine[self.dist.rank] = 1000 * sum(self.busy) / len(self.busy)
        self.busy = []
        busy_ms = self.dist.allreduce_scalars(mine, name="step-time allreduce")
        line, message = straggler_report(step, busy_ms)
        self.append_log(line)
        if message:
            self.log(message)
