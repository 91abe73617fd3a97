// Causal flash attention in bf16 on tensor cores (mma.sync m16n8k16, float32
// accumulation), head size 64: forward, and backward as a dq pass and a dk/dv pass.
// The same algorithm as attention.cu (the float32/float64 SIMT kernels; read that
// file's header for the layout of qkv, y, lse, D and dqkv), with tiles of 64 x 64
// multiplied by warps instead of rows walked by threads. The NumPy formula is
// nanogpt_np/layers/attention.py; kernels/flash_reference.py mirrors this tiling
// and its bf16 roundings step for step (tests compare the two).
//
// Numerics: q, k, v, dy are bf16; every product accumulates in float32; the
// softmax (running max, sum, exp), lse and D are float32. P = softmax(S) is rounded
// to bf16 once, to multiply V (forward) and dY (dv); dS to multiply K (dq) and Q
// (dk). Scores are kept in base-2 units (s * log2(e) / sqrt(64)), so the exponentials
// are exp2; lse is stored in natural-log units, as the other kernels store it.
//
// Work split. A block is 4 warps. In the forward and the dq pass a block owns 64
// query rows, 16 per warp; in the dk/dv pass it owns 64 key rows, 16 per warp. The
// other side (keys, resp. queries) comes in tiles of 64 through shared memory.
// Per warp and tile, each product is 4 x 8 mma instructions: 4 steps of 16 along
// the contraction, 8 column blocks of 8.
//
// Shared memory holds each tile as it lies in memory, a "row tile": row r of 64
// bf16 as 32 words, word w = (x[r][2w], x[r][2w+1]). Rows are padded from 32 to 36
// words, so the 8 row groups of a fragment load fall on different banks. A tile
// serves both kinds of B operand: X^T (S = Q K^T: a word is two neighbours along
// the contraction, as the fragment wants) and X (O = P V: the fragment wants two
// neighbouring rows of one column, so two words give one half each). One copy of
// each tile, loaded with coalesced 16-byte reads, and no transposed copies.
// Sizes (per block): forward and dq 2 tiles, 18.4 KB; dk/dv 2 tiles and two
// 64-float rows, 18.9 KB; all far below the 48 KB of static shared memory.
#include "common.cuh"

#define MMA_HS 64                    // head size
#define MMA_TILE 64                  // rows per block, and per tile of the other side
#define MMA_WARPS 4                  // 16 rows per warp
#define MMA_WORDS (MMA_HS / 2 + 4)   // 32-bit words per padded shared row (144 bytes: rows stay 16-byte aligned)

// Tiles move from global to shared memory 16 bytes (8 bf16) at a time: a tile is
// 64 rows x 8 pieces, 4 pieces per thread. Piece e = threadIdx.x + 128 i is row
// e / 8, words 4 (e % 8) .. 4 (e % 8) + 3, so 8 neighbouring threads read one
// row's 128 contiguous bytes. Each head's row starts 128-byte aligned within a
// row of qkv / dy, and kernels/attention.py hands over 16-byte-aligned arrays.
#define MMA_THREADS (MMA_WARPS * 32)
#define MMA_PIECES (MMA_TILE * (MMA_HS / 8) / MMA_THREADS)  // 4
// 1: fetch the next tile into registers while this one is multiplied (hides the
// loads' latency, costs registers); 0: fetch each tile just before storing it.
// Measured on an H200 (gpu_check's attention row, B=16 NH=12 T=1024, fwd / fwd+bwd):
// 4-byte loads, no prefetch 0.77 / 3.15 ms; 16-byte loads with MMA_PREFETCH 1
// 0.29 / 1.02 ms, with 0 0.29 / 1.05 ms; MMA_PREFETCH 0 with MMA_MIN_BLOCKS 3
// (capped registers, some spills) 0.37 / 1.16 ms.
#ifndef MMA_PREFETCH
#define MMA_PREFETCH 1
#endif
// Blocks per SM the compiler must leave registers for (1: no cap).
#ifndef MMA_MIN_BLOCKS
#define MMA_MIN_BLOCKS 1
#endif

struct words4 {
    unsigned w[4];
};

__device__ __forceinline__ words4 load_words4(const bf16* p) {
#ifdef NANOGPT_EMULATION
    emu_check_aligned(p, 16);
    return {{load_bf16x2(p), load_bf16x2(p + 2), load_bf16x2(p + 4), load_bf16x2(p + 6)}};
#else
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    return {{u.x, u.y, u.z, u.w}};
#endif
}

// This thread's pieces of rows [r0, r0 + 64) of one head's q, k, v or dy (rows
// `stride` values apart) into registers; rows at or past T are zeros. Issued a
// tile ahead, the loads are in flight while the current tile is multiplied.
__device__ __forceinline__ void fetch_tile(words4 (&piece)[MMA_PIECES], const bf16* __restrict__ x,
                                           long long stride, int r0, int seq_len) {
#pragma unroll
    for (int i = 0; i < MMA_PIECES; ++i) {
        const int e = threadIdx.x + i * MMA_THREADS, r = e / 8, c = e % 8;
        piece[i] = r0 + r < seq_len ? load_words4(x + (r0 + r) * stride + 8 * c) : words4{{0u, 0u, 0u, 0u}};
    }
}

// The fetched pieces into a row tile: tile[r][w] = (x[r][2w], x[r][2w+1]).
__device__ __forceinline__ void store_tile(unsigned (*tile)[MMA_WORDS], const words4 (&piece)[MMA_PIECES]) {
#pragma unroll
    for (int i = 0; i < MMA_PIECES; ++i) {
        const int e = threadIdx.x + i * MMA_THREADS, r = e / 8, c = e % 8;
#ifdef NANOGPT_EMULATION
        emu_check_aligned(&tile[r][4 * c], 16);
        for (int k = 0; k < 4; ++k) tile[r][4 * c + k] = piece[i].w[k];
#else
        *reinterpret_cast<uint4*>(&tile[r][4 * c]) = make_uint4(piece[i].w[0], piece[i].w[1], piece[i].w[2], piece[i].w[3]);
#endif
    }
}

