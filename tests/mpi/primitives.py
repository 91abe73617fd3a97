"""Run under `mpiexec -n 2`: each collective of nanogpt_np.distributed on real MPI."""
import numpy as np

from nanogpt_np import distributed

d = distributed.init()
assert d.world_size == 2, d.world_size
assert d.local_size == 2 and d.local_rank == d.rank  # one machine
buf = np.full(5, float(d.rank + 1), dtype=np.float32)
d.allreduce_mean_(buf)
assert np.all(buf == 1.5), buf
assert d.allreduce_scalars([d.rank, 1.0]) == [1.0, 2.0]
assert d.allreduce_scalars([d.rank * 2.0], op="mean") == [1.0]
b = np.arange(3.0) * (d.rank + 1)
d.broadcast_(b, root=1)
assert list(b) == [0.0, 2.0, 4.0], b
gathered = d.allgather_json({"rank": d.rank, "pos": [d.rank] * (d.rank + 1)})
assert gathered == [{"rank": 0, "pos": [0]}, {"rank": 1, "pos": [1, 1]}], gathered
# gradient buckets on the CPU: one allreduce after backward, whatever the bucket size
flat = np.ones(10) * (d.rank + 1)
buckets = d.gradient_buckets(flat, bucket_bytes=8)
buckets.ready(5)
buckets.finish()
assert buckets.spans == [(0, 10)] and np.all(flat == 3.0), (buckets.spans, flat)
d.barrier()
print(f"rank {d.rank} ok")
