// Causal flash attention, forward and backward. The NumPy formula these match is
// nanogpt_np/layers/attention.py; nanogpt_np/kernels/flash_reference.py mirrors
// their tiling step for step in NumPy, and is tested on the CPU.
//
// Layout, with C = NH * HS:
//   qkv  (B, T, 3C)  c_attn's output: q of head h at [b, t, h*HS + d], k at C + h*HS + d,
//                    v at 2C + h*HS + d. The kernels read the heads in place (no transposes).
//   y    (B, T, C)   the output, heads side by side, ready for c_proj.
//   lse  (B, NH, T)  per-row logsumexp of the scaled scores: all the forward keeps.
//   D    (B, NH, T)  D[i] = dy[i] . y[i], the softmax backward's row term.
//   dqkv (B, T, 3C)  the gradient, in qkv's layout.
// The (T, T) score matrix is never stored: forward runs an online softmax over
// key tiles, and backward recomputes P = exp(S - lse) tile by tile.
//
// Template parameters: T the storage/compute type (float, double), HS the head
// size (64 for GPT-2), and the tile sizes, which the Python wrapper passes so that
// it, the launch configuration and the NumPy mirror share one definition.
// Shared memory (static, per block, HS = 64): forward (2 * BLOCK_K * HS + BLOCK_K *
// BLOCK_Q values) 24 KB in float, 48 KB in double; dq 16 KB / 32 KB; dkdv
// (2 * BLOCK_Q * HS + 2 * BLOCK_Q values) 16.3 KB / 32.5 KB. All within the 48 KB a
// block gets without opting in to more, so no launch needs max_dynamic_shared_size_bytes.
// Registers (ptxas, sm_90, float): forward 167, dq 255 with a small spill, dkdv 219.
#include "common.cuh"

// Copy keys [k0, k0 + BLOCK_K) of one head into shared tiles; rows past T are zeros.
template <typename T, int HS, int BLOCK_K>
__device__ __forceinline__ void load_kv_tile(const T* __restrict__ head_k, const T* __restrict__ head_v,
                                             long long row_stride, int seq_len, int k0,
                                             T (*k_tile)[HS], T (*v_tile)[HS]) {
    for (int e = threadIdx.x; e < BLOCK_K * HS; e += blockDim.x) {
        const int j = e / HS, d = e % HS, t = k0 + j;
        k_tile[j][d] = t < seq_len ? head_k[t * row_stride + d] : T(0);
        v_tile[j][d] = t < seq_len ? head_v[t * row_stride + d] : T(0);
    }
}

// Forward. Grid (B*NH, ceil(T / BLOCK_Q)), blockDim.x == BLOCK_Q: one thread per
// query row i, holding q[i] (pre-scaled by 1/sqrt(HS)) and its output accumulator
// in registers. For each key tile up to the block's last row:
//   s_j   = q . k_j, or -inf where j > i (causal)
//   m_new = max(m, max_j s_j);  alpha = exp(m - m_new)      (rescales the past)
//   l     = l * alpha + sum_j exp(s_j - m_new)
//   o     = o * alpha + sum_j exp(s_j - m_new) v_j
// and at the end y = o / l, lse = m + log(l).
// Key 0 is in the first tile and visible to every row, so m is finite from the
// first tile on; alpha = exp(-inf) = 0 there. A row past T (in the last, ragged
// tile) computes a copy of row T-1 and stores nothing.
template <typename T, int HS, int BLOCK_Q, int BLOCK_K>
__global__ void flash_attention_forward(const T* __restrict__ qkv, T* __restrict__ y,
                                        T* __restrict__ lse, int seq_len, int n_head, T scale) {
    __shared__ T k_tile[BLOCK_K][HS];
    __shared__ T v_tile[BLOCK_K][HS];
    __shared__ T score_tile[BLOCK_K][BLOCK_Q];  // column threadIdx.x is this thread's scores
    const int bh = blockIdx.x, b = bh / n_head, h = bh % n_head;
    const int C = n_head * HS;
    const long long row_stride = 3LL * C;
    const T* head_q = qkv + (long long)b * seq_len * row_stride + h * HS;
    const T* head_k = head_q + C;
    const T* head_v = head_q + 2 * C;
    const int q0 = blockIdx.y * BLOCK_Q;
    const int i = q0 + threadIdx.x;
    const int row = min_(i, seq_len - 1);

    T q[HS], o[HS];
#pragma unroll
    for (int d = 0; d < HS; ++d) {
        q[d] = head_q[row * row_stride + d] * scale;
        o[d] = T(0);
    }
    T m = neg_inf<T>(), l = T(0);
    const int kv_end = min_(seq_len, q0 + BLOCK_Q);  // causal: no row here sees a key past this
    for (int k0 = 0; k0 < kv_end; k0 += BLOCK_K) {
        load_kv_tile<T, HS, BLOCK_K>(head_k, head_v, row_stride, seq_len, k0, k_tile, v_tile);
        __syncthreads();
        T tile_max = neg_inf<T>();
        for (int j = 0; j < BLOCK_K; ++j) {
            T s = T(0);
#pragma unroll
            for (int d = 0; d < HS; ++d) s += q[d] * k_tile[j][d];
            s = (k0 + j <= row) ? s : neg_inf<T>();  // also masks keys past T, since row < T
            score_tile[j][threadIdx.x] = s;
            tile_max = max_(tile_max, s);
        }
        const T m_new = max_(m, tile_max);
        const T alpha = exp_(m - m_new);
        l *= alpha;
#pragma unroll
        for (int d = 0; d < HS; ++d) o[d] *= alpha;
        for (int j = 0; j < BLOCK_K; ++j) {
            const T p = exp_(score_tile[j][threadIdx.x] - m_new);  // 0 where masked
            l += p;
#pragma unroll
            for (int d = 0; d < HS; ++d) o[d] += p * v_tile[j][d];
        }
        m = m_new;
        __syncthreads();  // every thread is done with this tile before the next load
    }
    if (i < seq_len) {
        T* y_row = y + ((long long)b * seq_len + i) * C + h * HS;
        const T inv_l = T(1) / l;
#pragma unroll
        for (int d = 0; d < HS; ++d) y_row[d] = o[d] * inv_l;
        lse[(long long)bh * seq_len + i] = m + log_(l);
    }
}

