"""A run owns its log directory.

--log-dir holds one run: log.txt, run.json (who the run is), log.png and its
checkpoints. A fresh run into a folder that already holds a run (a log.txt with
lines, or a checkpoint) refuses, naming what is there and the ways on: --resume
to continue that run, --overwrite to replace it, or another --log-dir. Nothing in
the folder is touched until every start-up check has passed (claim() is the first
write); a resumed run keeps its run.json identity and appends to its log.txt.

run.json: {"run_id", "started", "command", "config" (every flag), "data_dir",
"model_config", "parameters", "dtype", "ranks", "total_batch_size", "preset",
"resumed": [{"time", "step", "ranks"}]}. Every checkpoint carries the run_id, so
--resume refuses a checkpoint of another run left in the folder.
"""
import datetime
import json
import os
import uuid

from .. import checkpoint
from ..safetensors_io import atomic_open
from .errors import ConfigError, TrainingStopped

RUN_FILE, LOG_FILE, PLOT_FILE = "run.json", "log.txt", "log.png"
WAYS_ON = "continue it with --resume, replace it with --overwrite, or pick another --log-dir"


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def new_run_id():
    return uuid.uuid4().hex[:12]


def log_summary(log_dir):
    """(lines, first step, last step) of log_dir/log.txt; (0, None, None) if absent or empty."""
    steps = []
    try:
        with open(os.path.join(log_dir, LOG_FILE)) as f:
            for line in f:
                word = line.split()[:1]
                if word:
                    steps.append(int(word[0]) if word[0].isdigit() else None)
    except (OSError, UnicodeDecodeError):
        return 0, None, None
    known = [s for s in steps if s is not None]
    return len(steps), (min(known) if known else None), (max(known) if known else None)


def read_run(log_dir):
    """run.json as a dict; None when absent; {} when unreadable (an unknown run)."""
    path = os.path.join(log_dir, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(log_dir):
    """What of a run log_dir holds, in words, or None when it holds none (no log lines,
    no checkpoint)."""
    lines, first, last = log_summary(log_dir)
    ckpts = [os.path.basename(p) for p in reversed(checkpoint.list_checkpoints(log_dir))]
    if not lines and not ckpts:
        return None
    parts = []
    if lines:
        parts.append(f"log.txt ({lines} lines" + (f", steps {first}-{last})" if last is not None else ")"))
    if ckpts:
        parts.append(f"{len(ckpts)} checkpoint(s) ({ckpts[0] if len(ckpts) == 1 else ckpts[0] + ' .. ' + ckpts[-1]})")
    run = read_run(log_dir)
    if run:
        of = f" of --preset {run['preset']}" if run.get("preset") else ""
        parts.append(f"run {run.get('run_id', '?')}{of} started {run.get('started', '?')}")
    return ", ".join(parts)


def check_fresh_start(cfg):
    """A run without --resume: refuse a --log-dir that is a file, or that holds another
    run, unless --overwrite."""
    if os.path.exists(cfg.log_dir) and not os.path.isdir(cfg.log_dir):
        raise ConfigError(f"--log-dir {cfg.log_dir} is a file; give a folder (it is created if missing)")
    there = describe(cfg.log_dir)
    if there and not cfg.overwrite and not cfg.resume:
        raise ConfigError(f"--log-dir {cfg.log_dir} holds another run: {there}; {WAYS_ON}")


def check_nothing_to_resume(cfg):
    """--resume found no checkpoint: starting from step 0 is right for an empty folder,
    but would throw away the log of a run that never checkpointed."""
    lines, _, _ = log_summary(cfg.log_dir)
    if lines:
        raise ConfigError(f"--resume: {cfg.log_dir} holds no checkpoint to continue, only log.txt with {lines} "
                          "line(s) of a run; start over with --overwrite, or use another --log-dir")


def check_same_run(log_dir, ckpt_path, meta):
    """A checkpoint of another run (another run_id than run.json's) is not this run's."""
    run = read_run(log_dir) or {}
    mine, theirs = run.get("run_id"), meta.get("run_id")
    if mine and theirs and mine != theirs:
        raise ConfigError(f"--resume: {ckpt_path} belongs to run {theirs}, but {log_dir}/run.json is run {mine} "
                          f"(started {run.get('started', '?')}); move the checkpoint away, or start a new run with "
                          "--overwrite or another --log-dir")


def remove_run(log_dir):
    """--overwrite: delete the previous run's files (and only those) -> their names."""
    doomed = [os.path.join(log_dir, n) for n in (LOG_FILE, RUN_FILE, PLOT_FILE)]
    doomed = [p for p in doomed if os.path.exists(p)] + checkpoint.list_checkpoints(log_dir)
    for path in doomed:
        os.remove(path)
    return [os.path.basename(p) for p in doomed]


def claim(log_dir, info, resume_step=None, overwrite=False, log=print):
    """The first write of a run, after every check passed: the folder, run.json, and
    log.txt (a fresh run: empty; a resumed one: kept, less the lines of steps the
    checkpoint does not hold, and appended to from here)."""
    try:
        os.makedirs(log_dir, exist_ok=True)
        if overwrite and (removed := remove_run(log_dir)):
            log(f"--overwrite: removed the previous run's {', '.join(removed)} from {log_dir}")
        log_path = os.path.join(log_dir, LOG_FILE)
        if resume_step is None:
            open(log_path, "w").close()
        else:
            truncate_log(log_path, resume_step)
        with atomic_open(os.path.join(log_dir, RUN_FILE)) as f:  # temporary file, fsync, rename
            f.write(json.dumps(info, indent=1).encode())
    except OSError as e:
        raise TrainingStopped(f"cannot write to --log-dir {log_dir}: {e.strerror or e}; make it writable "
                              "or pick another --log-dir") from e


def truncate_log(path, first_dropped_step):
    """Keep only log.txt lines of steps before `first_dropped_step` (a resumed run
    does those steps again). Left untouched when there is nothing to drop."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.split()[:1] and int(line.split()[0]) < first_dropped_step]
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def run_identity(previous, cfg_dict, resume_step, ranks, **facts):
    """run.json's content: a new identity, or the previous one with this resume added."""
    if previous and resume_step is not None and previous.get("run_id"):
        info = dict(previous)
        info["resumed"] = list(previous.get("resumed", [])) + [{"time": now(), "step": resume_step, "ranks": ranks}]
    else:
        info = {"run_id": new_run_id(), "started": now()}
    info.update(config=cfg_dict, ranks=ranks, **facts)
    return info
