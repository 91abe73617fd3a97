"""A rank that stalls ends the job, and says which rank it was.

A rank that dies ends an MPI job at once (the launcher kills the rest). A rank that
*stalls* does not: a stopped process, a hung GPU, a stuck filesystem read or a
paused VM leaves every other rank waiting in the next collective, forever. So every
rank runs a watchdog thread (`--collective-timeout SECONDS`, default 600, 0 off):

  - Every collective (allreduce, reduce-scatter, allgather, broadcast, barrier, the
    NCCL gradient buckets) goes through `CollectiveWatch.collective(name)`, which
    notes on the main thread the collective's number, name and start time: a few
    attribute writes, no system call.
  - The watchdog thread publishes that note, with a heartbeat, to a small file of its
    own, `<log dir>/watchdog/rank_<r>`, several times per timeout. It needs nothing
    from the other ranks, so a stalled rank cannot stop it. (Several machines: the
    log dir must be shared, as it already is for --resume.)
  - When a collective has not completed after the timeout, the thread reads every
    rank's file. A rank whose last collective is an earlier one never arrived: it
    is alive but busy outside the collective (its heartbeat is fresh), or it is not
    responding at all (its heartbeat stopped: SIGSTOP, a hung driver, a dead node).
  - The lowest rank still waiting writes the checkpoint of the last completed step
    (the trainer's `save_after_stall`) and ends the job with one `error:` line
    (distributed.report_failure) naming the step, the collective, the missing ranks
    and the command that resumes; MPI_Abort then stops every rank.

On GPUs an NCCL call returns before the collective has run: the collective stays
open until a CUDA event recorded after it has completed, which the watchdog thread
polls (`leave_when`), so a hung NCCL allreduce is caught the same way.

The same note gives each rank's time blocked in collectives; a step's time minus
that is the rank's own work, which `straggler_report` compares across ranks.
"""
import os
import statistics
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

RECORD_DIR = "watchdog"
# magic, pid, seq, step, entered (wall time), left seq, heartbeat (wall time), name, phase, seq again
RECORD = struct.Struct("<iiqqdqd48s24sq")
MAGIC = 0x57444F47  # "WDOG"
STRAGGLER_THRESHOLD = 0.2  # report the slowest rank when it is this much slower than the median


def heartbeat_period(timeout):
    """How often the thread checks and publishes: a small fraction of the timeout."""
    return min(1.0, max(0.05, timeout / 20))


def stale_after(timeout):
    """A heartbeat older than this: the rank's process is not running."""
    return 5 * heartbeat_period(timeout) + 1.0


def record_path(folder, rank):
    return os.path.join(folder, f"rank_{rank}")


# ---- the main thread's side: which collective this rank is in --------------------------------


class CollectiveWatch:
    """What this rank is doing, as far as collectives go. Lives on MPIDistributed; the
    watchdog thread (if any) reads it. The main thread writes the fields; the thread
    only drains `pending` of the GPU collectives that have completed."""

    def __init__(self):
        self.seq = 0  # collectives entered so far
        self.step, self.phase = -1, "start-up"
        # (seq, name, step, phase, wall time entered, monotonic time entered), while one is open on the host
        self.current = None
        self.last = None  # the same of the last collective entered
        self.left = 0  # seq of the last collective known complete
        self.pending = deque()  # GPU collectives queued, not yet known complete: (*current, done)
        self.blocked = 0.0  # seconds the host spent inside collectives
        self.gpu_work = None  # GPU: (event, event) around this step's forward/backward (stragglers)
        self.watched = False  # a watchdog thread polls `pending` (else asynchronous ones count as done)
        self.halted = threading.Event()  # set by the watchdog: the main thread must not go on

    def at(self, step, phase):
        """The trainer says where it is (shown when a collective stalls)."""
        self.step, self.phase = step, phase

    def collective(self, name, completion=None):
        """Context manager around one collective. completion: for asynchronous (NCCL)
        collectives, a callable made after the call returns, giving done() -> bool."""
        return _Collective(self, name, completion)

    def _enter(self, name):
        if self.halted.is_set():
            self._freeze()
        self.seq += 1
        self.current = self.last = (self.seq, name, self.step, self.phase, time.time(), time.monotonic())
        return self.seq

    def _leave(self, seq, done=None):
        if done is None or not self.watched:
            self.left = seq
        else:
            self.pending.append((*self.current, done))
        self.current = None
        if self.halted.is_set():  # the watchdog fired: the state it saves must not change now
            self._freeze()

    def _freeze(self):
        while True:  # until MPI_Abort ends the process
            time.sleep(3600)

    def oldest_open(self):
        """`current`'s tuple of the oldest collective not yet complete, or None."""
        while self.pending and self.pending[0][6]():  # completed GPU collectives
            self.left = max(self.left, self.pending.popleft()[0])
        if self.pending:
            return self.pending[0][:6]
        return self.current


