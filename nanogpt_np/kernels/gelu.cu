// GELU, tanh approximation, forward and backward. The NumPy formula they match is
// nanogpt_np/layers/gelu.py. Elementwise over n values; grid-stride loops, so any
// grid size covers any n.
#include "common.cuh"

#define GELU_SQRT_2_OVER_PI 0.7978845608028654
#define GELU_COEF 0.044715

// out = 0.5 * x * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 x^3)
template <typename T>
__global__ void gelu_forward(const T* __restrict__ x, T* __restrict__ out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        using A = acc_t<T>;
        const A xi = A(x[i]);
        const A u = A(GELU_SQRT_2_OVER_PI) * (xi + A(GELU_COEF) * xi * xi * xi);
        out[i] = T(A(0.5) * xi * (A(1) + tanh_(u)));
    }
}

// dx = dout * (0.5 * (1 + t) + 0.5 * x * (1 - t^2) * du/dx),  t = tanh(u) recomputed,
// du/dx = sqrt(2/pi) * (1 + 3 * 0.044715 x^2). dx may be the same array as dout.
template <typename T>
__global__ void gelu_backward(const T* x, const T* dout, T* dx, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        using A = acc_t<T>;
        const A xi = A(x[i]);
        const A u = A(GELU_SQRT_2_OVER_PI) * (xi + A(GELU_COEF) * xi * xi * xi);
        const A t = tanh_(u);
        const A dudx = A(GELU_SQRT_2_OVER_PI) * (A(1) + A(3.0 * GELU_COEF) * xi * xi);
        dx[i] = T(A(dout[i]) * (A(0.5) * (A(1) + t) + A(0.5) * xi * (A(1) - t * t) * dudx));
    }
}
