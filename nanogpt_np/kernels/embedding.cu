// Token and position embeddings. The NumPy formula they match is
// nanogpt_np/layers/embedding.py (reference_forward / reference_backward).
//
// idx: (B, T) int32 token ids; wte: (V, C); wpe: (block_size, C); x, dx: (B, T, C).
// TX is the parameter dtype (float or double): the residual stream starts here.
#include "common.cuh"

// x[b, t, :] = wte[idx[b, t], :] + wpe[t, :]. An id outside [0, V) gives a row of NaN
// (never a read out of bounds): ids from the host are range-checked before the copy,
// and a NaN loss then says that a device array held a bad id.
template <typename TX>
__global__ void embedding_forward(const int* __restrict__ idx, const TX* __restrict__ wte,
                                  const TX* __restrict__ wpe, TX* __restrict__ x, long long n, int T, int C, int V) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long row = i / C;  // b * T + t
        const int c = (int)(i - row * C), t = (int)(row % T), token = idx[row];
        x[i] = (token >= 0 && token < V) ? wte[(long long)token * C + c] + wpe[(long long)t * C + c]
                                         : quiet_nan<TX>();
    }
}

// forward: x = wte[idx] + wpe[:T]
//   dwpe[t, :] (+)= sum over b of dx[b, t, :]     (written, or added with accumulate_wpe)
//   dwte[idx[b, t], :] += dx[b, t, :]             (always added: lm_head wrote its part first)
// One thread per (t, c). A token used at several positions gets every one of its
// gradients through an atomic add; in float32 the order of those adds, and so the
// last bits of dwte, may differ from run to run on a GPU (as in PyTorch's default).
template <typename TX>
__global__ void embedding_backward(const TX* __restrict__ dx, const int* __restrict__ idx, TX* __restrict__ dwte,
                                   TX* __restrict__ dwpe, int B, int T, int C, int V, int accumulate_wpe) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long n = (long long)T * C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int t = (int)(i / C), c = (int)(i % C);
        TX pos = 0;
        for (int b = 0; b < B; ++b) {
            const TX g = dx[(long long)b * n + i];
            pos += g;
            const int token = idx[(long long)b * T + t];
            if (token >= 0 && token < V) atomic_add_(dwte + (long long)token * C + c, g);
        }
        dwpe[i] = accumulate_wpe ? dwpe[i] + pos : pos;
    }
}