// Backward, part 1: dq, and D for part 2. Grid and block as the forward; one
// thread per query row i, holding q[i] (scaled), dy[i] and the dq accumulator.
// For each key j <= i, walking the same key tiles as the forward:
//   p  = exp(q . k_j - lse[i])          (P recomputed from the saved logsumexp)
//   dp = dy[i] . v_j                     (forward: y = P @ v)
//   ds = p * (dp - D[i])                 (forward: P = softmax(S))
//   dq += ds * k_j                       (forward: S = q k^T / sqrt(HS))
// then dq *= 1/sqrt(HS). D[i] = dy[i] . y[i] is computed here once and stored.
template <typename T, int HS, int BLOCK_Q, int BLOCK_K>
__global__ void flash_attention_backward_dq(const T* __restrict__ qkv, const T* __restrict__ y,
                                            const T* __restrict__ dy, const T* __restrict__ lse,
                                            T* __restrict__ D, T* __restrict__ dqkv, int seq_len,
                                            int n_head, T scale) {
    __shared__ T k_tile[BLOCK_K][HS];
    __shared__ T v_tile[BLOCK_K][HS];
    const int bh = blockIdx.x, b = bh / n_head, h = bh % n_head;
    const int C = n_head * HS;
    const long long row_stride = 3LL * C;
    const T* head_q = qkv + (long long)b * seq_len * row_stride + h * HS;
    const T* head_k = head_q + C;
    const T* head_v = head_q + 2 * C;
    const int q0 = blockIdx.y * BLOCK_Q;
    const int i = q0 + threadIdx.x;
    const int row = min_(i, seq_len - 1);
    const long long out_row = ((long long)b * seq_len + row) * C + h * HS;  // in y and dy

    T q[HS], dy_row[HS], dq[HS];
    T row_D = T(0);
#pragma unroll
    for (int d = 0; d < HS; ++d) {
        q[d] = head_q[row * row_stride + d] * scale;
        dy_row[d] = dy[out_row + d];
        row_D += dy_row[d] * y[out_row + d];
        dq[d] = T(0);
    }
    const T row_lse = lse[(long long)bh * seq_len + row];
    const int kv_end = min_(seq_len, q0 + BLOCK_Q);
    for (int k0 = 0; k0 < kv_end; k0 += BLOCK_K) {
        load_kv_tile<T, HS, BLOCK_K>(head_k, head_v, row_stride, seq_len, k0, k_tile, v_tile);
        __syncthreads();
        for (int j = 0; j < BLOCK_K; ++j) {
            T s = T(0), dp = T(0);
#pragma unroll
            for (int d = 0; d < HS; ++d) {
                s += q[d] * k_tile[j][d];
                dp += dy_row[d] * v_tile[j][d];
            }
            const T p = (k0 + j <= row) ? exp_(s - row_lse) : T(0);
            const T ds = p * (dp - row_D);
#pragma unroll
            for (int d = 0; d < HS; ++d) dq[d] += ds * k_tile[j][d];
        }
        __syncthreads();
    }
    if (i < seq_len) {
        T* dq_row = dqkv + ((long long)b * seq_len + i) * row_stride + h * HS;
#pragma unroll
        for (int d = 0; d < HS; ++d) dq_row[d] = dq[d] * scale;
        D[(long long)bh * seq_len + i] = row_D;
    }
}

