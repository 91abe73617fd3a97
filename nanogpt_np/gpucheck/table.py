"""The table every section adds its rows to, and the helpers the rows share."""
import gc
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from nanogpt_np import backend

from . import settings

ROWS = []


# ---- the table --------------------------------------------------------------------------

def record(section, name, fn):
    """Run fn() -> dict(result=str, limit=str, ok=bool or None); print and keep the row."""
    t0 = time.time()
    try:
        row = fn()
    except Exception as e:  # one failing check must not hide the others
        detail = "".join(traceback.format_exception_only(type(e), e)).strip().replace("\n", " | ")
        row = dict(result=f"ERROR {detail[:300]}", limit="", ok=False)
    row = dict(section=section, name=name, seconds=round(time.time() - t0, 1), **row)
    row["status"] = {True: "ok", False: "FAIL", None: "info"}[row.get("ok")]
    add_row(row)
    print(f"[{time.time() - settings.START:6.1f}s] {section} {name}: {row['result']} {row['status']}", flush=True)
    return row


def add_row(row):
    ROWS.append(row)
    path = os.environ.get(settings.ROWS_ENV)
    if path:  # a section process: the parent reads the rows back
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    save()  # after every row: a run cut short still leaves what it measured


def all_rows():
    path = os.environ.get(settings.ROWS_ENV)
    if path and os.path.exists(path):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    return list(ROWS)


def save():
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        rows = all_rows()
        (Path(out) / "gpu_check.txt").write_text(table(rows) + "\n")
        (Path(out) / "gpu_check.json").write_text(json.dumps(rows, indent=1) + "\n")


class TimeLimit(Exception):
    pass


def with_time_limit(seconds, fn):
    """fn() or TimeLimit after `seconds` (SIGALRM; the main thread only)."""
    def on_alarm(signum, frame):
        raise TimeLimit(f"stopped after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def table(rows=None):
    rows = all_rows() if rows is None else rows
    lines = [f"{'#':<3} {'check':<44} {'result':<58} {'limit':<10} {'status':<6} {'s':>5}"]
    for r in sorted(rows, key=lambda r: r["section"]):  # stable: rows of a section keep their order
        lines.append(f"{r['section']:<3} {r['name'][:44]:<44} {r['result'][:400]:<58} {r['limit']:<10} "
                     f"{r['status']:<6} {r['seconds']:>5}")
    failed = sum(r["status"] == "FAIL" for r in rows)
    lines.append(f"{len(rows)} rows, {failed} failed, {time.time() - settings.START:.0f}s")
    return "\n".join(lines)


def rel_err(actual, expected):
    actual = np.asarray(backend.to_host(actual)).astype(np.float64)
    expected = np.asarray(backend.to_host(expected)).astype(np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max(initial=0.0) / max(np.abs(expected).max(initial=0.0), 1e-30))


def compare(errors, limit):
    """errors: {what: relative error} -> a row judged by the worst."""
    worst = max(errors, key=errors.get)
    text = " ".join(f"{k} {v:.1e}" for k, v in errors.items())
    return dict(result=f"max {errors[worst]:.2e} ({text})", limit=f"{limit:.0e}", ok=errors[worst] <= limit)


def free_gpu_memory():
    import cupy

    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def bf16():
    return backend.bfloat16()


def to_bf16(cp, a):
    """A host float array as a bf16 CuPy array (rounded on the host by ml_dtypes)."""
    return cp.asarray(np.asarray(a, dtype=np.float32).astype(bf16()))


def host_f64(a):
    """A host float64 copy of a NumPy or CuPy array of any float dtype, bf16 included."""
    return np.asarray(backend.to_host(a)).astype(np.float64)


def median_ms(fn, sync, reps=10, warmup=2):
    """Median milliseconds of `reps` timed calls after `warmup` untimed ones (both capped
    by SIZES["timing_reps"] where set: the CPU dry run proves the rows, not the times)."""
    cap = settings.SIZES.get("timing_reps")
    if cap:
        reps, warmup = min(reps, cap), min(warmup, 1)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))
