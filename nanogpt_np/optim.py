"""AdamW, global-norm gradient clipping and build-nanogpt's cosine schedule.

AdamW (Loshchilov & Hutter), exactly as torch.optim.AdamW computes it, per element:

    p = p * (1 - lr * weight_decay)            decoupled decay, only for ndim >= 2
    m = beta1 * m + (1 - beta1) * g            first moment
    v = beta2 * v + (1 - beta2) * g^2          second moment
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The bias corrections undo the moments' start at zero. Weight decay is kept off the
biases, LayerNorm parameters and anything else 1-D, as build-nanogpt does.

Speed. The model keeps all parameters in one flat array (and the gradients in
another), so this optimizer updates them as one buffer: a few long runs (the
stretches of decayed and of undecayed parameters) instead of a dozen operations per
tensor. Parameters that are not views of one buffer are updated tensor by tensor
with the same formula. On the CPU the runs are walked in cache-sized chunks, shared
among the CPU threads: the update is thirteen array operations, and on a chunk that
stays in the cache only the first touch of p, g, m and v goes to main memory. On the
GPU, with one flat buffer, the whole update (decay, moments, parameters) is one
fused CUDA kernel, nanogpt_np/kernels/adamw.cu, which computes the formula below.
"""
import math

import numpy as np

from .backend import array_module, data_pointer, on_cpu, to_device, to_host

from .cpu import parallel_map

CHUNK = 1 << 18  # elements per chunk (1 MiB per operand): cache-sized, and long enough
# per NumPy call that threads do not queue for the GIL


def contiguous_base(arrays):
    """(flat, [(start, stop)]) when `arrays` are consecutive views tiling one 1-D
    array `flat` in order, else None. This is how a model's flat buffer is found."""
    arrays = list(arrays)
    if not arrays:
        return None
    base = _root(arrays[0])
    if base is arrays[0] or base.ndim != 1:
        return None
    ptr = data_pointer
    spans, expected = [], ptr(base)
    for a in arrays:
        if _root(a) is not base or not a.flags.c_contiguous or ptr(a) != expected:
            return None
        start = (expected - ptr(base)) // base.itemsize
        spans.append((start, start + a.size))
        expected += a.size * base.itemsize
    if spans[-1][1] != base.size:
        return None
    return base, spans


def _root(a):
    """The array that owns a's memory. NumPy's .base is already the owner; a CuPy
    view of a view may point at the intermediate view, so walk up the chain."""
    while a.base is not None:
        a = a.base
    return a