// Backward, part 2: dk and dv. Grid (B*NH, ceil(T / BLOCK_KV)), blockDim.x ==
// 2 * BLOCK_KV: each key row j is owned by a pair of lanes, lane `half` of the pair
// holding the dimensions d = 2e + half (e < HS/2) of k_j, v_j and their gradient
// accumulators, 4 * HS/2 registers. Interleaving the dimensions puts the two lanes
// of a pair on different shared-memory banks. Queries come in tiles of BLOCK_Q
// rows, from the tile holding the block's first key to the end (only i >= j sees
// key j). For each query i >= j:
//   s  = q_i . k_j (the pair adds its halves with one shuffle);  p = exp(s - lse[i])
//   dv += p * dy_i                       (forward: y = P @ v)
//   dp = dy_i . v_j (one more shuffle);  ds = p * (dp - D[i])
//   dk += ds * q_i                       (q pre-scaled, so this is already dS^T q / sqrt(HS))
template <typename T, int HS, int BLOCK_KV, int BLOCK_Q>
__global__ void flash_attention_backward_dkdv(const T* __restrict__ qkv, const T* __restrict__ dy,
                                              const T* __restrict__ lse, const T* __restrict__ D,
                                              T* __restrict__ dqkv, int seq_len, int n_head, T scale) {
    constexpr int HALF = HS / 2;
    __shared__ T q_tile[BLOCK_Q][HS];
    __shared__ T dy_tile[BLOCK_Q][HS];
    __shared__ T lse_tile[BLOCK_Q];
    __shared__ T D_tile[BLOCK_Q];
    const int bh = blockIdx.x, b = bh / n_head, h = bh % n_head;
    const int C = n_head * HS;
    const long long row_stride = 3LL * C;
    const long long seq_offset = (long long)b * seq_len;
    const T* head_q = qkv + seq_offset * row_stride + h * HS;
    const T* head_dy = dy + seq_offset * C + h * HS;
    const T* head_lse = lse + (long long)bh * seq_len;
    const T* head_D = D + (long long)bh * seq_len;
    const int k_first = blockIdx.y * BLOCK_KV;
    const int j = k_first + threadIdx.x / 2;
    const int half = threadIdx.x % 2;
    const int key_row = min_(j, seq_len - 1);

    T k[HALF], v[HALF], dk[HALF], dv[HALF];
#pragma unroll
    for (int e = 0; e < HALF; ++e) {
        k[e] = head_q[key_row * row_stride + C + 2 * e + half];
        v[e] = head_q[key_row * row_stride + 2 * C + 2 * e + half];
        dk[e] = T(0);
        dv[e] = T(0);
    }
    for (int i0 = (k_first / BLOCK_Q) * BLOCK_Q; i0 < seq_len; i0 += BLOCK_Q) {
        for (int e = threadIdx.x; e < BLOCK_Q * HS; e += blockDim.x) {
            const int a = e / HS, d = e % HS, t = i0 + a;
            q_tile[a][d] = t < seq_len ? head_q[t * row_stride + d] * scale : T(0);
            dy_tile[a][d] = t < seq_len ? head_dy[t * C + d] : T(0);
        }
        for (int a = threadIdx.x; a < BLOCK_Q; a += blockDim.x) {
            lse_tile[a] = i0 + a < seq_len ? head_lse[i0 + a] : T(0);
            D_tile[a] = i0 + a < seq_len ? head_D[i0 + a] : T(0);
        }
        __syncthreads();
        for (int a = 0; a < BLOCK_Q; ++a) {
            const int i = i0 + a;
            T s = T(0), dp = T(0);
#pragma unroll
            for (int e = 0; e < HALF; ++e) {
                s += q_tile[a][2 * e + half] * k[e];
                dp += dy_tile[a][2 * e + half] * v[e];
            }
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            dp += __shfl_xor_sync(0xffffffffu, dp, 1);
            const T p = (i >= j && i < seq_len) ? exp_(s - lse_tile[a]) : T(0);
            const T ds = p * (dp - D_tile[a]);
#pragma unroll
            for (int e = 0; e < HALF; ++e) {
                dv[e] += p * dy_tile[a][2 * e + half];
                dk[e] += ds * q_tile[a][2 * e + half];
            }
        }
        __syncthreads();
    }
    if (j < seq_len) {
        T* out = dqkv + (seq_offset + j) * row_stride + h * HS;
#pragma unroll
        for (int e = 0; e < HALF; ++e) {
            out[C + 2 * e + half] = dk[e];
            out[2 * C + 2 * e + half] = dv[e];
        }
    }
}