class _Collective:
    __slots__ = ("watch", "name", "completion", "seq", "t0")

    def __init__(self, watch, name, completion):
        self.watch, self.name, self.completion = watch, name, completion

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.seq = self.watch._enter(self.name)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.watch.blocked += time.perf_counter() - self.t0
        watched = self.completion is not None and self.watch.watched and exc_type is None
        done = self.completion() if watched else None
        self.watch._leave(self.seq, done)
        return False


# ---- the side channel: one small file per rank ----------------------------------------------


@dataclass
class Record:
    rank: int
    pid: int
    seq: int  # collectives entered
    step: int
    entered: float  # wall time the last collective was entered
    left: int  # seq of the last collective completed
    heartbeat: float
    name: str
    phase: str


def _text(raw, size):
    return raw.encode()[:size]


def write_record(path, rank, watch, heartbeat):
    """This rank's state, written whole (one pwrite of a fixed-size record)."""
    seq, name, step, phase, entered = (watch.last or (0, "", watch.step, watch.phase, 0.0))[:5]
    data = RECORD.pack(MAGIC, os.getpid(), seq, step, entered, watch.left, heartbeat,
                       _text(name, 48), _text(phase, 24), seq)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def read_record(path, rank):
    """The Record in `path`, or None when it is missing or caught mid-write."""
    for _ in range(3):
        try:
            with open(path, "rb") as f:
                data = f.read(RECORD.size)
        except OSError:
            return None
        if len(data) != RECORD.size:
            return None
        magic, pid, seq, step, entered, left, beat, name, phase, seq2 = RECORD.unpack(data)
        if magic == MAGIC and seq == seq2:
            return Record(rank, pid, seq, step, entered, left, beat,
                          name.rstrip(b"\0").decode(errors="replace"), phase.rstrip(b"\0").decode(errors="replace"))
        time.sleep(0.01)
    return None


def read_records(folder, world_size):
    """{rank: Record or None} for every rank."""
    return {r: read_record(record_path(folder, r), r) for r in range(world_size)}


# ---- the diagnosis --------------------------------------------------------------------------


@dataclass
class Stall:
    """A collective that did not complete in time, as one rank saw it."""

    rank: int  # the rank that saw it
    world_size: int
    seq: int
    name: str
    step: int
    phase: str
    waited: float
    timeout: float
    missing: dict = field(default_factory=dict)  # rank -> why it counts as missing
    unknown: list = field(default_factory=list)  # ranks with no readable record

    @property
    def healthy(self):
        """The ranks not missing (waiting in the collective, or without a record)."""
        return sorted(set(range(self.world_size)) - set(self.missing))

    def describe(self):
        """One line: the step, the collective, who never arrived."""
        where = f"the {self.name} of step {self.step}" + (f" ({self.phase})" if self.phase else "")
        text = (f"collective timeout: {where} did not complete in {self.waited:.1f} s "
                f"(--collective-timeout {self.timeout:g})")
        if self.missing:
            who = "; ".join(f"rank {r} {why}" for r, why in sorted(self.missing.items()))
            text += f": {who}"
        else:
            text += ": every rank entered it and none finished it (the network or NCCL itself is stuck)"
        if self.unknown:
            text += (f"; no record from rank(s) {', '.join(map(str, self.unknown))} "
                     "(is --log-dir on a filesystem every node shares?)")
        return text


