"""Run under `mpiexec -n 2`: rank 1 raises while rank 0 waits in a collective."""
import numpy as np

from nanogpt_np import distributed

d = distributed.init()
if d.rank == 1:
    raise RuntimeError("simulated failure on this rank")
d.allreduce_sum_(np.zeros(3))  # would hang forever without the abort
