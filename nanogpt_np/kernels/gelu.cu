// GELU, tanh approximation, forward and backward. The NumPy formula they match is
// nanogpt_np/layers/gelu.py; the arithmetic itself is in gelu.cuh. Elementwise
// over n values; grid-stride loops, so any grid size covers any n. bf16 values are
// computed in float (acc_t) and rounded once when stored.
#include "gelu.cuh"

template <typename T>
__global__ void gelu_forward(const T* __restrict__ x, T* __restrict__ out, long long n) {
    using A = acc_t<T>;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = T(gelu_value(A(x[i])));
}

// dx may be the same array as dout.
template <typename T>
__global__ void gelu_backward(const T* x, const T* dout, T* dx, long long n) {
    using A = acc_t<T>;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dx[i] = T(gelu_grad(A(x[i]), A(dout[i])));
}
