// Small kernels that fuse the elementwise work around the matmuls of a
// transformer block (kernels/block.py runs them), so that each activation is read
// and written as few times as possible. What each computes, readably:
//
//   cast                 out = in, converted (float32 master weights -> bf16 copies)
//   bias_add             out += bias                          (c_attn's bias, in place)
//   bias_gelu_forward    out = gelu(pre + bias)                (c_fc's bias + layers/gelu.py)
//   bias_gelu_backward   dpre = gelu'(pre + bias) * dout,  dbias = sum over rows of dpre
//   bias_residual        out = x + a + bias                    (c_proj's bias + the residual add)
//   cast_column_sums     out = in converted, dbias = sum over rows of in
//   column_sums          dbias = sum over rows of in           (a linear layer's bias gradient)
//
// Layout: (N, C) row-major activations; bias (C,) in the accumulate type A.
// Types: T the activation storage type (float, double, bf16), TX the residual
// stream's (float or double). Arithmetic is in A = acc_t<T>.
//
// The column sums avoid atomics so results do not depend on timing: block (bx, by)
// sums rows [by * rows_per_chunk, ...) of columns bx * blockDim.x + threadIdx.x into
// row by of an (n_chunks, part_stride) array of partial sums, which the caller adds
// up (a block's bias gradients share one such array: reduce.cu's finish_partials).
// Neighbouring threads take neighbouring columns, so each row is read coalesced;
// the elementwise work of the same pass (GELU's derivative, the cast) rides along.
#include "gelu.cuh"

template <typename TI, typename TO>
__global__ void cast(const TI* __restrict__ in, TO* __restrict__ out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = TO(acc_t<TO>(in[i]));
}

template <typename T>
__global__ void bias_add(T* __restrict__ out, const acc_t<T>* __restrict__ bias, long long n, int C) {
    using A = acc_t<T>;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = T(A(out[i]) + bias[i % C]);
}

template <typename T>
__global__ void bias_gelu_forward(const T* __restrict__ pre, const acc_t<T>* __restrict__ bias,
                                  T* __restrict__ out, long long n, int C) {
    using A = acc_t<T>;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = T(gelu_value(A(pre[i]) + bias[i % C]));
}

// dpre may be the same array as dout.
template <typename T>
__global__ void bias_gelu_backward(const T* pre, const acc_t<T>* __restrict__ bias, const T* dout, T* dpre,
                                   acc_t<T>* __restrict__ dbias_part, int N, int C, int rows_per_chunk,
                                   int part_stride) {
    using A = acc_t<T>;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int r0 = blockIdx.y * rows_per_chunk, r1 = min_(N, r0 + rows_per_chunk);
    const A b = bias[c];
    A sum = 0;
    for (int r = r0; r < r1; ++r) {
        const long long i = (long long)r * C + c;
        const A g = gelu_grad(A(pre[i]) + b, A(dout[i]));
        dpre[i] = T(g);
        sum += g;  // the bias gradient, before rounding to T
    }
    dbias_part[(long long)blockIdx.y * part_stride + c] = sum;
}

template <typename TX, typename T>
__global__ void bias_residual(const TX* __restrict__ x, const T* __restrict__ a, const acc_t<TX>* __restrict__ bias,
                              TX* __restrict__ out, long long n, int C) {
    using A = acc_t<TX>;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = TX(A(x[i]) + (A(acc_t<T>(a[i])) + bias[i % C]));
}

template <typename TI, typename TO>
__global__ void cast_column_sums(const TI* __restrict__ in, TO* __restrict__ out, acc_t<TI>* __restrict__ part,
                                 int N, int C, int rows_per_chunk, int part_stride) {
    using A = acc_t<TI>;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int r0 = blockIdx.y * rows_per_chunk, r1 = min_(N, r0 + rows_per_chunk);
    A sum = 0;
    for (int r = r0; r < r1; ++r) {
        const long long i = (long long)r * C + c;
        const A v = A(in[i]);
        out[i] = TO(acc_t<TO>(v));
        sum += v;  // the exact gradient, before rounding to the matmul's dtype
    }
    part[(long long)blockIdx.y * part_stride + c] = sum;
}

template <typename T>
__global__ void column_sums(const T* __restrict__ in, acc_t<T>* __restrict__ part, int N, int C,
                            int rows_per_chunk, int part_stride) {
    using A = acc_t<T>;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int r0 = blockIdx.y * rows_per_chunk, r1 = min_(N, r0 + rows_per_chunk);
    A sum = 0;
    for (int r = r0; r < r1; ++r) sum += A(in[(long long)r * C + c]);
    part[(long long)blockIdx.y * part_stride + c] = sum;
}