// This warp's 16 rows [r0, r0 + 16) of x as the A operand of 4 mma steps over the
// 64 dims: frag[s] covers dims [16 s, 16 s + 16). Rows at or past T are zeros.
__device__ __forceinline__ void load_a_fragments(unsigned (&frag)[4][4], const bf16* __restrict__ x,
                                                 long long stride, int r0, int seq_len) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = r0 + g + 8 * (i % 2), c = 16 * s + 2 * t + 8 * (i / 2);
            frag[s][i] = r < seq_len ? load_bf16x2(x + r * stride + c) : 0u;
        }
    }
}

// acc[n] (n = 0..7, 8 columns each) += A (this warp's 16 x 64, in 4 fragments) @ X^T,
// X a row tile: the 64 x 64 product of 16 rows with the tile's 64 rows.
__device__ __forceinline__ void mma_rows_by_tile(float (&acc)[8][4], const unsigned (&a)[4][4],
                                                 const unsigned (*tile)[MMA_WORDS]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int n = 0; n < 8; ++n) {
            const unsigned b[2] = {tile[8 * n + g][8 * s + t], tile[8 * n + g][8 * s + 4 + t]};
            mma_bf16_16816(acc[n], a[s], b);
        }
    }
}

// The 16 x 8N float block p (as accumulators: p[n] holds columns [8 n, 8 n + 8)),
// rounded to bf16, as the A operand of N/2 mma steps along its columns. The C
// layout of two neighbouring 8-column blocks is exactly the A layout of one
// 16-column step, so this is only a repacking, in registers.
template <int J, int N>
__device__ __forceinline__ void accumulators_to_a(unsigned (&a)[J][4], const float (&p)[N][4]) {
    static_assert(N == 2 * J, "two 8-column accumulator blocks make one 16-column A step");
#pragma unroll
    for (int j = 0; j < J; ++j) {
        a[j][0] = pack_bf16x2(p[2 * j][0], p[2 * j][1]);
        a[j][1] = pack_bf16x2(p[2 * j][2], p[2 * j][3]);
        a[j][2] = pack_bf16x2(p[2 * j + 1][0], p[2 * j + 1][1]);
        a[j][3] = pack_bf16x2(p[2 * j + 1][2], p[2 * j + 1][3]);
    }
}

// acc[n] += A (16 x 64, from accumulators_to_a) @ X, X the 64 x 64 row tile (its
// rows along the contraction): columns of the result are X's 64 dims. The B
// fragment holds X[k][d] and X[k+1][d] in one register; they are the same half
// (d's parity) of the words X[k][d/2] and X[k+1][d/2].
__device__ __forceinline__ void mma_a_by_rows(float (&acc)[8][4], const unsigned (&a)[4][4],
                                              const unsigned (*tile)[MMA_WORDS]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const bool odd_dim = g & 1;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int k = 16 * j + 2 * t;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
            const int w = 4 * n + g / 2;  // the word of dim 8 n + g
            const unsigned b[2] = {same_halves(tile[k][w], tile[k + 1][w], odd_dim),
                                   same_halves(tile[k + 8][w], tile[k + 9][w], odd_dim)};
            mma_bf16_16816(acc[n], a[j], b);
        }
    }
}

// Row g + 8 r of this warp's 16 (half r of each accumulator block), times `scale`,
// rounded to bf16 into out[0 .. 64): the thread's columns 8 n + 2 t and + 1.
__device__ __forceinline__ void store_accumulator_row(bf16* __restrict__ out, const float (&acc)[8][4], int r,
                                                      float scale) {
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < 8; ++n)
        store_bf16x2(out + 8 * n + 2 * t, pack_bf16x2(acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale));
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n)
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
}

