// GELU, tanh approximation: the arithmetic shared by gelu.cu and the fused
// bias + GELU kernels of fused.cu. The NumPy formula is nanogpt_np/layers/gelu.py.
#pragma once
#include "common.cuh"

#define GELU_SQRT_2_OVER_PI 0.7978845608028654
#define GELU_COEF 0.044715

// out = 0.5 * x * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 x^3)
template <typename A>
__device__ __forceinline__ A gelu_value(A x) {
    const A u = A(GELU_SQRT_2_OVER_PI) * (x + A(GELU_COEF) * x * x * x);
    return A(0.5) * x * (A(1) + tanh_(u));
}

// dx = dout * (0.5 * (1 + t) + 0.5 * x * (1 - t^2) * du/dx),  t = tanh(u) recomputed,
// du/dx = sqrt(2/pi) * (1 + 3 * 0.044715 x^2).
template <typename A>
__device__ __forceinline__ A gelu_grad(A x, A dout) {
    const A u = A(GELU_SQRT_2_OVER_PI) * (x + A(GELU_COEF) * x * x * x);
    const A t = tanh_(u);
    const A dudx = A(GELU_SQRT_2_OVER_PI) * (A(1) + A(3.0 * GELU_COEF) * x * x);
    return dout * (A(0.5) * (A(1) + t) + A(0.5) * x * (A(1) - t * t) * dudx);
}
