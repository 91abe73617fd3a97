"""Run under `mpiexec -n N` (N = 2 or 3): ZeRO-1 against plain data parallelism.

    zero_ranks.py compare DATA_DIR OUT_DIR    6 float64 steps with --zero 0 and with --zero 1 from the
                                              same start; both save a checkpoint at step 3; rank 0 writes
                                              OUT_DIR/zero.json (losses, parameters, moment slice sizes)
"""
import json
import sys
from pathlib import Path

import numpy as np

from nanogpt_np import distributed
from nanogpt_np.train import Trainer
from tests.mpi.reshard_config import config

mode, data_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dist = distributed.init()
# C=7, V=50307: P = 353,633 parameters, which neither 2 nor 3 ranks divide evenly
shape = dict(n_layer=2, n_head=1, n_embd=7, vocab_size=50307, max_steps=6, ckpt_every=3, keep_last=0,
             total_batch_size=16 * 2 * 6, batch_size=2)
runs = {}
for zero in (0, 1):
    trainer = Trainer(config(data_dir, out / f"zero{zero}", zero=zero, **shape), dist=dist, log=lambda *a, **k: None)
    history = trainer.run()
    runs[zero] = dict(losses=[history["train"][s] for s in range(6)], params=trainer.model.flat_params.copy(),
                      moments=int(trainer.optimizer.exp_avg.size), total=int(trainer.model.flat_params.size))
sizes = dist.allgather_json(runs[1]["moments"])
if dist.is_master:
    diff = float(np.abs(runs[1]["params"] - runs[0]["params"]).max() / np.abs(runs[0]["params"]).max())
    (out / "zero.json").write_text(json.dumps(dict(
        losses0=runs[0]["losses"], losses1=runs[1]["losses"], param_rel_diff=diff, moment_sizes=sizes,
        total=runs[0]["total"], moments_without_zero=runs[0]["moments"])))
