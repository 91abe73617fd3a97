"""The GPU layer implementations: the same modules, names and interfaces as
nanogpt_np.layers, so the model can run either set (see ops.layer_ops).

    attention      flash attention kernels (attention.cu) for head size 64
    layernorm      layernorm.cu
    gelu           gelu.cu
    cross_entropy  cross_entropy.cu (fused softmax + cross-entropy)
    linear         the formula layer: its 2-D matmuls go to cuBLAS through CuPy
    embedding      embedding.cu: the gather plus positions, and its backward in one kernel
and `adamw`, the fused optimizer update that nanogpt_np.optim uses on CuPy arrays.
The training step itself runs `block` (block.py), the GPU's schedule of the same
block: `gemm` (cuBLAS gemmEx, bf16 with float32 accumulation), `fused` (bias, GELU,
residual and casts fused around the matmuls), the layer kernels above; it is where
the bf16 mixed precision lives.

Each kernel file is compiled by NVRTC on first use (kernels/loader.py). Importing
this package does not import CuPy. The readable formula every kernel must match
stays in its layer file under nanogpt_np/layers/.

Every kernel is a template over float and double, most over bf16 too; the Python
wrappers pick the instantiation from the input dtype (float64 exists for tight tests).

What is verified where. On the CPU, in CI: every .cu file compiles with nvcc
(sm_80, sm_90) and with NVRTC under the options CuPy uses; the kernel source runs
in a CPU emulator (tests/kernels/emulator.py) through these very wrappers and
matches the NumPy layers to float64 rounding; flash_reference.py mirrors the
attention tiling in NumPy. Only a GPU can show what the emulator cannot: CuPy's
compile and launch path, speed, and the hardware's own floating point and memory
behaviour. scripts/gpu_check.py and `pytest -m gpu` are written for that run.
"""
from ..layers import linear
from . import adamw, attention, block, cross_entropy, embedding, fused, gelu, gemm, layernorm, reduce

__all__ = ["adamw", "attention", "block", "cross_entropy", "embedding", "fused", "gelu", "gemm", "layernorm",
           "linear", "reduce"]
