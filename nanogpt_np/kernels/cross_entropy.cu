// Fused softmax + cross-entropy. The NumPy formula they match is
// nanogpt_np/layers/cross_entropy.py.
//
// logits: (N, V) row-major, N = B*T; targets: (N,) int32; lse, losses: (N,) in
// A = acc_t<T>, the type the softmax is computed in.
// One block per row. Neither kernel ever materialises the softmax: the forward
// reads each logit once (an online logsumexp), the backward reads it once more
// and overwrites it with its gradient.
#include "common.cuh"

// lse[n] = log(sum_v exp(logits[n, v])),  losses[n] = lse[n] - logits[n, targets[n]].
// Each thread keeps a running (max m, sum of exp(x - m)) over its strided share of
// the row, rescaling the sum when the max grows; the block then merges the states.
// A target outside [0, V) gives a NaN loss rather than an out-of-bounds read.
// Launch with gridDim.x = N, blockDim.x a multiple of 32 (at most 1024).
template <typename T>
__global__ void cross_entropy_forward(const T* __restrict__ logits, const int* __restrict__ targets,
                                      acc_t<T>* __restrict__ lse, acc_t<T>* __restrict__ losses, int V) {
    using A = acc_t<T>;
    const long long row = blockIdx.x;
    const T* row_logits = logits + row * V;
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
    if (threadIdx.x == 0) {
        const A row_lse = m + log_(s);
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
