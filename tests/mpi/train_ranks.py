"""Run under `mpiexec -n 2`: the training loop on two ranks.

    train_ranks.py equivalence DATA_DIR OUT_DIR   5 float64 steps; losses and each rank's weights to OUT_DIR
    train_ranks.py resume DATA_DIR OUT_DIR        8 steps straight vs 4, stop, resume, 4 more
    train_ranks.py fail DATA_DIR OUT_DIR          rank 1's loader fails at its second batch, inside main()
"""
import json
import sys
from pathlib import Path

import numpy as np

from nanogpt_np import distributed
from nanogpt_np.train import Trainer
from tests.mpi.reshard_config import config as small_run_config

mode, data_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dist = distributed.init()
assert dist.world_size == 2


def config(log_dir, **kw):
    return small_run_config(data_dir, log_dir, **{"max_steps": 5, **kw})


def quiet(*args, **kwargs):
    pass


if mode == "equivalence":
    trainer = Trainer(config(out / "log"), dist=dist, log=quiet)
    assert trainer.accum == 1  # 64 tokens = 2 ranks x B=2 x T=16
    history = trainer.run()
    np.save(out / f"params_rank{dist.rank}.npy", trainer.model.flat_params)
    if dist.is_master:
        (out / "losses.json").write_text(json.dumps([history["train"][s] for s in range(5)]))

elif mode == "resume":
    kw = dict(max_steps=8, val_every=3, sample_every=3, ckpt_every=4, num_samples=1, sample_tokens=3,
              dtype="float32", shuffle=True)
    straight = Trainer(config(out / "a", **kw), dist=dist, log=quiet)
    h_straight = straight.run()
    Trainer(config(out / "b", **kw), dist=dist, log=quiet).run(stop_at=4)
    resumed = Trainer(config(out / "b", resume=True, **kw), dist=dist, log=quiet)
    h_resumed = resumed.run()
    assert resumed.model is not straight.model
    assert np.array_equal(resumed.model.flat_params, straight.model.flat_params), "weights differ"
    assert np.array_equal(resumed.optimizer.exp_avg_sq, straight.optimizer.exp_avg_sq)
    for s in range(4, 8):
        assert h_resumed["train"][s] == h_straight["train"][s], (s, h_resumed["train"][s], h_straight["train"][s])
    if dist.is_master:
        # the same lines, but for the ranks' step times (`{step} ranks ...`), which differ from run to run
        a, b = ([line for line in (out / d / "log.txt").read_text().splitlines() if " ranks " not in line]
                for d in ("a", "b"))
        assert a == b
        (out / "resume_ok").write_text("ok")

elif mode == "fail":
    from nanogpt_np import data, train

    if dist.rank == 1:
        real = data.DataLoader.next_batch
        calls = []

        def failing_next_batch(self):
            calls.append(1)
            if len(calls) == 2:
                raise data.DataError("shard edu_train_000007.npy is truncated (simulated on rank 1)")
            return real(self)

        data.DataLoader.next_batch = failing_next_batch
    argv = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
            "--total-batch-size", "64", "--max-steps", "50", "--val-every", "0", "--sample-every", "0",
            "--ckpt-every", "0", "--hellaswag-every", "0", "--peak-tflops", "1", "--data-dir", data_dir,
            "--log-dir", str(out / "log")]
    sys.exit(train.main(argv))
