"""Section 3: AdamW training steps, GPU against NumPy; the NCCL overlap mechanics."""

import numpy as np

from nanogpt_np import GPT, optim

from . import settings
from .table import free_gpu_memory, host_f64, record, rel_err


# ---- 3. training steps track NumPy ---------------------------------------------------------

def markov_tokens(V, n, seed=0):
    """A token stream where each token has 4 likely successors: a loss that can fall."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, V, (V, 4))
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    choices = rng.integers(0, 4, n)
    for i in range(1, n):
        out[i] = successors[out[i - 1], choices[i]]
    return out


def train(cfg, backend_name, stream, steps, B, T, dtype=np.float32, lr=1e-3, warmup=5, batch_seed=1):
    """`steps` AdamW steps on random windows of `stream` -> (losses, fused AdamW used)."""
    model = GPT(cfg, dtype=dtype, seed=0, backend=backend_name)
    opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    fused = opt._fused is not None and len(opt._segments(model.grads)) == 1
    rng = np.random.default_rng(batch_seed)
    losses = []
    for step in range(steps):
        starts = rng.integers(0, stream.size - T - 1, B)
        batch = np.stack([stream[s : s + T + 1] for s in starts])
        model.zero_grad()
        _, loss = model.forward(batch[:, :-1], batch[:, 1:])
        model.backward()
        optim.clip_grad_norm(model.grads, 1.0)
        opt.step(model.grads, lr=optim.cosine_lr(step, lr, lr / 10, warmup, steps))
        losses.append(loss)
    del model, opt
    return np.array(losses), fused


def section_training():
    cfg, steps, B, T = settings.SIZES["train"]
    stream = markov_tokens(cfg.vocab_size, 50_000)

    def run():
        gpu, fused = train(cfg, "cupy", stream, steps, B, T)
        cpu, _ = train(cfg, "numpy", stream, steps, B, T)
        diff = np.abs(gpu - cpu) / np.abs(cpu)
        free_gpu_memory()
        return dict(result=f"max rel loss diff {diff.max():.1e} over {steps} steps; loss {cpu[0]:.3f} -> "
                           f"{cpu[-1]:.3f} (NumPy) / {gpu[-1]:.3f} (GPU); fused AdamW {'yes' if fused else 'NO'}",
                    limit="1e-03", ok=bool(diff.max() <= 1e-3 and fused and cpu[-1] < cpu[0]))

    record("3", f"{steps} AdamW steps f32, GPU vs NumPy", run)
    record("3", "overlapped NCCL allreduce, 1 rank", check_overlap)


class SoloComm:
    """MPI's communicator for a single process, as far as NCCLTransport needs it."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Bcast(self, buf, root=0):
        pass


def check_overlap():
    """The bucketed allreduce's GPU mechanics (distributed.GradientBuckets over a
    one-rank NCCL communicator: a side stream, events, a bucket after every block)
    during a real bf16 backward. A sum over one rank is the identity, so the
    gradients must equal those of a backward without buckets (up to cupy.add.at's
    atomic order in the embedding)."""
    import cupy as cp

    from nanogpt_np import distributed

    if not distributed.nccl_available(cp):
        return dict(result="skipped: cupy.cuda.nccl unavailable (pip install nvidia-nccl-cu12)", limit="", ok=None)
    cfg, B, T = settings.SIZES["small_model"]
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))
    model = GPT(cfg, dtype="bf16", seed=0, backend="cupy")
    model.zero_grad()
    model.forward(idx, targets)
    model.backward()
    want = host_f64(model.flat_grads)
    buckets = distributed.GradientBuckets(model.flat_grads, 1, distributed.NCCLTransport(SoloComm(), cp))
    model.zero_grad()
    model.forward(idx, targets)
    model.backward(grads_final=buckets.ready)
    buckets.finish()
    err = rel_err(model.flat_grads, want)
    n = len(buckets.spans)
    return dict(result=f"{n} buckets (want {cfg.n_layer + 2}), grads vs no buckets {err:.1e}", limit="1e-06",
                ok=bool(n == cfg.n_layer + 2 and err <= 1e-6))