class AdamW:
    def __init__(self, params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        """params: {name: array}, updated in place by step()."""
        self.params = dict(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.names = list(self.params)
        arrays = [self.params[n] for n in self.names]
        xp = array_module(*arrays)
        total = sum(a.size for a in arrays)
        # the moments are flat float arrays of the parameters' dtype, viewed per tensor
        self.exp_avg = xp.zeros(total, dtype=arrays[0].dtype)
        self.exp_avg_sq = xp.zeros(total, dtype=arrays[0].dtype)
        self.spans, offset = {}, 0
        for name, a in zip(self.names, arrays):
            self.spans[name] = (offset, offset + a.size)
            offset += a.size
        self.decayed = [n for n in self.names if self.params[n].ndim >= 2]
        self.flat_params = contiguous_base(arrays)
        self.step_count = 0
        self._fused = _fused_update(xp)
        if self._fused is not None:  # the decayed spans of the flat buffer, for the kernel
            bounds = self._fused.decay_bounds([self.spans[n] for n in self.decayed])
            self._decay_bounds = to_device(bounds, xp)
        self._decay_runs = self._runs()

    def step(self, grads, lr=None):
        """One update from grads {name: array} (the keys of params). lr overrides self.lr."""
        lr = self.lr if lr is None else lr
        missing = [n for n in self.names if n not in grads]
        if missing:
            raise ValueError(f"AdamW.step: no gradient for {', '.join(missing[:5])}")
        self.step_count += 1
        beta1, beta2 = self.betas
        step_size = lr / (1 - beta1**self.step_count)
        bias_correction2_sqrt = math.sqrt(1 - beta2**self.step_count)
        segments = self._segments(grads)
        if self._fused is not None and len(segments) == 1:
            p, g, m, v = segments[0]
            self._fused.step(p, g, m, v, self._decay_bounds, 1 - lr * self.weight_decay, beta1, beta2,
                             self.eps, step_size, bias_correction2_sqrt)
            return
        adamw_update(self._with_decay(segments), self.step_count, lr, self.betas, self.eps, self.weight_decay)

    def _segments(self, grads):
        """[(param, grad, exp_avg, exp_avg_sq)] as 1-D arrays: one segment covering
        everything when params and grads are each one flat buffer, else one per tensor."""
        flat_grads = contiguous_base(grads[n] for n in self.names)
        if self.flat_params is not None and flat_grads is not None:
            return [(self.flat_params[0], flat_grads[0], self.exp_avg, self.exp_avg_sq)]
        segments = []
        for name in self.names:
            start, stop = self.spans[name]
            segments.append((self.params[name].reshape(-1), grads[name].reshape(-1),
                             self.exp_avg[start:stop], self.exp_avg_sq[start:stop]))
        return segments

    def _with_decay(self, segments):
        """[(param, grad, exp_avg, exp_avg_sq, decay)]: the one flat segment cut into
        runs where weight decay turns on or off; per-tensor segments with their flag."""
        if len(segments) == 1 and segments[0][2] is self.exp_avg:  # the flat buffer
            p, g, m, v = segments[0]
            return [(p[a:b], g[a:b], m[a:b], v[a:b], decay) for a, b, decay in self._decay_runs]
        return [(*seg, self.params[name].ndim >= 2) for seg, name in zip(segments, self.names)]

    def _runs(self):
        return decay_runs(self.params)

    def state_dict(self):
        return {
            "step": self.step_count,
            "exp_avg": self.exp_avg,
            "exp_avg_sq": self.exp_avg_sq,
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    def load_state_dict(self, state):
        for key in ("exp_avg", "exp_avg_sq"):
            if tuple(state[key].shape) != tuple(self.exp_avg.shape):
                raise ValueError(
                    f"optimizer state {key} has shape {tuple(state[key].shape)}, but these "
                    f"parameters need {tuple(self.exp_avg.shape)}: the checkpoint is from another model config"
                )
        xp = array_module(self.exp_avg)
        self.exp_avg[...] = to_device(state["exp_avg"], xp)  # a GPU checkpoint loads on the CPU and back
        self.exp_avg_sq[...] = to_device(state["exp_avg_sq"], xp)
        self.step_count = int(to_host(state["step"]))
        for key in ("lr", "eps", "weight_decay"):
            if key in state:
                setattr(self, key, float(to_host(state[key])))
        if "betas" in state:
            self.betas = tuple(float(b) for b in to_host(state["betas"]))


def adamw_update(runs, step_count, lr, betas, eps, weight_decay):
    """The AdamW update of step `step_count` over runs [(p, g, m, v, decay)] of matching
    1-D arrays, in place: cache-sized chunks shared among the CPU threads (a GPU takes
    each run whole). AdamW.step and ZeRO's ShardedAdamW.step both run it."""
    if not runs:
        return
    beta1, beta2 = betas
    step_size = lr / (1 - beta1**step_count)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step_count)
    # decoupled decay, applied first as torch.optim.AdamW does: p *= 1 - lr * wd
    decay_factor = 1 - lr * weight_decay
    xp = array_module(runs[0][0])
    size = CHUNK if on_cpu(xp) else max(run[0].size for run in runs)
    chunks = [(run, lo, min(run[0].size, lo + size)) for run in runs for lo in range(0, run[0].size, size)]

    def update(chunk):
        (p, g, m, v, decay), lo, hi = chunk
        if decay and weight_decay:
            p[lo:hi] *= decay_factor
        _adam_chunk(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], beta1, beta2, step_size, bias_correction2_sqrt, eps)

    parallel_map(update, chunks, xp)  # chunks are disjoint: any thread may take any


def clip_coefficient(norm, max_norm):
    """The factor clipping scales gradients of global norm `norm` by, as
    torch.nn.utils.clip_grad_norm_ computes it (with its 1e-6); 1.0 for a NaN or Inf
    norm, whose step the trainer skips (scaling would only hide where it went wrong)."""
    coef = min(1.0, max_norm / (norm + 1e-6))
    return coef if math.isfinite(norm) else 1.0


def decay_runs(params):
    """[(start, stop, decay)]: the flat order of params {name: array} cut where weight
    decay (2-D and larger arrays only) turns on or off."""
    runs, start = [], 0
    for a in params.values():
        stop, decay = start + a.size, a.ndim >= 2
        if runs and runs[-1][2] == decay and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], stop, decay)
        else:
            runs.append((start, stop, decay))
        start = stop
    return runs