// Sum over the 4 lanes that share a row of a fragment (lanes 4g .. 4g+3).
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
    v = max_(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return max_(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// The online softmax's step for one key tile, shared by both forward kernels: with
// this tile's scaled scores s (log2 units, -inf where masked) and each row's
// tile_max, raise the running max m, rescale the running sum l and the output o by
// alpha = 2^(m_old - m_new), and turn s into p = 2^(s - m) added into l.
__device__ __forceinline__ void online_softmax_tile(float (&s)[8][4], const float (&tile_max)[2], float (&m)[2],
                                                    float (&l)[2], float (&o)[8][4]) {
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float m_new = max_(m[r], quad_max(tile_max[r]));  // finite: key 0 is seen by every row
        alpha[r] = exp2f(m[r] - m_new);
        m[r] = m_new;
        l[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s[n][i] = exp2f(s[n][i] - m[i / 2]);  // p; 0 where masked
            l[i / 2] += s[n][i];
            o[n][i] *= alpha[i / 2];
        }
}

// Forward. Grid (B*NH, ceil(T / 64)), 128 threads. Per warp, rows i of its 16 and
// each key tile up to the block's last row (m, l per row, o per row and dim):
//   s = q_i . k_j * scale * log2(e), -inf where j > i
//   m_new = max(m, max_j s);  alpha = 2^(m - m_new);  p = 2^(s - m_new)
//   l = l * alpha + sum_j p;  o = o * alpha + bf16(p) @ v
// then y = o / l and lse = (m + log2 l) * ln 2. Each thread holds rows g and g + 8
// of its warp's 16 (and 16 of the 64 columns of each), so the row max and sum are
// finished by the 4 lanes of a quad; l is summed per thread and finished at the end.
template <int HS>
__global__ void __launch_bounds__(MMA_THREADS, MMA_MIN_BLOCKS) flash_attention_mma_forward(const bf16* __restrict__ qkv, bf16* __restrict__ y,
                                            float* __restrict__ lse, int seq_len, int n_head, float scale_log2) {
    static_assert(HS == MMA_HS, "the tensor-core kernels are written for head size 64");
    __shared__ __align__(16) unsigned k_tile[MMA_TILE][MMA_WORDS];   // keys x dim pairs
    __shared__ __align__(16) unsigned v_tile[MMA_TILE][MMA_WORDS];   // keys x dim pairs
    const int bh = blockIdx.x, b = bh / n_head, h = bh % n_head;
    const int C = n_head * HS;
    const long long stride = 3LL * C;
    const bf16* head_q = qkv + (long long)b * seq_len * stride + h * HS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int q0 = blockIdx.y * MMA_TILE, r0 = q0 + 16 * warp;  // this warp's first row

    unsigned qa[4][4];
    load_a_fragments(qa, head_q, stride, r0, seq_len);
    float o[8][4];
    zero(o);
    float m[2] = {neg_inf<float>(), neg_inf<float>()}, l[2] = {0.0f, 0.0f};
    const int kv_end = min_(seq_len, q0 + MMA_TILE);  // causal: no row of the block sees past this
    words4 k_next[MMA_PIECES], v_next[MMA_PIECES];
    for (int k0 = 0; k0 < kv_end; k0 += MMA_TILE) {
        if (!MMA_PREFETCH || k0 == 0) {
            fetch_tile(k_next, head_q + C, stride, k0, seq_len);
            fetch_tile(v_next, head_q + 2 * C, stride, k0, seq_len);
        }
        __syncthreads();  // everyone is done with the previous tile
        store_tile(k_tile, k_next);
        store_tile(v_tile, v_next);
        __syncthreads();
        if (MMA_PREFETCH && k0 + MMA_TILE < kv_end) {  // the next tile's loads run under this tile's math
            fetch_tile(k_next, head_q + C, stride, k0 + MMA_TILE, seq_len);
            fetch_tile(v_next, head_q + 2 * C, stride, k0 + MMA_TILE, seq_len);
        }
        float s[8][4];
        zero(s);
        mma_rows_by_tile(s, qa, k_tile);
        float tile_max[2] = {neg_inf<float>(), neg_inf<float>()};
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = r0 + g + 8 * (i / 2), key = k0 + 8 * n + 2 * t + i % 2;
                s[n][i] = key <= row && key < seq_len ? s[n][i] * scale_log2 : neg_inf<float>();
                tile_max[i / 2] = max_(tile_max[i / 2], s[n][i]);
            }
        online_softmax_tile(s, tile_max, m, l, o);
        unsigned pa[4][4];
        accumulators_to_a(pa, s);
        mma_a_by_rows(o, pa, v_tile);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] = quad_sum(l[r]);
        const int row = r0 + g + 8 * r;
        if (row < seq_len) {
            store_accumulator_row(y + ((long long)b * seq_len + row) * C + h * HS, o, r, 1.0f / l[r]);
            if (t == 0) lse[(long long)bh * seq_len + row] = (m[r] + log2f(l[r])) * 0.6931471805599453f;
        }
    }
}

// Backward, part 1: dq, and D for part 2. Grid and block as the forward; per warp,
// its 16 query rows i against each key tile j up to the block's last row:
//   p  = 2^(q_i . k_j * scale * log2(e) - lse_i * log2(e)), 0 where j > i
//   dp = dy_i . v_j;   ds = p * (dp - D_i);   dq_i += bf16(ds) @ k_j
// then dq *= scale. D_i = dy_i . y_i (float32, from the bf16 values) is computed
// here first and stored.
template <int HS>
__global__ void __launch_bounds__(MMA_THREADS, MMA_MIN_BLOCKS) flash_attention_mma_backward_dq(const bf16* __restrict__ qkv, const bf16* __restrict__ y,
                                                const bf16* __restrict__ dy, const float* __restrict__ lse,
                                                float* __restrict__ D, bf16* __restrict__ dqkv, int seq_len,
                                                int n_head, float scale, float scale_log2) {
    static_assert(HS == MMA_HS, "the tensor-core kernels are written for head size 64");
    __shared__ __align__(16) unsigned k_tile[MMA_TILE][MMA_WORDS];   // keys x dim pairs    (for q k^T and ds k)
    __shared__ __align__(16) unsigned v_tile[MMA_TILE][MMA_WORDS];   // keys x dim pairs    (for dy v^T)
    const int bh = blockIdx.x, b = bh / n_head, h = bh % n_head;
    const int C = n_head * HS;
    const long long stride = 3LL * C;
    const bf16* head_q = qkv + (long long)b * seq_len * stride + h * HS;
    const bf16* head_dy = dy + (long long)b * seq_len * C + h * HS;
    const bf16* head_y = y + (long long)b * seq_len * C + h * HS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int q0 = blockIdx.y * MMA_TILE, r0 = q0 + 16 * warp;

    unsigned qa[4][4], dya[4][4];
    load_a_fragments(qa, head_q, stride, r0, seq_len);
    load_a_fragments(dya, head_dy, C, r0, seq_len);
    // D = dy . y per row: this thread's 16 dims of rows g and g+8 (where dya holds
    // dy), then the quad's sum
    float row_D[2] = {0.0f, 0.0f}, row_lse2[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = min_(r0 + g + 8 * r, seq_len - 1);
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int c = 16 * s + 2 * t + 8 * half;
                const unsigned dyw = dya[s][r + 2 * half], yw = load_bf16x2(head_y + row * (long long)C + c);
                row_D[r] += bf16x2_lo(dyw) * bf16x2_lo(yw) + bf16x2_hi(dyw) * bf16x2_hi(yw);
            }
        row_D[r] = quad_sum(row_D[r]);
        row_lse2[r] = lse[(long long)bh * seq_len + row] * 1.4426950408889634f;
    }
    float dq[8][4];
    zero(dq);
    const int kv_end = min_(seq_len, q0 + MMA_TILE);
    words4 k_next[MMA_PIECES], v_next[MMA_PIECES];
    for (int k0 = 0; k0 < kv_end; k0 += MMA_TILE) {
        if (!MMA_PREFETCH || k0 == 0) {
            fetch_tile(k_next, head_q + C, stride, k0, seq_len);
            fetch_tile(v_next, head_q + 2 * C, stride, k0, seq_len);
        }
        __syncthreads();
        store_tile(k_tile, k_next);
        store_tile(v_tile, v_next);
        __syncthreads();
        if (MMA_PREFETCH && k0 + MMA_TILE < kv_end) {
            fetch_tile(k_next, head_q + C, stride, k0 + MMA_TILE, seq_len);
            fetch_tile(v_next, head_q + 2 * C, stride, k0 + MMA_TILE, seq_len);
        }
        float p[8][4], dp[8][4];
        zero(p);
        zero(dp);
        mma_rows_by_tile(p, qa, k_tile);    // scores
        mma_rows_by_tile(dp, dya, v_tile);  // dy . v
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = r0 + g + 8 * (i / 2), key = k0 + 8 * n + 2 * t + i % 2;
                const float prob = key <= row && row < seq_len ? exp2f(p[n][i] * scale_log2 - row_lse2[i / 2]) : 0.0f;
                p[n][i] = prob * (dp[n][i] - row_D[i / 2]);  // ds
            }
        unsigned dsa[4][4];
        accumulators_to_a(dsa, p);
        mma_a_by_rows(dq, dsa, k_tile);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = r0 + g + 8 * r;
        if (row < seq_len) {
            store_accumulator_row(dqkv + ((long long)b * seq_len + row) * stride + h * HS, dq, r, scale);
            if (t == 0) D[(long long)bh * seq_len + row] = row_D[r];
        }
    }
}

