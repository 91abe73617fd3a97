#!/usr/bin/env python3
"""What the collective watchdog costs a training step, measured in one MPI job.

    OMP_NUM_THREADS=1 mpiexec -n 2 python3 scripts/bench_watchdog.py [--rounds 4 --steps 20]

Two measurements, medians, printed by rank 0:
  1. Training steps of a small model with --collective-timeout 0 (no watchdog thread)
     and 600 (the default), alternating run by run so that a machine that gets busier
     or quieter meets both alike; the ratio of the median step times.
  2. One watched collective against the same MPI call made bare (an 8-number
     allreduce): the bookkeeping every collective pays, watchdog or not.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from nanogpt_np import distributed  # noqa: E402
from nanogpt_np.train import TrainConfig, Trainer  # noqa: E402


def step_times(dist, data_dir, log_dir, timeout, steps):
    cfg = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=2, total_batch_size=None,
                      max_steps=steps, warmup_steps=2, val_every=0, sample_every=0, ckpt_every=0,
                      hellaswag_every=0, peak_tflops=1.0, data_dir=data_dir, log_dir=log_dir,
                      collective_timeout=timeout, straggler_every=0)
    trainer = Trainer(cfg, dist=dist, log=lambda *a, **k: None)
    times, real = [], trainer.train_one_step

    def timed(step):
        t0 = time.perf_counter()
        result = real(step)
        times.append(time.perf_counter() - t0)
        return result

    trainer.train_one_step = timed
    trainer.run()
    return times[2:]  # the first steps warm up


def collective_cost(dist, repeats=2000):
    """Median seconds of a bare 8-number Allreduce and of the same through the watch."""
    buf, MPI = np.zeros(8), dist.MPI
    bare, watched = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dist.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        t1 = time.perf_counter()
        with dist.watch.collective("allreduce"):
            dist.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        t2 = time.perf_counter()
        bare.append(t1 - t0)
        watched.append(t2 - t1)
    return statistics.median(bare), statistics.median(watched)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="runs of each setting, alternating")
    p.add_argument("--steps", type=int, default=20, help="steps per run")
    args = p.parse_args()
    dist = distributed.init()
    if dist.world_size < 2:
        sys.exit("run under mpiexec -n 2 (or more): the watchdog watches collectives between ranks")
    with tempfile.TemporaryDirectory() as tmp:
        times = {0: [], 600: []}
        for r in range(args.rounds):
            for timeout in ((0, 600) if r % 2 == 0 else (600, 0)):
                log_dir = dist.allgather_json(os.path.join(tmp, f"run{r}_{timeout}"))[0]
                times[timeout] += step_times(dist, None, log_dir, timeout, args.steps)
    bare, watched = collective_cost(dist)
    if dist.is_master:
        off, on = (1000 * statistics.median(times[t]) for t in (0, 600))
        print(f"{dist.world_size} ranks, {args.rounds} runs x {args.steps} steps each, alternating; median step:")
        print(f"  --collective-timeout 0 (no watchdog)   {off:8.2f} ms")
        print(f"  --collective-timeout 600 (watchdog)    {on:8.2f} ms   ratio {on / off:.3f}")
        print(f"one 8-number allreduce: bare {1e6 * bare:.1f} us, watched {1e6 * watched:.1f} us "
              f"(+{1e6 * (watched - bare):.1f} us per collective; a step makes 2)")


if __name__ == "__main__":
    main()