def diagnose(open_collective, records, my_rank, timeout, now=None):
    """Stall from this rank's open collective and every rank's Record."""
    now = time.time() if now is None else now
    seq, name, step, phase, entered = open_collective[:5]
    stall = Stall(my_rank, len(records), seq, name, step, phase, now - entered, timeout)
    for r, rec in records.items():
        if r == my_rank:
            continue
        if rec is None:
            stall.unknown.append(r)
            continue
        last = f"{rec.name or 'collective'} of step {rec.step}" if rec.seq else "none yet"
        if now - rec.heartbeat > stale_after(timeout):
            arrived = "" if rec.seq < seq else f", inside the {rec.name}"
            stall.missing[r] = (f"is not responding (pid {rec.pid}, no heartbeat for {now - rec.heartbeat:.1f} s"
                                f"{arrived}: stopped, hung, or its machine is gone)")
        elif rec.seq < seq:
            since = f", {now - rec.entered:.1f} s ago" if rec.entered else ""
            stall.missing[r] = (f"never arrived (pid {rec.pid} is alive; its last collective: {last}{since}; "
                                "busy outside any collective: slow I/O, a long computation, or a deadlock)")
    return stall


# ---- the thread ---------------------------------------------------------------------------


class CollectiveWatchdog:
    """The watchdog thread of one rank. on_stall(stall) is called once, on the thread,
    with the main thread frozen at its next collective boundary."""

    def __init__(self, watch, folder, rank, world_size, timeout, on_stall):
        self.watch, self.folder, self.rank, self.world_size = watch, folder, rank, world_size
        self.timeout, self.on_stall = float(timeout), on_stall
        self.period = heartbeat_period(self.timeout)
        self.exit = os._exit  # how this rank ends if on_stall returns (a test replaces it)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collective-watchdog", daemon=True)
        os.makedirs(folder, exist_ok=True)
        self.path = record_path(folder, rank)
        write_record(self.path, rank, watch, time.time())

    def start(self):
        self.watch.watched = True
        self._thread.start()
        return self

    def close(self):
        """Stop the thread (the run ended normally) and remove this rank's record."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.watch.watched = False
        self.watch.pending.clear()
        for remove, path in ((os.remove, self.path), (os.rmdir, self.folder)):
            try:
                remove(path)
            except OSError:
                pass  # the last rank out removes the folder

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if not self.watch.halted.is_set():
            self.close()
        return False

    def _run(self):
        try:
            while not self._stop.wait(self.period):
                write_record(self.path, self.rank, self.watch, time.time())
                open_collective = self.watch.oldest_open()
                if open_collective and time.monotonic() - open_collective[5] > self.timeout:  # no clock jumps
                    self._fire(open_collective)
                    return
        except Exception as e:  # a full disk, a CUDA error: say so rather than vanish
            print(f"warning: rank {self.rank}: the collective watchdog stopped ({type(e).__name__}: {e}); "
                  "a stalled collective will not be noticed", file=sys.stderr, flush=True)

    def _fire(self, open_collective):
        """Name the missing ranks (waiting a little longer while none can be named yet:
        a rank stopped a moment ago still has a fresh heartbeat), then hand over."""
        self.watch.halted.set()
        deadline = time.time() + stale_after(self.timeout)
        while True:
            write_record(self.path, self.rank, self.watch, time.time())
            stall = diagnose(open_collective, read_records(self.folder, self.world_size), self.rank, self.timeout)
            if stall.missing or time.time() > deadline:
                break
            time.sleep(self.period)
        try:
            self.on_stall(stall)
        finally:
            self.exit(1)  # on_stall ends the job; if it returns or raises, this rank still ends


# ---- stragglers ---------------------------------------------------------------------------


def straggler_report(step, busy_ms):
    """busy_ms: each rank's mean time per step outside collectives over the last steps.
    -> (the log.txt line, the message to print or None when no rank is >20% slower)."""
    median = statistics.median(busy_ms)
    slowest = max(range(len(busy_ms)), key=lambda r: busy_ms[r])
    line = (f"{step} ranks median_ms {median:.2f} slowest_rank {slowest} slowest_ms {busy_ms[slowest]:.2f} "
            f"all_ms {','.join(f'{t:.2f}' for t in busy_ms)}")
    excess = busy_ms[slowest] / median - 1 if median > 0 else 0.0
    if excess <= STRAGGLER_THRESHOLD:
        return line, None
    return line, (f"slow rank: rank {slowest} took {busy_ms[slowest]:.1f} ms per step outside collectives "
                  f"against a median of {median:.1f} ms (+{100 * excess:.0f}%) up to step {step}; "
                  "every rank waits for it at each allreduce")

