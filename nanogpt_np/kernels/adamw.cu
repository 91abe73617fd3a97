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
// Each thread takes V = per16<T>() elements a step (16-byte loads and stores of p, g,
// m, v; V * sizeof(TC) bytes of copy) from the first multiple of V in the run to the
// last, when the pointers are 16-byte aligned; the run's first and last few elements
// (or all of it, when not aligned) go one at a time. The same arithmetic per element
// either way (adamw_update), so the bits do not depend on the path.
template <typename T>
struct AdamStep {
    bool decay;
    T scale, decay_factor, beta1, beta2, eps, step_size, bias_correction2_sqrt;
};

// One element's update: m and v in place, the new parameter returned.
template <typename T>
__device__ __forceinline__ T adamw_update(const AdamStep<T>& s, T p, T g, T& m, T& v) {
    const T param = s.decay ? p * s.decay_factor : p;
    const T grad = g * s.scale;
    const T m_new = s.beta1 * m + (T(1) - s.beta1) * grad;
    const T v_new = s.beta2 * v + (T(1) - s.beta2) * grad * grad;
    m = m_new;
    v = v_new;
    return param - s.step_size * m_new / (sqrt_(v_new) / s.bias_correction2_sqrt + s.eps);
}

template <typename T, typename TC>
__global__ void adamw_apply(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                            TC* __restrict__ copy, int write_copy, const long long* __restrict__ runs,
                            const double* __restrict__ hyper, const double* __restrict__ report) {
    constexpr int V = per16<T>();
    const long long start = runs[3 * blockIdx.y], stop = runs[3 * blockIdx.y + 1];
    const double norm = sqrt(report[1]) * hyper[7];
    const double clip = min_(1.0, hyper[6] / (norm + 1e-6));
    const AdamStep<T> s{runs[3 * blockIdx.y + 2] != 0, T(hyper[7] * clip), T(hyper[0]), T(hyper[1]), T(hyper[2]),
                        T(hyper[3]), T(hyper[4]), T(hyper[5])};
    const bool vec = aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v) && aligned16(copy);
    // [start, head) one at a time, [head, tail) in packs of V, [tail, stop) one at a time
    const long long head = vec ? min_(stop, (start + V - 1) / V * V) : stop;
    const long long tail = head + (stop - head) / V * V;
    GRID_STRIDE(k, (tail - head) / V) {
        const long long i = head + k * V;
        Pack<T, V> pv = load_pack<V>(p + i), mv = load_pack<V>(m + i), vv = load_pack<V>(v + i);
        const Pack<T, V> gv = load_pack<V>(g + i);
        Pack<TC, V> cv;
#pragma unroll
        for (int j = 0; j < V; ++j) {
            pv.v[j] = adamw_update(s, pv.v[j], gv.v[j], mv.v[j], vv.v[j]);
            cv.v[j] = TC(acc_t<TC>(pv.v[j]));
        }
        store_pack(p + i, pv);
        store_pack(m + i, mv);
        store_pack(v + i, vv);
        if (write_copy) store_pack(copy + i, cv);
    }
    GRID_STRIDE(t, (head - start) + (stop - tail)) {
        const long long i = t < head - start ? start + t : tail + (t - (head - start));
        T m_i = m[i], v_i = v[i];
        const T p_new = adamw_update(s, p[i], g[i], m_i, v_i);
        m[i] = m_i;
        v[i] = v_i;
        p[i] = p_new;
        if (write_copy) copy[i] = TC(acc_t<TC>(p_new));
    }
}