// Backward, part 2: dk and dv. Grid (B*NH, ceil(T / 64)), 128 threads; per warp,
// its 16 key rows j against each query tile i from the block's first key on, with
// everything transposed (keys down the rows, queries along the columns):
//   p^T = 2^(k_j . q_i * scale * log2(e) - lse_i * log2(e)), 0 where i < j or i >= T
//   dv_j += bf16(p^T) @ dy_i;   dp^T = v_j . dy_i;   ds^T = p^T * (dp^T - D_i)
//   dk_j += bf16(ds^T) @ q_i
// then dk *= scale.
template <int HS>
__global__ void __launch_bounds__(MMA_THREADS, MMA_MIN_BLOCKS) flash_attention_mma_backward_dkdv(const bf16* __restrict__ qkv, const bf16* __restrict__ dy,
                                                  const float* __restrict__ lse, const float* __restrict__ D,
                                                  bf16* __restrict__ dqkv, int seq_len, int n_head, float scale,
                                                  float scale_log2) {
    static_assert(HS == MMA_HS, "the tensor-core kernels are written for head size 64");
    __shared__ __align__(16) unsigned q_tile[MMA_TILE][MMA_WORDS];    // queries x dim pairs  (for k q^T and ds^T q)
    __shared__ __align__(16) unsigned dy_tile[MMA_TILE][MMA_WORDS];   // queries x dim pairs  (for v dy^T and p^T dy)
    __shared__ float lse2_tile[MMA_TILE];
    __shared__ float D_tile[MMA_TILE];
    const int bh = blockIdx.x, b = bh / n_head, h = bh % n_head;
    const int C = n_head * HS;
    const long long stride = 3LL * C;
    const bf16* head_q = qkv + (long long)b * seq_len * stride + h * HS;
    const bf16* head_dy = dy + (long long)b * seq_len * C + h * HS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int j0 = blockIdx.y * MMA_TILE, r0 = j0 + 16 * warp;  // this warp's first key

    unsigned ka[4][4], va[4][4];
    load_a_fragments(ka, head_q + C, stride, r0, seq_len);
    load_a_fragments(va, head_q + 2 * C, stride, r0, seq_len);
    float dk[8][4], dv[8][4];
    zero(dk);
    zero(dv);
    words4 q_next[MMA_PIECES], dy_next[MMA_PIECES];
    for (int i0 = j0; i0 < seq_len; i0 += MMA_TILE) {  // query tiles: those before j0 see no key here
        if (!MMA_PREFETCH || i0 == j0) {
            fetch_tile(q_next, head_q, stride, i0, seq_len);
            fetch_tile(dy_next, head_dy, C, i0, seq_len);
        }
        __syncthreads();
        store_tile(q_tile, q_next);
        store_tile(dy_tile, dy_next);
        for (int a = threadIdx.x; a < MMA_TILE; a += blockDim.x) {
            lse2_tile[a] = i0 + a < seq_len ? lse[(long long)bh * seq_len + i0 + a] * 1.4426950408889634f : 0.0f;
            D_tile[a] = i0 + a < seq_len ? D[(long long)bh * seq_len + i0 + a] : 0.0f;
        }
        __syncthreads();
        if (MMA_PREFETCH && i0 + MMA_TILE < seq_len) {
            fetch_tile(q_next, head_q, stride, i0 + MMA_TILE, seq_len);
            fetch_tile(dy_next, head_dy, C, i0 + MMA_TILE, seq_len);
        }
        float p[8][4], dp[8][4];
        zero(p);
        zero(dp);
        mma_rows_by_tile(p, ka, q_tile);    // scores, transposed
        mma_rows_by_tile(dp, va, dy_tile);  // v . dy
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int key = r0 + g + 8 * (i / 2), col = 8 * n + 2 * t + i % 2, query = i0 + col;
                p[n][i] = query >= key && query < seq_len ? exp2f(p[n][i] * scale_log2 - lse2_tile[col]) : 0.0f;
                dp[n][i] = p[n][i] * (dp[n][i] - D_tile[col]);  // ds^T
            }
        unsigned a[4][4];
        accumulators_to_a(a, p);
        mma_a_by_rows(dv, a, dy_tile);
        accumulators_to_a(a, dp);
        mma_a_by_rows(dk, a, q_tile);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = r0 + g + 8 * r;
        if (key < seq_len) {
            bf16* out = dqkv + ((long long)b * seq_len + key) * stride + h * HS;
            store_accumulator_row(out + C, dk, r, scale);
            store_accumulator_row(out + 2 * C, dv, r, 1.0f);
        }
    }
}

// One m16n8k16 product, D = A @ B for a 16x16 A and a 16x8 B (row-major bf16, D
// float), through mma_bf16_16816 with each lane filling its fragments by the
// layout written above it. Launch with one warp. gpu_check runs it first: if the
// hardware's fragment layout were not the one the attention kernels assume, this
// row says so plainly.
__global__ void mma_layout_check(const bf16* __restrict__ A, const bf16* __restrict__ B, float* __restrict__ D) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    unsigned a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = load_bf16x2(A + (g + 8 * (i % 2)) * 16 + 2 * t + 8 * (i / 2));
    for (int i = 0; i < 2; ++i) {
        const int k = 2 * t + 8 * i;
        b[i] = (unsigned)B[k * 8 + g].bits | ((unsigned)B[(k + 1) * 8 + g].bits << 16);
    }
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_bf16_16816(d, a, b);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

