// Fused softmax + cross-entropy. The NumPy formula they match is
// nanogpt_np/layers/cross_entropy.py (for the training step's one-kernel version,
// reference_forward_backward in nanogpt_np/kernels/cross_entropy.py).
//
// logits: (N, V) row-major, N = B*T; targets: (N,) int32; lse, losses: (N,) in
// A = acc_t<T>, the type the softmax is computed in.
// One block per row. No kernel ever materialises the softmax: the forward reads
// each logit once (an online logsumexp), the backward reads it once more and
// overwrites it with its gradient. A training step, whose backward always follows,
// runs both in one launch (cross_entropy_forward_backward); evaluation runs the
// forward alone and leaves the logits untouched.
#include "common.cuh"

// The logsumexp of one row, in every thread of the block. Each thread keeps a running
// (max m, sum of exp(x - m)) over its strided share of the row, rescaling the sum when
// the max grows; the block then merges the states. blockDim.x: a multiple of 32.
template <typename T>
__device__ acc_t<T> block_row_logsumexp(const T* row_logits, int V) {
    using A = acc_t<T>;
    A m = neg_inf<A>(), s = 0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const A x = A(row_logits[v]);
        if (x > m) {
            s = s * exp_(m - x) + A(1);  // exp(-inf) = 0 on the first element
            m = x;
        } else {
            s += exp_(x - m);
        }
    }
    block_logsumexp(m, s);
    return m + log_(s);
}

// lse[n] = log(sum_v exp(logits[n, v])),  losses[n] = lse[n] - logits[n, targets[n]].
// A target outside [0, V) gives a NaN loss rather than an out-of-bounds read.
// Launch with gridDim.x = N, blockDim.x a multiple of 32 (at most 1024).
template <typename T>
__global__ void cross_entropy_forward(const T* __restrict__ logits, const int* __restrict__ targets,
                                      acc_t<T>* __restrict__ lse, acc_t<T>* __restrict__ losses, int V) {
    using A = acc_t<T>;
    const long long row = blockIdx.x;
    const T* row_logits = logits + row * V;
    const A row_lse = block_row_logsumexp(row_logits, V);
    if (threadIdx.x == 0) {
        const int target = targets[row];
        lse[row] = row_lse;
        losses[row] = (target >= 0 && target < V) ? row_lse - A(row_logits[target]) : quiet_nan<A>();
    }
}

// dlogits[n, v] = (exp(logits[n, v] - lse[n]) - [v == targets[n]]) * scale, written
// over the logits. scale is dloss / N for a mean loss. Launch like the forward.
template <typename T>
__global__ void cross_entropy_backward(T* __restrict__ logits, const int* __restrict__ targets,
                                       const acc_t<T>* __restrict__ lse, int V, acc_t<T> scale) {
    using A = acc_t<T>;
    const long long row = blockIdx.x;
    T* row_logits = logits + row * V;
    const A row_lse = lse[row];
    const int target = targets[row];
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const A p = exp_(A(row_logits[v]) - row_lse);
        row_logits[v] = T((v == target ? p - A(1) : p) * scale);
    }
}

// cross_entropy_forward then cross_entropy_backward, in one launch: the same losses
// and the same dlogits, bit for bit (the same arithmetic on the same values), with
// the logsumexp kept in a register instead of a round trip through lse and no second
// launch. The row is read twice (the logsumexp, then the gradient) and written once:
// 3 x N x V elements, as the two kernels moved. Keeping the row in shared memory for
// the second read would not fit a float32 or float64 row (V = 50304: 201 KB, 402 KB)
// and would cut the blocks per SM to one or two for bf16's 100 KB. The second pass
// reads a row its block has just read, which L2 may still hold (not measured yet).
// Every logit is read and written by one thread only, so no barrier is needed
// between the passes. Each row's loss is written by the thread whose share holds
// the target, from the value it reads just before it overwrites it; thread 0 writes
// NaN for a target outside [0, V), whose row gets softmax * scale with no -1 anywhere.
// scale is dloss / N. Launch like the forward.
template <typename T>
__global__ void cross_entropy_forward_backward(T* __restrict__ logits, const int* __restrict__ targets,
                                               acc_t<T>* __restrict__ losses, int V, acc_t<T> scale) {
    using A = acc_t<T>;
    const long long row = blockIdx.x;
    T* row_logits = logits + row * V;
    const A row_lse = block_row_logsumexp(row_logits, V);
    const int target = targets[row];
    if (threadIdx.x == 0 && !(target >= 0 && target < V)) {
        losses[row] = quiet_nan<A>();
    }
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const A x = A(row_logits[v]);
        if (v == target) {
            losses[row] = row_lse - x;
        }
        const A p = exp_(x - row_lse);
        row_logits[v] = T((v == target ? p - A(1) : p) * scale);
    }
}
