"""The step being timed: nanogpt_np's (here) or PyTorch's (benchmarks/torch_twin.py),
and the batches both get."""
import numpy as np


class NumpyStep:
    """nanogpt_np: forward, backward, clip_grad_norm, AdamW over the flat buffers."""

    name = "numpy"

    def __init__(self, shape, seed, backend="numpy"):
        from nanogpt_np import GPT, GPTConfig
        from nanogpt_np.backend import default_precision
        from nanogpt_np.optim import AdamW, clip_grad_norm

        cfg = GPTConfig(block_size=shape["block_size"], vocab_size=shape["vocab"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"])
        # float32 on the CPU; on the GPU train.py's default, bf16 mixed precision
        self.model = GPT(cfg, dtype=default_precision(backend), seed=seed, backend=backend)
        self.opt = AdamW(self.model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        self.clip = clip_grad_norm

    def __call__(self, idx, targets):
        self.model.zero_grad()
        _, loss = self.model.forward(idx, targets)
        grads = self.model.backward()
        self.clip(grads, 1.0)
        self.opt.step(grads, lr=6e-4)
        return loss


def make_runner(impl, args):
    if impl == "numpy":
        return NumpyStep(args.shape, args.seed)
    if args.twin is None:
        raise RuntimeError("no PyTorch step: run scripts/bench.py, which passes benchmarks/torch_twin.py")
    return args.twin.TorchStep(args.shape, args.seed, args.threads)


def make_batches(shape, count, seed):
    rng = np.random.default_rng(seed)
    B, T, V = shape["batch_size"], shape["block_size"], shape["vocab"]
    return [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(count)]
