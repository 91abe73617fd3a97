// The step's reductions to a device scalar, so that the host reads nothing until the
// one read of (loss, gradient norm) per optimizer step. The NumPy formulas they match
// are in nanogpt_np/kernels/reduce.py, beside each wrapper.
//
//   sum_squares_partial / _finish   report = [loss, sum(g * g) over the flat gradients]
//   loss_mean                       loss = (accumulate ? loss : 0) + scale * sum(losses)
//   finish_partials                 grads[seg] = (accumulate ? grads[seg] : 0) + sum over rows of part
//
// No atomics: every sum runs in a fixed order, so a step gives the same bits every
// time (and a replayed CUDA graph the same bits as the eager step).
#include "common.cuh"

// part[block] = sum of g[i]^2 over the block's grid-stride share of g, in double.
// Launch with a fixed grid (the finish kernel reads gridDim.x partials) and
// blockDim.x a multiple of 32.
template <typename T>
__global__ void sum_squares_partial(const T* __restrict__ g, long long n, double* __restrict__ part) {
    __shared__ double scratch[32];
    const long long stride = (long long)gridDim.x * blockDim.x;
    acc_t<T> local = 0;  // float32 within a thread's ~n / (grid * block) elements
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const acc_t<T> v = acc_t<T>(g[i]);
        local += v * v;
    }
    const double total = block_sum((double)local, scratch);
    if (threadIdx.x == 0) part[blockIdx.x] = total;
}

// report[1] = sum of the n_part partials (norm^2), report[0] = loss[0]: the two
// numbers the host reads once per optimizer step, in one array. One block.
template <typename A>
__global__ void sum_squares_finish(const double* __restrict__ part, int n_part, const A* __restrict__ loss,
                                   double* __restrict__ report) {
    __shared__ double scratch[32];
    double local = 0;
    for (int i = threadIdx.x; i < n_part; i += blockDim.x) local += part[i];
    const double total = block_sum(local, scratch);
    if (threadIdx.x == 0) {
        report[0] = (double)loss[0];
        report[1] = total;
    }
}

// loss[0] = (accumulate ? loss[0] : 0) + scale * sum(losses). One block.
template <typename A>
__global__ void loss_mean(const A* __restrict__ losses, int n, A* __restrict__ loss, A scale, int accumulate) {
    __shared__ A scratch[32];
    A local = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) local += losses[i];
    const A total = block_sum(local, scratch);
    if (threadIdx.x == 0) loss[0] = (accumulate ? loss[0] : A(0)) + scale * total;
}

// Column partial sums -> gradients. Each segment (a row of 5 in `segments`: first
// column, part offset, part row stride, grads offset, width) is an (n_chunks, width)
// block of partial sums at part[offset + k * stride + c]; column j of the segment
// starting at column `first` goes to grads[grads offset + j - first], written (or added,
// with accumulate). One thread per column; gridDim.x * blockDim.x >= n_columns.
template <typename A>
__global__ void finish_partials(const A* __restrict__ part, A* __restrict__ grads,
                                const long long* __restrict__ segments, int n_seg, int n_chunks, int n_columns,
                                int accumulate) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_columns) return;
    for (int s = 0; s < n_seg; ++s) {
        const long long* seg = segments + 5 * s;
        if (j < seg[0] || j >= seg[0] + seg[4]) continue;
        const long long c = j - seg[0];
        A sum = 0;
        for (int k = 0; k < n_chunks; ++k) sum += part[seg[1] + k * seg[2] + c];
        A* out = grads + seg[3] + c;
        *out = accumulate ? *out + sum : sum;
        return;
    }
}
