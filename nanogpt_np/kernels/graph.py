"""The GPU training step: static memory, one host read per optimizer step, CUDA graphs.

What Trainer.train_one_step asks of the GPU, arranged so the host stays out of the
loop (build-nanogpt's step, on one rank without ZeRO):

    for each micro-step:  the batch copied from pinned host memory into the model's
                          static int32 idx/targets buffers (model._on_device)
                          G1: forward, backward (gradients written on the first
                          micro-step, added on later ones: no pass of zeros), the loss
                          added into a device scalar; after the last one the
                          sum of squares of the gradients (reduce.sum_squares)
    the one host read:    report = [loss, norm^2]  (the step guard's two numbers)
    if the guard applies: hyperparameters (lr, bias corrections, clip, 1/micro-steps)
                          copied into a device array; G2: AdamW reading them, the
                          clip folded in, writing the bf16 weight copy

Memory. Every array a micro-step allocates comes from StepMemory, a CuPy allocator
that records the step's allocations once (reusing its own blocks as they are freed,
as CuPy's pool would) and hands out the very same addresses, in the same order, on
every later micro-step: no pool allocation after warm-up, and the fixed addresses a
CUDA graph replays with.

Graphs (cuda_graphs=True). Step 1 runs eagerly (NVRTC compiles, the model's own
buffers, pool growth), step 2 eagerly under StepMemory's recording, and step 3
captures each micro-step variant (first / later, with or without the norm) and G2
with Stream.begin_capture / end_capture, then launches the graphs (Graph.launch) on
every later step. Anything that cannot be captured falls back to eager execution,
with one line saying why. Several ranks run eagerly for now (the NCCL allreduce
during backward stays outside any graph); ZeRO-1 keeps its own path (zero.py).

The formulas: the step is exactly Trainer.train_one_step's (accumulate_gradients,
clip_grad_norm, StepGuard.judge, AdamW.step); tests/kernels/test_capture.py holds
graph replays to eager steps bit for bit on the CPU stand-ins.
"""
import math

import numpy as np

from ..backend import PinnedUpload
from . import adamw, reduce


class StepMemory:
    """A CuPy allocator (cupy.cuda.using_allocator) for the training step's arrays.

    Recording (the first run; runs start with `begin()`): each request gets a block
    of this allocator, reusing a freed one (best fit) or taking a new one from CuPy's
    pool, and the block's index is noted. Replaying (every later run): request k gets
    the block request k got while recording, provided it is free and large enough
    again. A request that does not match (another order, another size: the step
    changed) gets memory from CuPy's pool instead, and `mismatch` says where."""

    def __init__(self, xp):
        self.xp = xp
        self.blocks = []  # [memory pointer from the pool, size, busy]
        self.sequence = []  # block index per request, in recording order
        self.recording, self.cursor, self.mismatch, self.runs = True, 0, None, 0

    def begin(self):
        self.recording = self.runs == 0
        self.runs += 1
        self.cursor = 0

    def malloc(self, size):
        if size == 0 or self.mismatch is not None:
            return self.xp.get_default_memory_pool().malloc(size)
        if self.recording:
            k = self._free_block(size)
            self.sequence.append(k)
        else:
            k = self.sequence[self.cursor] if self.cursor < len(self.sequence) else None
            if k is None or self.blocks[k][2] or self.blocks[k][1] < size:
                self.mismatch = f"allocation {self.cursor} of a micro-step ({size} bytes) differs from warm-up's"
                return self.xp.get_default_memory_pool().malloc(size)
        self.cursor += 1
        block = self.blocks[k]
        block[2] = True
        memory = self.xp.cuda.memory.UnownedMemory(block[0].ptr, size, _Lease(block))
        return self.xp.cuda.memory.MemoryPointer(memory, 0)

    def _free_block(self, size):
        free = [(b[1], k) for k, b in enumerate(self.blocks) if not b[2] and b[1] >= size]
        if free:
            return min(free)[1]
        self.blocks.append([self.xp.get_default_memory_pool().malloc(size), size, False])
        return len(self.blocks) - 1

    @property
    def nbytes(self):
        return sum(b[1] for b in self.blocks)


class _Lease:
    """The owner of one handed-out block: when the last array on it is gone, so is
    this, and the block is free again. (__del__ rather than weakref.finalize: a few
    hundred of these per micro-step, and finalize costs several times more.)"""

    __slots__ = ("block",)

    def __init__(self, block):
        self.block = block

    def __del__(self):
        self.block[2] = False