// ================================================================================
// FlashAttention-2's design (the hs=64 bf16 path; the kernels above stay for
// comparison). What changes against the kernels above:
//   - tiles move global -> shared with cp.async (16 bytes per copy, no registers
//     in between), two stages deep: tile j+1 is in flight while tile j is
//     multiplied, and one __syncthreads per tile;
//   - shared tiles are swizzled: the 16-byte chunk c of row r (8 chunks of 8 bf16
//     per 64-dim row) sits at chunk c ^ (r % 8), so the 8 rows one ldmatrix
//     reads (and the 8 chunks of a row cp.async writes) fall on different banks;
//   - B fragments (and the Q, K, dS A fragments) come from ldmatrix.x4, .trans
//     where the fragment wants a column pair (V in P @ V, dO in P^T @ dO, ...);
//   - forward: 128 query rows per block, 8 warps x 16; the causal mask only on
//     tiles that cross a warp's diagonal; a warp skips key tiles wholly after its
//     rows; the heaviest query tiles (the last) are scheduled first;
//   - backward in FlashAttention-2's order: D = rowsum(dO * O) first (a small
//     kernel), then one block per 64 keys walks the query tiles (32 rows each)
//     with dK, dV in registers; dQ's share of each (key block, query tile) goes
//     into a float32 buffer with atomicAdd, and a last kernel rounds it into dqkv
//     (and, when asked, sums dqkv's columns on the way: c_attn's bias gradient).
//     5 tile products per (key block, query tile) instead of the 7 above.
// The arithmetic per row is that of the kernels above (same roundings), so
// flash_reference.fa2_forward / fa2_backward mirror it.

#define FA2_ROWS 128    // forward: query rows per block
#define FA2_KEYS 64     // forward: keys per tile; backward: keys per block
#define FA2_QUERIES 32  // backward: query rows per tile
#define FA2_FWD_THREADS 256
#define FA2_BWD_THREADS 128

// cp.async.cg: 16 bytes global -> shared, bypassing registers; zeros where
// `valid` is false (rows past T), reading nothing then.
__device__ __forceinline__ void cp_async16(void* shared_dst, const void* global_src, bool valid) {
#ifdef NANOGPT_EMULATION
    emu_cp_async(shared_dst, global_src, valid ? 16 : 0);
#else
    const unsigned dst = (unsigned)__cvta_generic_to_shared(shared_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src), "r"(valid ? 16 : 0)
                 : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef NANOGPT_EMULATION
    emu_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Wait until at most `pending` of this thread's committed groups are in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef NANOGPT_EMULATION
    emu_cp_async_wait(pending);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

// ldmatrix.x4: four 8x8 bf16 matrices; lane l gives the address of row l % 8 of
// matrix l / 8, and register i receives matrix i's (row l/4, columns 2(l%4), +1);
// the .trans form receives (rows 2(l%4), +1 of column l/4): a B fragment of X
// when X's rows run along the contraction.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const unsigned* row) {
#ifdef NANOGPT_EMULATION
    emu_ldmatrix(r, 4, false, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(row)) : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const unsigned* row) {
#ifdef NANOGPT_EMULATION
    emu_ldmatrix(r, 4, true, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(row)) : "memory");
#endif
}

// A swizzled shared tile of 64-dim bf16 rows: 32 words a row, chunk c (dims
// 8c .. 8c+7) of row r at words 4 (c ^ (r % 8)) .. + 3.
__device__ __forceinline__ unsigned* swizzled(unsigned* tile, int r, int c) { return tile + 32 * r + 4 * (c ^ (r & 7)); }
__device__ __forceinline__ const unsigned* swizzled(const unsigned* tile, int r, int c) {
    return tile + 32 * r + 4 * (c ^ (r & 7));
}

// Rows [r0, r0 + rows) of one head of x (rows `stride` apart) into a swizzled tile
// with cp.async, spread over `threads` threads; rows at or past T become zeros.
template <int rows, int threads>
__device__ __forceinline__ void copy_rows_async(unsigned* tile, const bf16* __restrict__ x, long long stride, int r0,
                                                int seq_len) {
    static_assert(rows * 8 % threads == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int i = 0; i < rows * 8 / threads; ++i) {
        const int e = threadIdx.x + i * threads, r = e / 8, c = e % 8;
        const bool valid = r0 + r < seq_len;
        cp_async16(swizzled(tile, r, c), x + (valid ? r0 + r : 0) * stride + 8 * c, valid);
    }
}

// The A fragments (4 steps of 16 dims) of 16 rows [m0, m0 + 16) of a swizzled tile.
__device__ __forceinline__ void ldmatrix_a_rows(unsigned (&a)[4][4], const unsigned* tile, int m0) {
    const int lane = threadIdx.x % 32, i = lane / 8;
#pragma unroll
    for (int s = 0; s < 4; ++s) ldmatrix_x4(a[s], swizzled(tile, m0 + lane % 8 + 8 * (i % 2), 2 * s + i / 2));
}

// acc[n] (n < N, 8 columns each) += A (16 rows x 64 dims, 4 fragments) @ X^T for
// rows [0, 8 N) of the swizzled tile X: B fragments K[key][dim pair] by ldmatrix.
template <int N>
__device__ __forceinline__ void mma_rows_by_swizzled(float (&acc)[N][4], const unsigned (&a)[4][4], const unsigned* tile) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            unsigned b[4];  // dims 32 half + 8 i + (2t, 2t+1) of row 8 n + g, i = 0..3
            ldmatrix_x4(b, swizzled(tile, 8 * n + lane % 8, 4 * half + lane / 8));
            mma_bf16_16816(acc[n], a[2 * half], {b[0], b[1]});
            mma_bf16_16816(acc[n], a[2 * half + 1], {b[2], b[3]});
        }
}

