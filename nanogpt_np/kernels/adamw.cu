// AdamW over the model's flat parameter buffer in one pass. The NumPy formula it
// matches is _adam_chunk (and the decay loop) in nanogpt_np/optim.py.
//
// p, g, m, v: (n,) parameters, gradients, first and second moments.
// Weight decay applies only to some parameters (matrices, not biases or LayerNorm).
// Those occupy a few spans of the flat buffer, given as sorted boundaries
// decay_bounds = [start0, stop0, start1, stop1, ...]: element i is decayed when an
// odd number of boundaries is <= i (a binary search over ~100 values per element,
// far cheaper than the 28 bytes of memory traffic each element costs anyway).
#include "common.cuh"

template <typename T>
__global__ void adamw_step(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                           T* __restrict__ v, long long n, const long long* __restrict__ decay_bounds,
                           int n_bounds, T decay_factor, T beta1, T beta2, T eps, T step_size,
                           T bias_correction2_sqrt) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        int lo = 0, hi = n_bounds;  // lo = number of boundaries <= i
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (decay_bounds[mid] <= i) lo = mid + 1;
            else hi = mid;
        }
        // p = p * (1 - lr * weight_decay), decoupled decay first, as torch.optim.AdamW
        const T param = (lo & 1) ? p[i] * decay_factor : p[i];
        const T grad = g[i];
        const T m_new = beta1 * m[i] + (T(1) - beta1) * grad;
        const T v_new = beta2 * v[i] + (T(1) - beta2) * grad * grad;
        m[i] = m_new;
        v[i] = v_new;
        // p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
        p[i] = param - step_size * m_new / (sqrt_(v_new) / bias_correction2_sqrt + eps);
    }
}
