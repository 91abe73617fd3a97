"""Guards that let a long run survive bad steps and preemption.

Three pieces, each small enough to test on its own, used by train.Trainer:

StepGuard decides, after the gradients of a step are summed over ranks and before
AdamW touches anything, whether the step is applied:
  - a loss or gradient norm that is NaN or Inf skips the step: no AdamW update, the
    moments and AdamW's step count untouched (the batch is still consumed and the
    lr schedule still advances, as in llm.c). After `max_bad_steps` non-finite steps
    in a row the run stops (the trainer checkpoints the last good weights first).
  - with `skip_zscore` > 0, a loss or norm more than that many standard deviations
    above its recent values (SpikeDetector) skips the step too.
  Every rank reaches the same decision with no extra communication: the loss is the
  mean from the allreduce of the step, and the norm is computed from the gradients
  after their allreduce, the same bytes on every rank. A NaN on one rank reaches
  all of them through that allreduce.

SpikeDetector keeps the last `window` accepted values and their mean and variance
(as llm.c's outlier detector). A new value's z-score is measured against the values
before it, so a spike does not widen the spread that judges it; skipped values are
not added. It stays silent until it holds `min_count` values.

StopRequest turns SIGTERM and SIGINT (Ctrl-C) into a flag that the training loop
reads once per step (through the same allreduce, so all ranks stop after the same
step). A second signal exits at once, without a checkpoint.
"""
import math
import os
import signal
import sys
import threading
from collections import deque

SPIKE_WINDOW = 128  # values kept, as llm.c's outlier detector
SPIKE_MIN_COUNT = 16  # values needed before a z-score is trusted


class SpikeDetector:
    """Running mean and variance of the last `window` values; z-scores of new ones."""

    def __init__(self, window=SPIKE_WINDOW, min_count=SPIKE_MIN_COUNT):
        self.window, self.min_count = int(window), int(min_count)
        self.values = deque(maxlen=self.window)

    def zscore(self, x):
        """How many standard deviations x lies above the kept values (nan: too few yet)."""
        n = len(self.values)
        if n < self.min_count or not math.isfinite(x):
            return float("nan")
        mean = sum(self.values) / n
        var = sum((v - mean) ** 2 for v in self.values) / n
        if var <= 0.0:
            return 0.0 if x == mean else math.copysign(float("inf"), x - mean)
        return (x - mean) / math.sqrt(var)

    def push(self, x):
        self.values.append(float(x))

    def state(self):
        return list(self.values)

    def load_state(self, values):
        self.values = deque((float(v) for v in values), maxlen=self.window)


class StepGuard:
    """apply-or-skip for each step; see the module docstring."""

    def __init__(self, max_bad_steps=5, skip_zscore=0.0):
        self.max_bad_steps, self.skip_zscore = int(max_bad_steps), float(skip_zscore)
        self.loss_stats, self.norm_stats = SpikeDetector(), SpikeDetector()
        self.bad_in_row = 0  # non-finite steps since the last applied one
        self.skipped = 0  # steps skipped in this process, of either kind

    def judge(self, loss, norm):
        """None if the step may be applied, else the reason it is skipped (one line)."""
        bad = [f"{name} {value}" for name, value in (("loss", loss), ("grad norm", norm))
               if not math.isfinite(value)]
        if bad:
            self.bad_in_row += 1
            self.skipped += 1
            return " and ".join(bad) + f" (non-finite; {self.bad_in_row} in a row)"
        self.bad_in_row = 0
        if self.skip_zscore > 0:
            spikes = [f"{name} {value:.4g} (z-score {z:.1f} > {self.skip_zscore:g})"
                      for name, value, stats in (("loss", loss, self.loss_stats),
                                                  ("grad norm", norm, self.norm_stats))
                      if (z := stats.zscore(value)) > self.skip_zscore]
            if spikes:
                self.skipped += 1
                return "spike: " + " and ".join(spikes)
        self.loss_stats.push(loss)
        self.norm_stats.push(norm)
        return None

    @property
    def must_stop(self):
        return self._too_many(self.bad_in_row)

    def _too_many(self, bad_in_row):
        return self.max_bad_steps > 0 and bad_in_row >= self.max_bad_steps

    def state(self):
        return {"loss": self.loss_stats.state(), "norm": self.norm_stats.state(),
                "bad_in_row": self.bad_in_row}

    def load_state(self, state):
        self.loss_stats.load_state(state.get("loss", []))
        self.norm_stats.load_state(state.get("norm", []))
        # a run stopped for bad steps is resumed to try again (with other flags,
        # usually): it starts with a clean count
        bad = int(state.get("bad_in_row", 0))
        self.bad_in_row = 0 if self._too_many(bad) else bad


class StopRequest:
    """SIGTERM / SIGINT -> a flag; a second signal exits the process at once.

    Use as a context manager around the loop; the previous handlers come back on
    exit. Outside the main thread (where Python refuses signal handlers) it is a
    flag that nothing sets."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, say=None):
        self.signal_name = None
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._previous = {}

    @property
    def requested(self):
        return self.signal_name is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            self.say(f"{name} again: exiting now, without a checkpoint")
            from .checkpoint import remove_partial_writes

            remove_partial_writes()  # a checkpoint cut off mid-write leaves no temporary file
            os._exit(128 + signum)
        self.signal_name = name
        self.say(f"{name}: finishing this step, then a checkpoint and exit "
                 f"({name} again to exit at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
