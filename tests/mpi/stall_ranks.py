"""Run under `mpiexec -n N`: scripts/train.py's main(), with one rank stalling inside a step.

    stall_ranks.py RANK CALL SECONDS OUT_FILE -- TRAIN_FLAGS...

Rank RANK sleeps SECONDS at its CALL-th training batch (inside the step, before the
gradient allreduce), after writing the wall time it fell asleep to OUT_FILE: a rank
busy outside any collective, as a slow filesystem read or a stuck data worker is.
"""
import sys
import time

from mpi4py import MPI

from nanogpt_np import data, train

rank, call, seconds, out_file = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
argv = sys.argv[sys.argv.index("--") + 1:]

if MPI.COMM_WORLD.Get_rank() == rank:
    real, calls = data.DataLoader.next_batch, []

    def next_batch(self):
        if self.split == "train":
            calls.append(1)
            if len(calls) == call:
                with open(out_file, "w") as f:
                    f.write(repr(time.time()))
                time.sleep(seconds)
        return real(self)

    data.DataLoader.next_batch = next_batch

sys.exit(train.main(argv))