// acc[n] (8 blocks of 8 dims) += A (16 rows x 16 K, K = 16 ksteps rows of X) @ X,
// X a swizzled tile whose rows run along the contraction: B fragments by ldmatrix.trans.
template <int KSTEPS>
__device__ __forceinline__ void mma_a_by_swizzled(float (&acc)[8][4], const unsigned (&a)[KSTEPS][4], const unsigned* tile) {
    const int lane = threadIdx.x % 32, i = lane / 8;
#pragma unroll
    for (int j = 0; j < KSTEPS; ++j)
#pragma unroll
        for (int pair = 0; pair < 4; ++pair) {
            unsigned b[4];  // rows 16 j + (0..7 | 8..15) of dims 16 pair + (0..7 | 8..15)
            ldmatrix_x4_trans(b, swizzled(tile, 16 * j + lane % 8 + 8 * (i % 2), 2 * pair + i / 2));
            mma_bf16_16816(acc[2 * pair], a[j], {b[0], b[1]});
            mma_bf16_16816(acc[2 * pair + 1], a[j], {b[2], b[3]});
        }
}

// Forward. Grid (B*NH, ceil(T / 128)), 256 threads; block y takes query tile
// last - y, so the heaviest tiles start first. Per warp: 16 query rows, the
// online softmax of flash_attention_mma_forward over 64-key tiles.
template <int HS>
__global__ void __launch_bounds__(FA2_FWD_THREADS, 1) flash_attention_fa2_forward(const bf16* __restrict__ qkv, bf16* __restrict__ y,
                                        float* __restrict__ lse, int seq_len, int n_head, float scale_log2) {
    static_assert(HS == MMA_HS, "the tensor-core kernels are written for head size 64");
    // [stage][k, v]: two stages of a K and a V tile; before the loop, stage 1
    // (16 KB in a row) holds this block's 128 query rows
    __shared__ __align__(128) unsigned kv[2][2][FA2_KEYS * 32];
    unsigned* q_tile = kv[1][0];
    const int bh = blockIdx.x, b = bh / n_head, h = bh % n_head;
    const int C = n_head * HS;
    const long long stride = 3LL * C;
    const bf16* head_q = qkv + (long long)b * seq_len * stride + h * HS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * FA2_ROWS, r0 = q0 + 16 * warp;
    const int n_tiles = (min_(seq_len, q0 + FA2_ROWS) + FA2_KEYS - 1) / FA2_KEYS;  // causal: no row sees past the block's last

    copy_rows_async<FA2_ROWS, FA2_FWD_THREADS>(q_tile, head_q, stride, q0, seq_len);
    copy_rows_async<FA2_KEYS, FA2_FWD_THREADS>(kv[0][0], head_q + C, stride, 0, seq_len);
    copy_rows_async<FA2_KEYS, FA2_FWD_THREADS>(kv[0][1], head_q + 2 * C, stride, 0, seq_len);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned qa[4][4];
    ldmatrix_a_rows(qa, q_tile, 16 * warp);
    float o[8][4];
    zero(o);
    float m[2] = {neg_inf<float>(), neg_inf<float>()}, l[2] = {0.0f, 0.0f};
    for (int j = 0; j < n_tiles; ++j) {
        cp_async_wait<0>();  // tile j has landed (this thread's copies) ...
        __syncthreads();     // ... everyone's; and every warp is done with stage (j + 1) % 2
        if (j + 1 < n_tiles) {
            copy_rows_async<FA2_KEYS, FA2_FWD_THREADS>(kv[(j + 1) % 2][0], head_q + C, stride, (j + 1) * FA2_KEYS, seq_len);
            copy_rows_async<FA2_KEYS, FA2_FWD_THREADS>(kv[(j + 1) % 2][1], head_q + 2 * C, stride, (j + 1) * FA2_KEYS, seq_len);
            cp_async_commit();
        }
        const int k0 = j * FA2_KEYS;
        if (k0 > r0 + 15 || r0 >= seq_len) continue;  // every key of the tile is after this warp's rows
        float s[8][4];
        zero(s);
        mma_rows_by_swizzled(s, qa, kv[j % 2][0]);
        const bool diagonal = k0 + FA2_KEYS - 1 > r0;  // some key after some row of this warp
        float tile_max[2] = {neg_inf<float>(), neg_inf<float>()};
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = r0 + g + 8 * (i / 2), key = k0 + 8 * n + 2 * t + i % 2;
                s[n][i] = !diagonal || key <= row ? s[n][i] * scale_log2 : neg_inf<float>();
                tile_max[i / 2] = max_(tile_max[i / 2], s[n][i]);
            }
        online_softmax_tile(s, tile_max, m, l, o);
        unsigned pa[4][4];
        accumulators_to_a(pa, s);
        mma_a_by_swizzled(o, pa, kv[j % 2][1]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] = quad_sum(l[r]);
        const int row = r0 + g + 8 * r;
        if (row < seq_len) {
            store_accumulator_row(y + ((long long)b * seq_len + row) * C + h * HS, o, r, 1.0f / l[r]);
            if (t == 0) lse[(long long)bh * seq_len + row] = (m[r] + log2f(l[r])) * 0.6931471805599453f;
        }
    }
}

// Backward, before the main kernel: D[bh][i] = dO_i . O_i (float32 sums of the
// bf16 values), one warp per (b, t, h) row, and the float32 dQ buffer zeroed.
// 256 threads; grid ceil(B * T * NH / 8).
template <int HS>
__global__ void __launch_bounds__(256) flash_attention_fa2_backward_dot(const bf16* __restrict__ y, const bf16* __restrict__ dy,
                                                                      float* __restrict__ D, float* __restrict__ dq_sum,
                                                                      int seq_len, int n_head, int rows) {
    static_assert(HS == 64, "one bf16 pair per lane");
    const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;  // row = (b * T + t) * NH + h
    if (row >= rows) return;
    const int h = row % n_head, bt = row / n_head, b = bt / seq_len, t = bt % seq_len;
    const long long at = (long long)row * HS + 2 * lane;  // y, dy: (B, T, NH, 64)
    const unsigned yw = load_bf16x2(y + at), dyw = load_bf16x2(dy + at);
    const float dot = warp_sum(bf16x2_lo(yw) * bf16x2_lo(dyw) + bf16x2_hi(yw) * bf16x2_hi(dyw));
    const long long bh = (long long)b * n_head + h;
    if (lane == 0) D[bh * seq_len + t] = dot;
    dq_sum[(bh * seq_len + t) * HS + 2 * lane] = 0.0f;
    dq_sum[(bh * seq_len + t) * HS + 2 * lane + 1] = 0.0f;
}

