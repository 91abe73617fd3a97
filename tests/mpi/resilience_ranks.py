"""Run under `mpiexec -n N`: the step guard and resharded resume on several ranks.

    resilience_ranks.py nan DATA_DIR OUT_DIR      rank 1's gradient is NaN at step 3; every rank skips it
    resilience_ranks.py part DATA_DIR OUT_DIR A B steps A..B of a 20-step run in OUT_DIR/log (resuming
                                                  when A > 0), checkpoint at B; each rank's reads to
                                                  OUT_DIR/reads_<A>_rank<r>.json
"""
import json
import sys
from pathlib import Path

import numpy as np

from nanogpt_np import distributed, train
from tests.mpi.reshard_config import config, record_reads

mode, data_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dist = distributed.init()

if mode == "nan":
    # poison this rank's own gradient after its backward, before the sum over ranks
    # (one rank sends its sum after backward on the CPU: OneReduceAfterBackward)
    from nanogpt_np.model import GPT

    real_backward = GPT.backward
    backward_calls = []

    def backward(self, *args, **kwargs):
        grads = real_backward(self, *args, **kwargs)
        backward_calls.append(1)
        if dist.rank == 1 and len(backward_calls) == 4:  # the (only) micro-step of step 3
            self.flat_grads[7] = np.nan
        return grads

    GPT.backward = backward
    trainer = train.Trainer(config(data_dir, out / "log", max_steps=6), dist=dist, log=lambda *a, **k: None)
    snapshots = {}
    real_step = trainer.train_one_step

    def step(k):
        result = real_step(k)
        snapshots[k] = trainer.model.flat_params.copy()
        return result

    trainer.train_one_step = step
    history = trainer.run()
    assert list(history["skipped"]) == [3], history["skipped"]
    assert "grad norm nan" in history["skipped"][3]
    assert np.array_equal(snapshots[2], snapshots[3]), "step 3 changed the weights"
    assert not np.array_equal(snapshots[3], snapshots[4])
    assert trainer.optimizer.step_count == 5
    np.save(out / f"params_rank{dist.rank}.npy", trainer.model.flat_params)
    if dist.is_master:
        assert "3 skipped grad norm nan" in (out / "log" / "log.txt").read_text()

elif mode == "part":
    start, stop = int(sys.argv[4]), int(sys.argv[5])
    trainer = train.Trainer(config(data_dir, out / "log", resume=start > 0, ckpt_every=stop),
                            dist=dist, log=lambda *a, **k: None)
    reads = record_reads(trainer.train_loader)
    trainer.run(stop_at=stop)
    assert trainer.step == stop
    result = {"reads": reads, "accum": trainer.accum, "tokens": trainer.train_loader.tokens_read,
              "losses": {str(k): v for k, v in trainer.history["train"].items()}}
    (out / f"reads_{start}_rank{dist.rank}.json").write_text(json.dumps(result))
else:
    sys.exit(f"unknown mode {mode}")
