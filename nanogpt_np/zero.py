"""ZeRO-1: each rank keeps 1/ranks of AdamW's moments and updates 1/ranks of the parameters.

The flat parameter buffer is cut into one contiguous slice per rank (the first
P % ranks slices one element longer: an uneven split is fine). One step:

    grads = reduce_scatter(local grads)      rank r receives the sum over ranks of its slice
    grads /= accum * ranks                   the mean, as without ZeRO
    norm = sqrt(allreduce(sum(grads^2)))     the global norm from every slice; clip the slice
    AdamW on the slice                       the same formula, moments only for the slice
    params = allgather(slices)               every rank has all the parameters again

So the sum over ranks moves the same bytes as an allreduce (a reduce-scatter plus
an allgather is how ring allreduce works anyway), and each rank's AdamW state is
1/ranks of the whole. Checkpoints stay whole: state_dict() gathers the moments on
rank 0, and load_state_dict() takes this rank's slice of whole moments, so a run
saved with ZeRO on N ranks resumes on M ranks, with ZeRO or without.

MPI on the CPU (Reduce_scatter with uneven counts, Allgatherv). On GPUs, NCCL's
reduceScatter and allGather, which move equal counts: the slices travel padded to
the longest (distributed.pad_slices); without NCCL, through the host. The float32
master weights stay whole on every rank (the bf16 copies are cast from them), and
the slice's update runs the same elementwise formula, not the fused AdamW kernel.
The GPU path has not run on a GPU yet.
"""
import math

from .backend import array_module, to_device, to_host
from .distributed import slice_offsets
from .optim import adamw_update, clip_coefficient, contiguous_base, decay_runs


def shard_counts(total, ranks):
    """Elements per rank: as equal as can be, the first total % ranks one longer."""
    return [total // ranks + (1 if r < total % ranks else 0) for r in range(ranks)]


class ShardedAdamW:
    """AdamW over this rank's slice of the flat parameters (see the module docstring).
    The same hyperparameters, step count and per-element formula as optim.AdamW."""

    def __init__(self, params, dist, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        self.params, self.dist = dict(params), dist
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        flat = contiguous_base(self.params.values())
        if flat is None:
            raise ValueError("ZeRO needs the parameters as views of one flat buffer (model.flat_params)")
        self.flat = flat[0]
        self.counts = shard_counts(self.flat.size, dist.world_size)
        self.lo = slice_offsets(self.counts)[dist.rank]
        self.hi = self.lo + self.counts[dist.rank]
        self.xp = array_module(self.flat)
        self.exp_avg = self.xp.zeros(self.hi - self.lo, dtype=self.flat.dtype)
        self.exp_avg_sq = self.xp.zeros(self.hi - self.lo, dtype=self.flat.dtype)
        self.step_count = 0
        self.runs = [(max(a, self.lo) - self.lo, min(b, self.hi) - self.lo, decay)
                     for a, b, decay in decay_runs(self.params) if max(a, self.lo) < min(b, self.hi)]

    def step(self, grad_slice, lr=None):
        """One AdamW update of this rank's parameter slice from its gradient slice
        (then zero.apply gathers every rank the others' slices)."""
        lr = self.lr if lr is None else lr
        self.step_count += 1
        p, m, v = self.flat[self.lo : self.hi], self.exp_avg, self.exp_avg_sq
        runs = [(p[a:b], grad_slice[a:b], m[a:b], v[a:b], decay) for a, b, decay in self.runs]
        adamw_update(runs, self.step_count, lr, self.betas, self.eps, self.weight_decay)

    # ---- whole checkpoints from slices ---------------------------------------------------

    def state_dict(self):
        """AdamW's state_dict with whole moments, gathered on rank 0 (None elsewhere).
        Every rank must call it (a collective)."""
        whole = [self.dist.gather_slices(m, self.counts) for m in (self.exp_avg, self.exp_avg_sq)]
        return {"step": self.step_count, "exp_avg": whole[0], "exp_avg_sq": whole[1], "lr": self.lr,
                "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def load_state_dict(self, state):
        for key in ("exp_avg", "exp_avg_sq"):
            whole = to_host(state[key])
            if whole.shape != (self.flat.size,):
                raise ValueError(f"optimizer state {key} has shape {whole.shape}, but these parameters need "
                                 f"({self.flat.size},): the checkpoint is from another model config")
            getattr(self, key)[...] = to_device(whole[self.lo : self.hi], self.xp)
        self.step_count = int(state["step"])
        for key in ("lr", "eps", "weight_decay"):
            if key in state:
                setattr(self, key, float(state[key]))
        if "betas" in state:
            self.betas = tuple(float(b) for b in state["betas"])


def zero_step(model, optimizer, dist, accum, grad_clip):
    """After the micro-steps' backward (local gradient sums, no allreduce): the sum over
    ranks of this rank's slice, the mean, the global norm and clip -> (grad slice, norm).
    The caller decides from the norm whether to apply(...)."""
    grads = dist.reduce_scatter_sum(model.flat_grads, optimizer.counts)  # this rank's slice of the sum
    grads /= accum * dist.world_size
    xp = array_module(grads)
    (sum_sq,) = dist.allreduce_scalars([float(xp.dot(grads, grads))], op="sum")
    norm = math.sqrt(sum_sq)
    clip_coef = clip_coefficient(norm, grad_clip if grad_clip > 0 else float("inf"))  # as clip_grad_norm
    if clip_coef < 1.0:
        grads *= clip_coef
    return grads, norm


def apply(model, optimizer, dist, grads, lr):
    """AdamW on this rank's slice, then every rank gathers all the slices."""
    optimizer.step(grads, lr=lr)
    dist.allgather_slices_(model.flat_params, optimizer.counts)