// Backward, main kernel. Grid (B*NH, ceil(T / 64)), 128 threads; block y takes
// keys [j0, j0 + 64), 16 per warp, the heaviest (first) key blocks first. Per
// query tile i0 = j0, j0 + 32, ... (everything transposed: keys down the rows):
//   p^T  = 2^(k . q * scale * log2(e) - lse * log2(e)), 0 where query < key or query >= T
//   dv  += bf16(p^T) @ dO;   dp^T = v . dO;   ds^T = p^T * (dp^T - D)
//   dk  += bf16(ds^T) @ q;   ds^T -> shared;  dq[i0 .. i0 + 32) += scale * bf16(ds) @ k  (atomicAdd)
// then dk *= scale, and dk, dv into dqkv. Q, dO, lse, D of tile i + 1 load (cp.async
// for Q and dO) while tile i is multiplied.
template <int HS>
__global__ void __launch_bounds__(FA2_BWD_THREADS, 1) flash_attention_fa2_backward(const bf16* __restrict__ qkv, const bf16* __restrict__ dy,
                                         const float* __restrict__ lse, const float* __restrict__ D,
                                         float* __restrict__ dq_sum, bf16* __restrict__ dqkv, int seq_len,
                                         int n_head, float scale, float scale_log2) {
    static_assert(HS == MMA_HS, "the tensor-core kernels are written for head size 64");
    __shared__ __align__(128) unsigned k_tile[FA2_KEYS * 32];            // this block's keys (for dq)
    __shared__ __align__(128) unsigned q_tile[2][FA2_QUERIES * 32];      // [stage]
    __shared__ __align__(128) unsigned dy_tile[2][FA2_QUERIES * 32];     // [stage]
    __shared__ __align__(128) unsigned ds_tile[FA2_KEYS * FA2_QUERIES / 2];  // ds^T: 64 keys x 32 queries, swizzled 16-byte chunks
    __shared__ float lse2_tile[2][FA2_QUERIES], D_tile[2][FA2_QUERIES];   // [stage]
    const int bh = blockIdx.x, b = bh / n_head, h = bh % n_head;
    const int C = n_head * HS;
    const long long stride = 3LL * C;
    const bf16* head_q = qkv + (long long)b * seq_len * stride + h * HS;
    const bf16* head_dy = dy + (long long)b * seq_len * C + h * HS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int j0 = blockIdx.y * FA2_KEYS, kw = j0 + 16 * warp;  // the block's and this warp's first key
    const int n_tiles = (seq_len - j0 + FA2_QUERIES - 1) / FA2_QUERIES;  // query tiles from j0 to T

    // the stage-s loads of query tile i0: Q and dO by cp.async, lse and D by plain loads
    auto load_tile = [&](int stage, int i0) {
        copy_rows_async<FA2_QUERIES, FA2_BWD_THREADS>(q_tile[stage], head_q, stride, i0, seq_len);
        copy_rows_async<FA2_QUERIES, FA2_BWD_THREADS>(dy_tile[stage], head_dy, C, i0, seq_len);
        cp_async_commit();
        const int a = threadIdx.x % FA2_QUERIES;
        if (threadIdx.x < FA2_QUERIES)
            lse2_tile[stage][a] = i0 + a < seq_len ? lse[(long long)bh * seq_len + i0 + a] * 1.4426950408889634f : 0.0f;
        else if (threadIdx.x < 2 * FA2_QUERIES)
            D_tile[stage][a] = i0 + a < seq_len ? D[(long long)bh * seq_len + i0 + a] : 0.0f;
    };
    copy_rows_async<FA2_KEYS, FA2_BWD_THREADS>(k_tile, head_q + C, stride, j0, seq_len);
    load_tile(0, j0);
    unsigned va[4][4];
    load_a_fragments(va, head_q + 2 * C, stride, kw, seq_len);
    float dk[8][4], dv[8][4];
    zero(dk);
    zero(dv);
    unsigned ka[4][4];
    for (int it = 0; it < n_tiles; ++it) {
        const int i0 = j0 + it * FA2_QUERIES, stage = it % 2;
        cp_async_wait<0>();  // tile it (and, the first time, the key tile) has landed ...
        __syncthreads();     // ... for everyone; everyone is done with stage (it + 1) % 2 and with ds_tile
        if (it == 0) ldmatrix_a_rows(ka, k_tile, 16 * warp);
        if (it + 1 < n_tiles) load_tile((it + 1) % 2, i0 + FA2_QUERIES);
        float p[4][4], dp[4][4];  // 16 keys x 32 queries
        zero(p);
        zero(dp);
        mma_rows_by_swizzled(p, ka, q_tile[stage]);   // scores^T
        mma_rows_by_swizzled(dp, va, dy_tile[stage]);  // v . dO
        const bool diagonal = i0 < kw + 15 || i0 + FA2_QUERIES > seq_len;  // some query before a key, or past T
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int key = kw + g + 8 * (i / 2), col = 8 * n + 2 * t + i % 2, query = i0 + col;
                const float prob = !diagonal || (query >= key && query < seq_len)
                                       ? exp2f(p[n][i] * scale_log2 - lse2_tile[stage][col]) : 0.0f;
                p[n][i] = prob;
                dp[n][i] = prob * (dp[n][i] - D_tile[stage][col]);  // ds^T
            }
        unsigned a[2][4];
        accumulators_to_a(a, p);
        mma_a_by_swizzled(dv, a, dy_tile[stage]);
        accumulators_to_a(a, dp);
        mma_a_by_swizzled(dk, a, q_tile[stage]);
        // ds^T (bf16) into shared: row = key (64), 32 queries = 4 chunks, chunk c at c ^ ((row / 2) % 4)
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = 16 * warp + g + 8 * r;
                ds_tile[16 * row + 4 * (n ^ ((row / 2) & 3)) + t] = a[n / 2][r + 2 * (n % 2)];
            }
        __syncthreads();  // ds^T complete
        // dq for query rows 16 (warp % 2) .. + 16 and dims 32 (warp / 2) .. + 32 of the tile,
        // over the block's 64 keys: A = ds (from ds^T by ldmatrix.trans), B = k (ldmatrix.trans)
        float dq[4][4];
        zero(dq);
        const int m0 = 16 * (warp % 2), d0 = 32 * (warp / 2), i = lane / 8;
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            unsigned dsa[4];
            const int row = 16 * s + lane % 8 + 8 * (i / 2), chunk = m0 / 8 + i % 2;
            ldmatrix_x4_trans(dsa, ds_tile + 16 * row + 4 * (chunk ^ ((row / 2) & 3)));
