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
// sums rows [by * rows_per_chunk, ...) of its 32 * V columns into row by of an
// (n_chunks, part_stride) array of partial sums, which the caller adds up (a block's
// bias gradients share one such array: reduce.cu's finish_partials). Each thread
// reads V neighbouring columns of every COLUMN_ROWS-th row of the chunk (one 16-byte
// access where alignment allows), neighbouring threads the next V columns, so each
// row is read coalesced; the elementwise work of the same pass (GELU's derivative,
// the cast) rides along. Every column's sum is added in a fixed order.
#include "gelu.cuh"

// The elementwise kernels take V = per16<...>() consecutive elements per thread and
// step: one 16-byte access of the narrowest type (two or four of the wider ones; bias
// packs start at i % C, so C % V == 0 keeps a pack within a row), when every pointer
// is 16-byte aligned; the last n % V elements, or all of them when some pointer or C
// is not aligned, go one at a time. Each element gets the same arithmetic either way,
// so the bits do not depend on the path. Grid-stride loops: any grid covers any n.

template <typename TI, typename TO>
__global__ void cast(const TI* __restrict__ in, TO* __restrict__ out, long long n) {
    constexpr int V = per16<TI, TO>();
    const long long n_vec = aligned16(in) && aligned16(out) ? n / V : 0;
    GRID_STRIDE(k, n_vec) {
        const Pack<TI, V> x = load_pack<V>(in + k * V);
        Pack<TO, V> y;
#pragma unroll
        for (int j = 0; j < V; ++j) y.v[j] = TO(acc_t<TO>(x.v[j]));
        store_pack(out + k * V, y);
    }
    GRID_STRIDE(t, n - n_vec * V) {
        const long long i = n_vec * V + t;
        out[i] = TO(acc_t<TO>(in[i]));
    }
}

template <typename T>
__global__ void bias_add(T* __restrict__ out, const acc_t<T>* __restrict__ bias, long long n, int C) {
    using A = acc_t<T>;
    constexpr int V = per16<T>();
    const long long n_vec = aligned16(out) && aligned16(bias) && C % V == 0 ? n / V : 0;
    GRID_STRIDE(k, n_vec) {
        Pack<T, V> y = load_pack<V>(out + k * V);
        const Pack<A, V> b = load_pack<V>(bias + k * V % C);
#pragma unroll
        for (int j = 0; j < V; ++j) y.v[j] = T(A(y.v[j]) + b.v[j]);
        store_pack(out + k * V, y);
    }
    GRID_STRIDE(t, n - n_vec * V) {
        const long long i = n_vec * V + t;
        out[i] = T(A(out[i]) + bias[i % C]);
    }
}

template <typename T>
__global__ void bias_gelu_forward(const T* __restrict__ pre, const acc_t<T>* __restrict__ bias,
                                  T* __restrict__ out, long long n, int C) {
    using A = acc_t<T>;
    constexpr int V = per16<T>();
    const long long n_vec = aligned16(pre) && aligned16(bias) && aligned16(out) && C % V == 0 ? n / V : 0;
    GRID_STRIDE(k, n_vec) {
        const Pack<T, V> x = load_pack<V>(pre + k * V);
        const Pack<A, V> b = load_pack<V>(bias + k * V % C);
        Pack<T, V> y;
#pragma unroll
        for (int j = 0; j < V; ++j) y.v[j] = T(gelu_value(A(x.v[j]) + b.v[j]));
        store_pack(out + k * V, y);
    }
    GRID_STRIDE(t, n - n_vec * V) {
        const long long i = n_vec * V + t;
        out[i] = T(gelu_value(A(pre[i]) + bias[i % C]));
    }
}

// The column-sum kernels below: thread (tx, ty) of block (bx, by) takes the V
// columns c0 = (bx * 32 + tx) * V ... c0 + V - 1 (one 16-byte access per row of the
// narrowest type when the array and C allow, as above; one element at a time otherwise)
// and rows r0 + ty, r0 + ty + COLUMN_ROWS, ... of chunk by (rows [r0, r0 + rows_per_chunk)),
// summing each column in row order; write_column_chunk then adds the COLUMN_ROWS
// threads' sums in ty order. blockDim = (32, COLUMN_ROWS), gridDim = (ceil(C / (32 V)), n_chunks).
// (COLUMN_ROWS is in common.cuh: FlashAttention-2's dq store sums its columns in this order too.)

// part[c] = sum over ty of sums[ty][c] for this block's 32 * V columns (c < C), added
// in ty order (a fixed order, no atomics: the same bits every run). Every thread calls it.
template <int V, typename A>
__device__ void write_column_chunk(const A (&sum)[V], A* __restrict__ part, int C) {
    __shared__ A lanes[COLUMN_ROWS][32 * V];
#pragma unroll
    for (int j = 0; j < V; ++j) lanes[threadIdx.y][threadIdx.x * V + j] = sum[j];
    __syncthreads();
    const int first = blockIdx.x * 32 * V;
    for (int e = threadIdx.y * 32 + threadIdx.x; e < 32 * V; e += 32 * blockDim.y) {
        A total = lanes[0][e];
        for (int y = 1; y < blockDim.y; ++y) total += lanes[y][e];
        if (first + e < C) part[first + e] = total;
    }
}

