"""The PyTorch side of the benchmarks: build-nanogpt's recipe, timed the same way.

The package never imports torch. scripts/gpu_check.py hands this module to
nanogpt_np.gpucheck (settings.TWIN) and scripts/bench.py to nanogpt_np.bench, so
both measure PyTorch in the same run as nanogpt_np. The model is tests/torch_gpt.py,
the PyTorch GPT-2 the gradient tests compare against.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_torch():
    """Import torch (scripts/bench.py --memory counts its libraries apart from the step)."""
    import torch

    return torch


def describe():
    """One line for gpu_check's environment row."""
    try:
        import torch
    except Exception as e:  # not installed, or a CPU build that fails to load
        return f"no torch ({e})"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def train_step_ms(cfg, B, T, device, compile_model, steps, median_ms, free_memory):
    """(median ms per step, parameters, {allocated, reserved} GiB) of build-nanogpt's
    step: bf16 autocast, flash SDPA, fused AdamW, clip at 1.0; torch.compile if asked."""
    import torch

    from tests.torch_gpt import TorchGPT

    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    model = TorchGPT(cfg).to(device)
    opt = recipe_optimizer(model, device)
    run = torch.compile(model) if compile_model else model
    idx = torch.randint(0, min(50257, cfg.vocab_size), (B, T), device=device)
    targets = torch.randint(0, min(50257, cfg.vocab_size), (B, T), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            _, loss = run(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, lambda: sync(device), reps=steps, warmup=3 if compile_model else 2)
    memory = dict(allocated=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
                  reserved=torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"))
    n = sum(p.numel() for p in model.parameters())
    del model, run, opt
    free_memory()
    return ms, n, memory


def recipe_optimizer(model, device):
    """build-nanogpt's configure_optimizers: AdamW, betas (0.9, 0.95), eps 1e-8, weight
    decay 0.1 on the 2-D parameters only, fused on CUDA."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = dict(fused=True) if device == "cuda" else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **fused)


def train_curve(cfg, weights, batches, lrs, device, compile_model, bf16=True):
    """(losses, seconds since the first step began, after each step) of build-nanogpt's
    training loop from `weights` ({GPT-2 name: float32 host array}, e.g. nanogpt_np's
    initial weights, lm_head.weight included) over the host (idx, targets) `batches`,
    at learning rate lrs[i] on step i: bf16 autocast (unless bf16=False: float32
    throughout), clip at 1.0, recipe_optimizer's AdamW, torch.compile if asked.
    Each step reads its loss (build-nanogpt logs it every step); the first step's
    time includes torch.compile's."""
    import time

    import numpy as np
    import torch

    from tests.torch_gpt import TorchGPT

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if bf16 else "highest")  # build-nanogpt's "high": TF32
    model = TorchGPT(cfg).to(device)
    model.load_state_dict({name: torch.from_numpy(np.array(w, dtype=np.float32)) for name, w in weights.items()})
    opt = recipe_optimizer(model, device)
    run = torch.compile(model) if compile_model else model
    losses, seconds = [], []
    sync(device)
    t0 = time.perf_counter()
    try:
        for (x, y), lr in zip(batches, lrs):
            idx, targets = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                _, loss = run(idx, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            seconds.append(time.perf_counter() - t0)
        sync(device)  # the last step's update too
        seconds[-1] = time.perf_counter() - t0
    finally:
        torch.set_float32_matmul_precision(precision)
    del model, run, opt
    return losses, seconds


def sdpa_ms(B, NH, T, hs, label, device, median_ms):
    """(forward ms, forward+backward ms) of causal scaled_dot_product_attention;
    label "bf16" or "f32"."""
    import torch
    import torch.nn.functional as F

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[label]
    q, k, v = (torch.randn(B, NH, T, hs, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(B, NH, T, hs, device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_backward():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

    return median_ms(forward, lambda: sync(device)), median_ms(forward_backward, lambda: sync(device))


# ---- scripts/bench.py: the CPU step, float32, eager -----------------------------------------


class TorchStep:
    """build-nanogpt in eager PyTorch, float32: the same step with torch.optim.AdamW."""

    name = "torch"

    def __init__(self, shape, seed, threads):
        import torch

        from nanogpt_np import GPTConfig
        from tests.torch_gpt import TorchGPT, init_like_build_nanogpt

        torch.set_num_threads(threads)
        self.torch = torch
        cfg = GPTConfig(block_size=shape["block_size"], vocab_size=shape["vocab"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"])
        self.model = TorchGPT(cfg)
        init_like_build_nanogpt(self.model, seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # build-nanogpt asks for fused=True only on CUDA; on the CPU it gets the default
        self.opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8)

    def __call__(self, idx, targets):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        _, loss = self.model(torch.from_numpy(idx), torch.from_numpy(targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.item()