class GpuTrainStep:
    """One optimizer step of `model` (GPU kernels, one flat AdamW) with one host read."""

    def __init__(self, model, optimizer, accum, grad_clip, dist, bucket_bytes=0, cuda_graphs=True, log=print):
        if model.fused is None or optimizer.flat_params is None or optimizer._fused is None:
            raise ValueError("GpuTrainStep needs the GPU kernels and an AdamW over the model's flat buffer")
        xp = self.xp = model.xp
        self.model, self.optimizer, self.accum, self.dist = model, optimizer, int(accum), dist
        self.bucket_bytes = bucket_bytes
        self.max_norm = grad_clip if grad_clip > 0 else math.inf
        self.grad_scale = 1.0 / (self.accum * dist.world_size)
        self.log = log
        runs = optimizer._decay_runs
        self.runs, self.n_runs = xp.asarray(adamw.runs_table(runs)), len(runs)
        self.longest = max(b - a for a, b, _ in runs)
        self.report = xp.zeros(2, dtype=np.float64)  # [loss, norm^2]: the one host read
        self.part = xp.zeros(reduce.SUM_SQUARES_BLOCKS, dtype=np.float64)
        self.hyper = PinnedUpload(xp, (len(adamw.HYPER),), np.float64)
        self.memory = StepMemory(xp)
        self.copy_fresh = False  # the bf16 weight copies match the parameters
        self.stream = xp.cuda.Stream(non_blocking=True)
        self.graphs = {} if cuda_graphs else None
        if cuda_graphs and dist.world_size > 1:
            self._no_graphs("several ranks (the NCCL allreduce during backward is not captured yet)")
        self.steps_run = 0
        self.mode = "eager"

    def _no_graphs(self, why):
        if self.graphs is not None:
            self.log(f"cuda graphs off: {why}; the step runs eagerly")
        self.graphs = None

    # ---- the step ---------------------------------------------------------------------

    def __call__(self, loader, lr, guard, stop_vote=0.0):
        """-> (loss, grad norm before clipping, the guard's skip reason or None, the
        mean of the ranks' stop_vote)."""
        xp, model = self.xp, self.model
        self.stream.wait_event(xp.cuda.get_current_stream().record())  # after whatever ran before
        with self.stream:
            buckets = self.dist.gradient_buckets(model.flat_grads, self.bucket_bytes)
            for micro in range(self.accum):
                x, y = loader.next_batch()
                self._micro_step(x, y, micro, buckets)
            if buckets:
                buckets.finish()
            loss_sum, norm2 = (float(v) for v in self.report.get())  # the one host read (a sync)
            vote = stop_vote() if callable(stop_vote) else stop_vote
            loss, votes = self.dist.allreduce_scalars([loss_sum, float(vote)], op="mean")
            norm = math.sqrt(norm2) * self.grad_scale if math.isfinite(norm2) else norm2
            skipped = guard.judge(loss, norm)
            if skipped is None:
                self._optimizer_step(lr)
        xp.cuda.get_current_stream().wait_event(self.stream.record())  # what runs next sees the update
        self.steps_run += 1
        return loss, norm, skipped, votes

    def _micro_step(self, x, y, micro, buckets):
        model = self.model
        idx, targets = model._check_inputs(x, y)  # host checks, then the copies into the static buffers
        first, last = micro == 0, micro == self.accum - 1
        variant = (first, last)
        if self.graphs is not None and self.steps_run >= 2 and buckets is None:
            graph = self.graphs.get(variant) or self._capture(variant, idx, targets)
            if graph is not None:
                graph.launch(self.stream)
                return
        self._micro_body(idx, targets, first, last, buckets)

    def _micro_body(self, idx, targets, first, last, buckets=None):
        """G1: forward and backward of one micro-step (and the norm after the last)."""
        model, xp = self.model, self.xp
        if self.steps_run >= 1:  # step 1 grows the model's own buffers; from step 2 on, StepMemory
            self.memory.begin()
            with xp.cuda.using_allocator(self.memory.malloc):
                self._forward_backward(idx, targets, first, last, buckets)
            if self.memory.mismatch and self.graphs is not None:
                self._no_graphs(self.memory.mismatch)
        else:
            self._forward_backward(idx, targets, first, last, buckets)
        if last:
            reduce.sum_squares(model.flat_grads, model._loss_scalar, self.report, self.part)

    def _forward_backward(self, idx, targets, first, last, buckets):
        model = self.model
        if first:
            model.zero_grad(fill_zeros=False)  # the kernels' backward writes every gradient
        model.forward_on_device(idx, targets, loss_scale=1.0 / self.accum, accumulate_loss=not first,
                                refresh=not self.copy_fresh, backward_follows=True)
        self.copy_fresh = model.mixed
        model.backward(grads_final=buckets.ready if buckets is not None and last else None)

    def _optimizer_step(self, lr):
        """G2: the hyperparameters in, then AdamW (clip folded in, bf16 copy written)."""
        opt, model = self.optimizer, self.model
        opt.step_count += 1
        values = adamw.hyperparameters(opt.step_count, lr, opt.betas, opt.eps, opt.weight_decay, self.max_norm,
                                       self.grad_scale)
        hyper = self.hyper.upload(values)
        graph = None
        if self.graphs is not None and self.steps_run >= 2:
            graph = self.graphs.get("adamw") or self._capture("adamw", hyper)
        if graph is not None:
            graph.launch(self.stream)
        else:
            self._adamw(hyper)
        self.copy_fresh = model.mixed

    def _adamw(self, hyper):
        opt, model = self.optimizer, self.model
        copy = model.compute_flat if model.mixed else None
        adamw.apply(opt.flat_params[0], model.flat_grads, opt.exp_avg, opt.exp_avg_sq, self.runs, self.n_runs,
                    self.longest, hyper, self.report, copy=copy)

    # ---- capture ----------------------------------------------------------------------

    def _capture(self, variant, *args):
        """Capture one micro-step variant (or "adamw") into a CUDA graph and keep it
        (the caller launches it: capturing runs nothing). None, and eager from now on
        with one line saying why, when it cannot be captured."""
        body = (lambda: self._adamw(*args)) if variant == "adamw" else \
            (lambda: self._micro_body(*args, *variant))
        try:
            self.stream.begin_capture()
            try:
                body()
            finally:
                graph = self.stream.end_capture()
        except Exception as e:  # anything uncapturable: say so once, run eagerly
            self._no_graphs(f"capturing {variant} failed ({type(e).__name__}: {e})")
            return None
        if self.memory.mismatch:
            return None  # _micro_body said why
        self.graphs[variant] = graph
        self.mode = "graphs"
        return graph