#pragma unroll
            for (int pair = 0; pair < 2; ++pair) {
                unsigned kb[4];
                ldmatrix_x4_trans(kb, swizzled(k_tile, 16 * s + lane % 8 + 8 * (i % 2), d0 / 8 + 2 * pair + i / 2));
                mma_bf16_16816(dq[2 * pair], dsa, {kb[0], kb[1]});
                mma_bf16_16816(dq[2 * pair + 1], dsa, {kb[2], kb[3]});
            }
        }
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int query = i0 + m0 + g + 8 * (e / 2);
                if (query < seq_len)
                    atomicAdd(dq_sum + ((long long)bh * seq_len + query) * HS + d0 + 8 * n + 2 * t + e % 2, dq[n][e] * scale);
            }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = kw + g + 8 * r;
        if (key < seq_len) {
            bf16* out = dqkv + ((long long)b * seq_len + key) * stride + h * HS;
            store_accumulator_row(out + C, dk, r, scale);
            store_accumulator_row(out + 2 * C, dv, r, 1.0f);
        }
    }
}

// Backward, last: the float32 dq sums rounded to bf16 into dqkv's q part. One
// thread per pair of dims; grid-stride.
template <int HS>
__global__ void __launch_bounds__(256) flash_attention_fa2_backward_dq_store(const float* __restrict__ dq_sum, bf16* __restrict__ dqkv,
                                                                           int seq_len, int n_head, long long pairs) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < pairs; e += (long long)gridDim.x * blockDim.x) {
        const int d = 2 * (int)(e % (HS / 2));
        const long long row = e / (HS / 2);  // (bh, t)
        const int t = (int)(row % seq_len), bh = (int)(row / seq_len), b = bh / n_head, h = bh % n_head;
        const float* src = dq_sum + row * HS + d;
        store_bf16x2(dqkv + ((long long)b * seq_len + t) * 3 * n_head * HS + h * HS + d, pack_bf16x2(src[0], src[1]));
    }
}

// Backward, last, when the caller also wants dqkv's column sums (the block's schedule,
// kernels/block.py: c_attn's bias gradient is dqkv summed over rows): the same dq
// store, laid out as fused.cu's column_sums, so that the sums need no pass of their
// own. Block (bx, by) takes rows [by * rows_per_chunk, ...) of dqkv's B*T and column
// pairs bx * 128 + threadIdx.x of its 3C; a thread walks its rows in order, stores
// its two q dims (rounded from dq_sum) where its columns are q's, and sums its two
// columns as they lie in dqkv: its own rounded q, or the dk, dv the main kernel
// wrote, in column_sums' order (COLUMN_ROWS row lanes, each in row order, then the
// lanes in order). Row by of part (n_chunks, part_stride) gets the sums: bit for bit
// what column_sums would write, without reading q back. A warp's 64
// columns are one head of q, k or v (C is a multiple of 64), so the q / kv branch
// never diverges. 128 threads; grid (ceil(3C / 256), n_chunks).
template <int HS>
__global__ void __launch_bounds__(128) flash_attention_fa2_backward_dq_store_sums(
    const float* __restrict__ dq_sum, bf16* __restrict__ dqkv, float* __restrict__ part, int seq_len, int n_head,
    int n_rows, int rows_per_chunk, int part_stride) {
    const int C = n_head * HS, c = 2 * (blockIdx.x * blockDim.x + threadIdx.x);  // columns c, c + 1
    if (c >= 3 * C) return;
    const int r0 = blockIdx.y * rows_per_chunk, r1 = min_(n_rows, r0 + rows_per_chunk);
    float lo[COLUMN_ROWS], hi[COLUMN_ROWS];  // column_sums' row lanes: lane k has rows r0 + k, r0 + k + 8, ...
#pragma unroll
    for (int k = 0; k < COLUMN_ROWS; ++k) lo[k] = hi[k] = 0.0f;
    for (int base = r0; base < r1; base += COLUMN_ROWS) {
#pragma unroll
        for (int k = 0; k < COLUMN_ROWS; ++k) {
            const int r = base + k;  // r = b * T + t
            if (r >= r1) break;
            bf16* at = dqkv + (long long)r * 3 * C + c;
            unsigned w;
            if (c < C) {  // q: head c / HS, dim c % HS; dq_sum is (B, NH, T, HS)
                const float* src =
                    dq_sum + (((long long)(r / seq_len) * n_head + c / HS) * seq_len + r % seq_len) * HS + c % HS;
                w = pack_bf16x2(src[0], src[1]);
                store_bf16x2(at, w);
            } else {
                w = load_bf16x2(at);
            }
            lo[k] += bf16x2_lo(w);  // the stored bf16, widened: column_sums' A(in[i])
            hi[k] += bf16x2_hi(w);
        }
    }
    float lo_total = lo[0], hi_total = hi[0];  // the lanes added in order, as write_column_chunk does
#pragma unroll
    for (int k = 1; k < COLUMN_ROWS; ++k) {
        lo_total += lo[k];
        hi_total += hi[k];
    }
    float* out = part + (long long)blockIdx.y * part_stride + c;
    out[0] = lo_total;
    out[1] = hi_total;
}
