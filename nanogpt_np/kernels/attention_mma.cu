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

// The 16 x 64 float block p (as accumulators: p[n] holds columns [8 n, 8 n + 8)),
// rounded to bf16, as the A operand of 4 mma steps along its 64 columns. The C
// layout of two neighbouring 8-column blocks is exactly the A layout of one
// 16-column step, so this is only a repacking, in registers.
__device__ __forceinline__ void accumulators_to_a(unsigned (&a)[4][4], const float (&p)[8][4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
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

__device__ __forceinline__ void zero(float (&acc)[8][4]) {
#pragma unroll
    for (int n = 0; n < 8; ++n)
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
