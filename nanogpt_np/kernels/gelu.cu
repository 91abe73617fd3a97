// GELU, tanh approximation, forward and backward. The NumPy formula they match is
// nanogpt_np/layers/gelu.py; the arithmetic itself is in gelu.cuh. Elementwise
// over n values; grid-stride loops, so any grid size covers any n. bf16 values are
// computed in float (acc_t) and rounded once when stored. Each thread takes
// V = per16<T>() values a step (one 16-byte load and store) when the pointers are
// 16-byte aligned, and the last n % V (or all, when not aligned) one at a time, with
// the same arithmetic per value either way.
#include "gelu.cuh"

template <typename T>
__global__ void gelu_forward(const T* __restrict__ x, T* __restrict__ out, long long n) {
    using A = acc_t<T>;
    constexpr int V = per16<T>();
    const long long n_vec = aligned16(x) && aligned16(out) ? n / V : 0;
    GRID_STRIDE(k, n_vec) {
        const Pack<T, V> xv = load_pack<V>(x + k * V);
        Pack<T, V> y;
#pragma unroll
        for (int j = 0; j < V; ++j) y.v[j] = T(gelu_value(A(xv.v[j])));
        store_pack(out + k * V, y);
    }
    GRID_STRIDE(t, n - n_vec * V) {
        const long long i = n_vec * V + t;
        out[i] = T(gelu_value(A(x[i])));
    }
}

// dx may be the same array as dout.
template <typename T>
__global__ void gelu_backward(const T* x, const T* dout, T* dx, long long n) {
    using A = acc_t<T>;
    constexpr int V = per16<T>();
    const long long n_vec = aligned16(x) && aligned16(dout) && aligned16(dx) ? n / V : 0;
    GRID_STRIDE(k, n_vec) {
        const Pack<T, V> xv = load_pack<V>(x + k * V), d = load_pack<V>(dout + k * V);
        Pack<T, V> y;
#pragma unroll
        for (int j = 0; j < V; ++j) y.v[j] = T(gelu_grad(A(xv.v[j]), A(d.v[j])));
        store_pack(dx + k * V, y);
    }
    GRID_STRIDE(t, n - n_vec * V) {
        const long long i = n_vec * V + t;
        dx[i] = T(gelu_grad(A(x[i]), A(dout[i])));
    }
}
