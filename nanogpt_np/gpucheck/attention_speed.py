"""Section 5: the attention kernels' time against PyTorch's SDPA."""

from nanogpt_np import kernels
from nanogpt_np.kernels import loader

from . import settings
from .table import bf16, free_gpu_memory, median_ms, record
from .speed import twin


# ---- 5. attention kernel time against SDPA -------------------------------------------------

# bf16 paths timed against each other and SDPA: FlashAttention-2's kernels (the
# default) and the first tensor-core kernels, NANOGPT_BF16_ATTENTION=mma
BF16_PATHS = {"fa2": "fa2", "mma": "mma (first kernels)"}


def _shapes():
    """(label, (B, NH, T, hs)): GPT-2 124M's attention and 350M's (16 heads, C=1024)."""
    B, NH, T, hs = settings.SIZES["attention_bench"]
    return [("124M", (B, NH, T, hs)), ("350M", (B, 16, T, hs))]


def _flops(shape):
    """Forward FLOPs of causal attention (two matmuls, half the scores); backward is 2.5x."""
    B, NH, T, hs = shape
    return 4 * B * NH * T * T * hs / 2


def _speed(f, fb, shape):
    flops = _flops(shape)
    return f"{f:.2f} ms ({flops / f / 1e9:.1f} TFLOP/s) / {fb:.2f} ms ({3.5 * flops / fb / 1e9:.1f} TFLOP/s)"


def _time_ours(shape, label, path=None):
    """(forward ms, forward+backward ms, path taken) of kernels.attention on `shape`."""
    import cupy as cp

    B, NH, T, hs = shape
    with kernels.attention.bf16_path(path):
        rng = cp.random.RandomState(0)
        qkv = rng.standard_normal((B, T, 3 * NH * hs), dtype=cp.float32)
        dy = rng.standard_normal((B, T, NH * hs), dtype=cp.float32)
        if label == "bf16":
            qkv, dy = kernels.fused.cast(qkv, bf16()), kernels.fused.cast(dy, bf16())

        def fwd_bwd():
            _, cache = kernels.attention.forward(qkv, NH)
            kernels.attention.backward(dy, cache)

        sync = cp.cuda.Device().synchronize
        f = median_ms(lambda: kernels.attention.forward(qkv, NH), sync)
        fb = median_ms(fwd_bwd, sync)
        return f, fb, kernels.attention.path_of(kernels.attention.forward(qkv, NH)[1])


def section_attention_speed():
    loader.sync_each_launch(False)
    (_, shape124), _ = _shapes()
    ours = {}

    def f32_row():
        f, fb, path = _time_ours(shape124, "f32")
        ours[("124M", "f32")] = (f, fb)
        return dict(result=f"{_speed(f, fb, shape124)}, path {path}", limit="", ok=None)

    record("5", "attention ours f32 fwd / fwd+bwd", f32_row)
    free_gpu_memory()
    for shape_label, shape in _shapes():
        for path, path_label in BF16_PATHS.items():
            def bf16_row(shape_label=shape_label, shape=shape, path=path):
                f, fb, taken = _time_ours(shape, "bf16", path)
                ours[(shape_label, path)] = (f, fb)
                return dict(result=f"{_speed(f, fb, shape)}, path {taken}", limit="", ok=None)

            record("5", f"attention {shape_label} ours bf16 {path_label} fwd / fwd+bwd", bf16_row)
            free_gpu_memory()

        def sdpa_row(shape_label=shape_label, shape=shape):
            f, fb = twin().sdpa_ms(*shape, "bf16", settings.TORCH_DEVICE, median_ms)
            vs = "".join(f"; {path} takes {ours[(shape_label, path)][0] / f:.2f}x its time (fwd), "
                         f"{ours[(shape_label, path)][1] / fb:.2f}x (fwd+bwd)"
                         for path in BF16_PATHS if (shape_label, path) in ours)
            return dict(result=f"{_speed(f, fb, shape)}{vs}", limit="", ok=None)

        record("5", f"attention {shape_label} torch SDPA bf16 fwd / fwd+bwd", sdpa_row)
        free_gpu_memory()

    def sdpa_f32_row():
        f, fb = twin().sdpa_ms(*shape124, "f32", settings.TORCH_DEVICE, median_ms)
        mine = ours.get(("124M", "f32"))
        vs = f"; ours takes {mine[0] / f:.1f}x its time (fwd), {mine[1] / fb:.1f}x (fwd+bwd)" if mine else ""
        return dict(result=f"{_speed(f, fb, shape124)}{vs}", limit="", ok=None)

    record("5", "attention torch SDPA f32 fwd / fwd+bwd", sdpa_f32_row)
    free_gpu_memory()
