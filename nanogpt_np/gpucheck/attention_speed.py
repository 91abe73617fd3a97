"""Section 5: the attention kernels' time against PyTorch's SDPA."""
import os


from nanogpt_np import kernels

from . import settings
from .table import bf16, free_gpu_memory, median_ms, record
from .speed import twin


# ---- 5. attention kernel time against SDPA -------------------------------------------------

def section_attention_speed():
    import cupy as cp

    os.environ["NANOGPT_CUDA_SYNC"] = "0"
    B, NH, T, hs = settings.SIZES["attention_bench"]
    flops_fwd = 4 * B * NH * T * T * hs / 2  # two matmuls, causal half
    sync = cp.cuda.Device().synchronize
    ours = {}
    for label in ("f32", "bf16"):
        def ours_row(label=label):
            rng = cp.random.RandomState(0)
            qkv = rng.standard_normal((B, T, 3 * NH * hs), dtype=cp.float32)
            dy = rng.standard_normal((B, T, NH * hs), dtype=cp.float32)
            if label == "bf16":
                qkv, dy = kernels.fused.cast(qkv, bf16()), kernels.fused.cast(dy, bf16())

            def fwd_bwd():
                _, cache = kernels.attention.forward(qkv, NH)
                kernels.attention.backward(dy, cache)

            f = median_ms(lambda: kernels.attention.forward(qkv, NH), sync)
            fb = median_ms(fwd_bwd, sync)
            ours[label] = (f, fb)
            path = kernels.attention.path_of(kernels.attention.forward(qkv, NH)[1])
            return dict(result=f"{f:.2f} ms ({flops_fwd / f / 1e9:.1f} TFLOP/s) / {fb:.2f} ms "
                               f"({3.5 * flops_fwd / fb / 1e9:.1f} TFLOP/s), path {path}", limit="", ok=None)

        record("5", f"attention ours {label} fwd / fwd+bwd", ours_row)
        free_gpu_memory()
    for label in ("bf16", "f32"):
        def torch_row(label=label):
            f, fb = twin().sdpa_ms(B, NH, T, hs, label, settings.TORCH_DEVICE, median_ms)
            mine = ours.get(label)
            vs = f"; ours takes {mine[0] / f:.1f}x its time (fwd), {mine[1] / fb:.1f}x (fwd+bwd)" if mine else ""
            return dict(result=f"{f:.2f} ms / {fb:.2f} ms{vs}", limit="", ok=None)

        record("5", f"attention torch SDPA {label} fwd / fwd+bwd", torch_row)
        free_gpu_memory()
