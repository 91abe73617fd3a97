"""One optimizer step: the micro-steps, the sum over ranks, clipping and AdamW."""
import numpy as np

from ..backend import to_device
from ..distributed import DEFAULT_BUCKET_BYTES
from ..optim import clip_grad_norm


def train_step(model, optimizer, loader, accum, lr, grad_clip, dist, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """One optimizer step over `accum` micro-batches -> (mean loss, grad norm before clipping)."""
    loss, _ = accumulate_gradients(model, loader, accum, dist, bucket_bytes)
    norm = clip_grad_norm(model.grads, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step(model.grads, lr=lr)
    return loss, norm


def accumulate_gradients(model, loader, accum, dist, bucket_bytes=DEFAULT_BUCKET_BYTES, stop_vote=0.0,
                         sum_over_ranks=True):
    """model.flat_grads = the gradient of the mean loss over `accum` micro-batches on
    every rank -> (that mean loss, the mean of the ranks' stop_vote).

    With several ranks, the last micro-step's backward sends the gradients to the
    allreduce in buckets as they become final (distributed.GradientBuckets), so the
    communication hides under the rest of backward; bucket_bytes=0 sends them all
    after backward instead. stop_vote (a callable, read after backward) rides on the
    loss's allreduce, so every rank learns in the same step that one was signalled.
    sum_over_ranks=False leaves this rank's own sum over its micro-steps in flat_grads,
    undivided (ZeRO-1 reduce-scatters it instead, zero.zero_step)."""
    model.zero_grad()
    buckets = dist.gradient_buckets(model.flat_grads, bucket_bytes) if sum_over_ranks else None  # None: one rank
    started = gpu_event(model.xp) if buckets else None
    loss_sum = 0.0
    for micro in range(accum):
        x, y = loader.next_batch()
        # backward comes next: on the GPU kernels the cross-entropy's backward runs in its forward's kernel
        _, loss = model.forward_on_device(to_device(x, model.xp), to_device(y, model.xp), backward_follows=True)
        last = micro == accum - 1  # earlier micro-steps still add into every gradient
        model.backward(grads_final=buckets.ready if buckets and last else None)
        loss_sum += float(loss)
    if buckets:
        buckets.finish()  # flat_grads now holds the sum over ranks and micro-steps
        if started is not None and buckets.compute_done is not None:  # this rank's GPU time, for stragglers
            dist.watch.gpu_work = (started, buckets.compute_done)
    if sum_over_ranks and accum * dist.world_size > 1:
        model.flat_grads /= accum * dist.world_size  # the gradient of the mean over all of them
    vote = stop_vote() if callable(stop_vote) else stop_vote
    loss, votes = dist.allreduce_scalars([loss_sum / accum, float(vote)], op="mean", name="loss allreduce")
    return loss, votes


def gpu_event(xp):
    """An event on the current CUDA stream (None on the CPU): where this step's GPU work
    starts, so that the NCCL path can time a rank's own work (the host does not wait in
    NCCL calls, so the host's time in collectives says nothing there)."""
    return None if xp is np else xp.cuda.get_current_stream().record()