// dpre may be the same array as dout (each element is read before it is written).
template <typename T>
__global__ void bias_gelu_backward(const T* pre, const acc_t<T>* __restrict__ bias, const T* dout, T* dpre,
                                   acc_t<T>* __restrict__ dbias_part, int N, int C, int rows_per_chunk,
                                   int part_stride) {
    using A = acc_t<T>;
    constexpr int V = per16<T>();
    const int c0 = (blockIdx.x * 32 + threadIdx.x) * V;
    const int r0 = blockIdx.y * rows_per_chunk, r1 = min_(N, r0 + rows_per_chunk);
    const bool vec = aligned16(pre) && aligned16(bias) && aligned16(dout) && aligned16(dpre) && C % V == 0;
    A b[V], sum[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        b[j] = c0 + j < C ? bias[c0 + j] : A(0);
        sum[j] = 0;
    }
    for (int r = r0 + threadIdx.y; r < r1 && c0 < C; r += blockDim.y) {
        const long long i = (long long)r * C + c0;
        if (vec) {
            const Pack<T, V> x = load_pack<V>(pre + i), d = load_pack<V>(dout + i);
            Pack<T, V> y;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const A g = gelu_grad(A(x.v[j]) + b[j], A(d.v[j]));
                y.v[j] = T(g);
                sum[j] += g;  // the bias gradient, before rounding to T
            }
            store_pack(dpre + i, y);
        } else {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                if (c0 + j >= C) break;
                const A g = gelu_grad(A(pre[i + j]) + b[j], A(dout[i + j]));
                dpre[i + j] = T(g);
                sum[j] += g;
            }
        }
    }
    write_column_chunk(sum, dbias_part + (long long)blockIdx.y * part_stride, C);
}

template <typename TX, typename T>
__global__ void bias_residual(const TX* __restrict__ x, const T* __restrict__ a, const acc_t<TX>* __restrict__ bias,
                              TX* __restrict__ out, long long n, int C) {
    using A = acc_t<TX>;
    constexpr int V = per16<TX, T>();
    const long long n_vec = aligned16(x) && aligned16(a) && aligned16(bias) && aligned16(out) && C % V == 0 ? n / V : 0;
    GRID_STRIDE(k, n_vec) {
        const Pack<TX, V> xv = load_pack<V>(x + k * V);
        const Pack<T, V> av = load_pack<V>(a + k * V);
        const Pack<A, V> b = load_pack<V>(bias + k * V % C);
        Pack<TX, V> y;
#pragma unroll
        for (int j = 0; j < V; ++j) y.v[j] = TX(A(xv.v[j]) + (A(acc_t<T>(av.v[j])) + b.v[j]));
        store_pack(out + k * V, y);
    }
    GRID_STRIDE(t, n - n_vec * V) {
        const long long i = n_vec * V + t;
        out[i] = TX(A(x[i]) + (A(acc_t<T>(a[i])) + bias[i % C]));
    }
}

// Block (bx, by)'s column sums of in (rows of chunk by, this thread's V columns), and
// with CAST in converted to TO and written to out in the same pass (out unused without).
template <bool CAST, typename TI, typename TO>
__device__ __forceinline__ void column_chunk_sums(const TI* __restrict__ in, TO* __restrict__ out,
                                                  acc_t<TI>* __restrict__ part, int N, int C, int rows_per_chunk,
                                                  int part_stride) {
    using A = acc_t<TI>;
    constexpr int V = per16<TI, TO>();
    const int c0 = (blockIdx.x * 32 + threadIdx.x) * V;
    const int r0 = blockIdx.y * rows_per_chunk, r1 = min_(N, r0 + rows_per_chunk);
    const bool vec = aligned16(in) && (!CAST || aligned16(out)) && C % V == 0;
    A sum[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sum[j] = 0;
    for (int r = r0 + threadIdx.y; r < r1 && c0 < C; r += blockDim.y) {
        const long long i = (long long)r * C + c0;
        if (vec) {
            const Pack<TI, V> x = load_pack<V>(in + i);
            Pack<TO, V> y;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const A v = A(x.v[j]);
                if constexpr (CAST) y.v[j] = TO(acc_t<TO>(v));
                sum[j] += v;  // the exact gradient, before rounding to the matmul's dtype
            }
            if constexpr (CAST) store_pack(out + i, y);
        } else {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                if (c0 + j >= C) break;
                const A v = A(in[i + j]);
                if constexpr (CAST) out[i + j] = TO(acc_t<TO>(v));
                sum[j] += v;
            }
        }
    }
    write_column_chunk(sum, part + (long long)blockIdx.y * part_stride, C);
}

template <typename TI, typename TO>
__global__ void cast_column_sums(const TI* __restrict__ in, TO* __restrict__ out, acc_t<TI>* __restrict__ part,
                                 int N, int C, int rows_per_chunk, int part_stride) {
    column_chunk_sums<true>(in, out, part, N, C, rows_per_chunk, part_stride);
}

template <typename T>
__global__ void column_sums(const T* __restrict__ in, acc_t<T>* __restrict__ part, int N, int C,
                            int rows_per_chunk, int part_stride) {
    column_chunk_sums<false>(in, static_cast<T*>(nullptr), part, N, C, rows_per_chunk, part_stride);
}
