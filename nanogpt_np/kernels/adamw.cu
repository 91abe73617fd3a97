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

// The training step's AdamW (kernels/graph.py): the same update, with nothing that
// changes from step to step passed as an argument, so a CUDA graph can hold it.
//   hyper (double, device): [0] decay_factor = 1 - lr * weight_decay, [1] beta1, [2] beta2,
//       [3] eps, [4] step_size = lr / (1 - beta1^t), [5] sqrt(1 - beta2^t),
//       [6] max_norm (clipping; inf for none), [7] grad_scale = 1 / (micro-steps * ranks)
//   report (double, device): [1] = sum of g^2 over the unscaled gradients (reduce.cu)
// The gradient used is g * grad_scale * clip, clip = min(1, max_norm / (norm + 1e-6))
// with norm = sqrt(report[1]) * grad_scale, as torch.nn.utils.clip_grad_norm_ (the
// clip folded in: no separate pass over the gradients). The formula in NumPy:
// optim.py's clip_coefficient and _adam_chunk.
// Decay without a per-element search: runs = [start, stop, decay] per run of the flat
// buffer; blockIdx.y picks the run, and blocks grid-stride over it.
// copy: the bf16 weights the matmuls read, written from the new parameters when
// write_copy (the cast that each forward did before, fused here).
template <typename T, typename TC>
__global__ void adamw_apply(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                            TC* __restrict__ copy, int write_copy, const long long* __restrict__ runs,
                            const double* __restrict__ hyper, const double* __restrict__ report) {
    const long long start = runs[3 * blockIdx.y], stop = runs[3 * blockIdx.y + 1];
    const bool decay = runs[3 * blockIdx.y + 2] != 0;
    const double norm = sqrt(report[1]) * hyper[7];
    const double clip = min_(1.0, hyper[6] / (norm + 1e-6));
    const T scale = T(hyper[7] * clip);
    const T decay_factor = T(hyper[0]), beta1 = T(hyper[1]), beta2 = T(hyper[2]), eps = T(hyper[3]);
    const T step_size = T(hyper[4]), bias_correction2_sqrt = T(hyper[5]);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = start + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < stop; i += stride) {
        const T param = decay ? p[i] * decay_factor : p[i];
        const T grad = g[i] * scale;
        const T m_new = beta1 * m[i] + (T(1) - beta1) * grad;
        const T v_new = beta2 * v[i] + (T(1) - beta2) * grad * grad;
        m[i] = m_new;
        v[i] = v_new;
        const T p_new = param - step_size * m_new / (sqrt_(v_new) / bias_correction2_sqrt + eps);
        p[i] = p_new;
        if (write_copy) copy[i] = TC(acc_t<TC>(p_new));
    }
}