def _fused_update(xp):
    """nanogpt_np.kernels.adamw for CuPy arrays (the fused kernel), None for NumPy."""
    if xp is np:
        return None
    from .kernels import adamw

    return adamw


def _adam_chunk(p, g, m, v, beta1, beta2, step_size, bias_correction2_sqrt, eps):
    """The AdamW moment and parameter update on matching 1-D slices, in place."""
    xp = array_module(p)
    tmp = xp.empty_like(p)  # the one temporary, a chunk long
    # m = beta1 * m + (1 - beta1) * g
    m *= beta1
    xp.multiply(g, 1 - beta1, out=tmp)
    m += tmp
    # v = beta2 * v + (1 - beta2) * g^2
    v *= beta2
    xp.multiply(g, g, out=tmp)
    tmp *= 1 - beta2
    v += tmp
    # p -= step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), computed as
    # p -= (step_size * sqrt(1 - beta2^t)) * m / (sqrt(v) + eps * sqrt(1 - beta2^t)),
    # the same number with one pass fewer
    xp.sqrt(v, out=tmp)
    tmp += eps * bias_correction2_sqrt
    xp.divide(m, tmp, out=tmp)
    tmp *= step_size * bias_correction2_sqrt
    p -= tmp


def clip_grad_norm(grads, max_norm):
    """Scale grads in place so their global L2 norm is at most max_norm.

    Returns the norm before clipping, as torch.nn.utils.clip_grad_norm_ does
    (including its 1e-6 in the denominator). A NaN or Inf norm leaves the
    gradients as they are (scaling by 0 or NaN would only hide where they went
    wrong); the trainer skips such a step.
    """
    arrays = list(grads.values()) if isinstance(grads, dict) else list(grads)
    flat = contiguous_base(arrays)
    xp = array_module(*arrays)
    parts = [flat[0]] if flat is not None else [a.reshape(-1) for a in arrays]
    # the sum of squares in pieces that the CPU threads share; partial sums in float64
    size = CHUNK * 16 if on_cpu(xp) else max(a.size for a in parts)  # memory-bound dot
    pieces = [a[lo : lo + size] for a in parts for lo in range(0, a.size, size)]
    total = math.sqrt(sum(parallel_map(lambda piece: float(xp.dot(piece, piece)), pieces, xp)))
    clip_coef = clip_coefficient(total, max_norm)
    if clip_coef < 1.0:

        def scale(piece):
            piece *= clip_coef

        parallel_map(scale, pieces, xp)
    return total


def cosine_lr(step, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073):
    """build-nanogpt's get_lr: linear warmup, then cosine decay to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (max_lr - min_lr)
