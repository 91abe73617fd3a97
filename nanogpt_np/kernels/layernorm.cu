// LayerNorm forward and backward. The NumPy formula they match is
// nanogpt_np/layers/layernorm.py.
//
// Layout: x, out, dout, dx are (N, C) row-major, N = B*T rows; weight, bias (C,);
// mean, rstd (N,): the two per-row statistics the forward saves for backward.
// Types: x (and dx) are TX, out (and dout) TO. In single precision both are the
// model's dtype; in the mixed-precision path x is the float32 residual stream and
// out/dout are bf16 (the matmul that follows reads bf16), so the cast to bf16 is
// fused into the forward and the widening of dout into the backward. Arithmetic,
// the statistics and the parameters are in A = acc_t<TX> (float for float/bf16).
#include "common.cuh"

// One warp per row: the 32 lanes stride over the C channels, then combine their
// partial sums with shuffles. Launch with blockDim.x a multiple of 32 and
// gridDim.x = ceil(N / (blockDim.x / 32)).
template <typename TX, typename TO>
__global__ void layernorm_forward(const TX* __restrict__ x, const acc_t<TX>* __restrict__ weight,
                                  const acc_t<TX>* __restrict__ bias, TO* __restrict__ out,
                                  acc_t<TX>* __restrict__ mean_out, acc_t<TX>* __restrict__ rstd_out,
                                  int N, int C, acc_t<TX> eps) {
    using A = acc_t<TX>;
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;  // the whole warp leaves together: no shuffle is left half-done
    const TX* x_row = x + (long long)row * C;
    // mean = x.mean(-1)
    A sum = 0;
    for (int c = lane; c < C; c += 32) sum += A(x_row[c]);
    const A mean = warp_sum(sum) / C;
    // var = ((x - mean)^2).mean(-1): a second pass over the row (it is in cache),
    // which is more accurate than E[x^2] - mean^2
    A sq = 0;
    for (int c = lane; c < C; c += 32) {
        const A d = A(x_row[c]) - mean;
        sq += d * d;
    }
    const A rstd = A(1) / sqrt_(warp_sum(sq) / C + eps);
    // out = (x - mean) * rstd * weight + bias
    TO* out_row = out + (long long)row * C;
    for (int c = lane; c < C; c += 32) out_row[c] = TO((A(x_row[c]) - mean) * rstd * weight[c] + bias[c]);
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// The residual add of a block's output projection and the LayerNorm that reads its
// result, in one pass: x_out = x + (a + abias) (fused.cu's bias_residual, the same
// bits), then out = layernorm(x_out) as layernorm_forward computes it (the row is
// read back from x_out by the lanes that wrote it). NumPy:
//     x_out = x + (a + abias);  out = (x_out - mean) * rstd * weight + bias
// TX: the residual stream (float, double); T: a's dtype; TO: out's. Launched like
// layernorm_forward.
template <typename TX, typename T, typename TO>
__global__ void residual_layernorm_forward(const TX* __restrict__ x, const T* __restrict__ a,
                                           const acc_t<TX>* __restrict__ abias, TX* __restrict__ x_out,
                                           const acc_t<TX>* __restrict__ weight, const acc_t<TX>* __restrict__ bias,
                                           TO* __restrict__ out, acc_t<TX>* __restrict__ mean_out,
                                           acc_t<TX>* __restrict__ rstd_out, int N, int C, acc_t<TX> eps) {
    using A = acc_t<TX>;
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const long long offset = (long long)row * C;
    TX* x_row = x_out + offset;
    A sum = 0;
    for (int c = lane; c < C; c += 32) {
        const TX v = TX(A(x[offset + c]) + (A(acc_t<T>(a[offset + c])) + abias[c]));
        x_row[c] = v;
        sum += A(v);
    }
    const A mean = warp_sum(sum) / C;
    A sq = 0;
    for (int c = lane; c < C; c += 32) {
        const A d = A(x_row[c]) - mean;
        sq += d * d;
    }
    const A rstd = A(1) / sqrt_(warp_sum(sq) / C + eps);
    TO* out_row = out + offset;
    for (int c = lane; c < C; c += 32) out_row[c] = TO((A(x_row[c]) - mean) * rstd * weight[c] + bias[c]);
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// The two row means LayerNorm's dx needs, mean(g) and mean(g * xhat) with
// g = dout * weight, from one warp's pass over a row (both backward kernels use it).
template <typename TO, typename TX, typename A>
__device__ __forceinline__ void layernorm_row_means(const TO* __restrict__ dout, const TX* __restrict__ x,
                                                    const A* __restrict__ weight, long long offset, A m, A r,
                                                    int C, int lane, A& mean_g, A& mean_g_xhat) {
    A sum_g = 0, sum_g_xhat = 0;
    for (int c = lane; c < C; c += 32) {
        const A xhat = (A(x[offset + c]) - m) * r;
        const A g = A(dout[offset + c]) * weight[c];
        sum_g += g;
        sum_g_xhat += g * xhat;
    }
    mean_g = warp_sum(sum_g) / C;
    mean_g_xhat = warp_sum(sum_g_xhat) / C;
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dout * weight,
// xhat = (x - mean) * rstd recomputed from the saved statistics. With
// accumulate != 0 the result is added into dx instead of written (the residual
// stream's gradient already there: the block's `dx = dx + dm`, fused).
// One warp per row, launched like layernorm_forward.
template <typename TO, typename TX>
__global__ void layernorm_backward_dx(const TO* __restrict__ dout, const TX* __restrict__ x,
                                      const acc_t<TX>* __restrict__ weight, const acc_t<TX>* __restrict__ mean,
                                      const acc_t<TX>* __restrict__ rstd, TX* __restrict__ dx, int N, int C,
                                      int accumulate) {
    using A = acc_t<TX>;
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const long long offset = (long long)row * C;
    const A m = mean[row], r = rstd[row];
    A mean_g, mean_g_xhat;
    layernorm_row_means(dout, x, weight, offset, m, r, C, lane, mean_g, mean_g_xhat);
    for (int c = lane; c < C; c += 32) {
        const A xhat = (A(x[offset + c]) - m) * r;
        const A g = A(dout[offset + c]) * weight[c];
        const A value = r * (g - mean_g - xhat * mean_g_xhat);
        dx[offset + c] = TX(accumulate ? A(dx[offset + c]) + value : value);
    }
}

// dweight = sum over rows of dout * xhat, dbias = sum over rows of dout, in two
// steps so the result does not depend on thread timing (no atomics): block
// (bx, by) sums rows [by * rows_per_chunk, ...) of the columns bx * blockDim.x + tid
// into row by of part, (n_chunks, part_stride): dweight's in columns [0, C), dbias's in
// [C, 2C) (one array: the two sit side by side in the flat gradients). The caller sums the
// n_chunks partial rows. Neighbouring threads read neighbouring columns, so every
// row is read in coalesced pieces.
//
// with_cast: the same pass also reads the residual stream's gradient as it now is
// (resid: dx after layernorm_backward_dx added into it), writes it converted to TO
// (cast_out: the operand of the matmul backward that comes next) and its column
// partial sums (at rpart_offset in part, row stride rpart_stride: that matmul's bias
// gradient; one array with the LayerNorm's own partial sums at part_offset), the work
// of fused.cu's cast_column_sums, without a pass of its own. NumPy:
//     cast_out = resid.astype(TO);  part[rpart_offset + k * rpart_stride + c] = resid[chunk k, c].sum()
template <typename TO, typename TX>
__global__ void layernorm_backward_params(const TO* __restrict__ dout, const TX* __restrict__ x,
                                          const acc_t<TX>* __restrict__ mean, const acc_t<TX>* __restrict__ rstd,
                                          acc_t<TX>* __restrict__ part, long long part_offset, int N, int C,
                                          int rows_per_chunk, int part_stride, const TX* __restrict__ resid,
                                          TO* __restrict__ cast_out, long long rpart_offset, int rpart_stride,
                                          int with_cast) {
    using A = acc_t<TX>;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min_(N, r0 + rows_per_chunk);
    A dw = 0, db = 0, dr = 0;
    for (int r = r0; r < r1; ++r) {
        const long long i = (long long)r * C + c;
        const A d = A(dout[i]);
        dw += d * ((A(x[i]) - mean[r]) * rstd[r]);
        db += d;
        if (with_cast) {
            const A g = A(resid[i]);
            cast_out[i] = TO(g);
            dr += g;  // the exact gradient, before rounding to TO
        }
    }
    part[part_offset + (long long)blockIdx.y * part_stride + c] = dw;
    part[part_offset + (long long)blockIdx.y * part_stride + C + c] = db;
    if (with_cast) part[rpart_offset + (long long)blockIdx.y * rpart_stride + c] = dr;
}

// layernorm_backward_dx and layernorm_backward_params (with its cast) in one kernel:
// block by takes the rows of chunk by, each warp a row at a time, and the dweight,
// dbias (and residual) column sums of its rows stay in the lanes' registers (lane l
// holds columns l, l + 32, ...: C <= 32 * LN_MAX_COLUMNS_PER_LANE) until the block's
// warps add theirs into shared memory one after another, in a fixed order (no atomics:
// the same bits every run), and the block writes row by of the partial sums. The same
// formulas as the two kernels above, one read of dout and x instead of two.
// Launch with gridDim.x = n_chunks, blockDim.x = LN_FUSED_THREADS.
#define LN_MAX_COLUMNS_PER_LANE 32
#define LN_FUSED_THREADS 256
template <typename TO, typename TX>
__global__ void layernorm_backward_fused(const TO* __restrict__ dout, const TX* __restrict__ x,
                                         const acc_t<TX>* __restrict__ weight, const acc_t<TX>* __restrict__ mean,
                                         const acc_t<TX>* __restrict__ rstd, TX* __restrict__ dx, int accumulate,
                                         acc_t<TX>* __restrict__ part, long long part_offset, int part_stride,
                                         int N, int C, int rows_per_chunk, TO* __restrict__ cast_out,
                                         long long rpart_offset, int rpart_stride, int with_cast) {
    using A = acc_t<TX>;
    __shared__ A column[LN_MAX_COLUMNS_PER_LANE * 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    A dw[LN_MAX_COLUMNS_PER_LANE], db[LN_MAX_COLUMNS_PER_LANE], dr[LN_MAX_COLUMNS_PER_LANE];
    for (int j = 0; j < LN_MAX_COLUMNS_PER_LANE; ++j) dw[j] = db[j] = dr[j] = A(0);
    const int r0 = blockIdx.x * rows_per_chunk, r1 = min_(N, r0 + rows_per_chunk);
    for (int row = r0 + warp; row < r1; row += n_warps) {
        const long long offset = (long long)row * C;
        const A m = mean[row], r = rstd[row];
        A mean_g, mean_g_xhat;
        layernorm_row_means(dout, x, weight, offset, m, r, C, lane, mean_g, mean_g_xhat);
        for (int c = lane, j = 0; c < C; c += 32, ++j) {
            const A xhat = (A(x[offset + c]) - m) * r;
            const A d = A(dout[offset + c]);
            const A g = d * weight[c];
            const A value = r * (g - mean_g - xhat * mean_g_xhat);
            const TX stored = TX(accumulate ? A(dx[offset + c]) + value : value);
            dx[offset + c] = stored;
            dw[j] += d * xhat;
            db[j] += d;
            if (with_cast) {
                cast_out[offset + c] = TO(A(stored));
                dr[j] += A(stored);
            }
        }
    }
    // the warps' column sums, added in warp order, then written as row blockIdx.x of part
    for (int which = 0; which < 3; ++which) {
        if (which == 2 && !with_cast) break;
        A* mine = which == 0 ? dw : which == 1 ? db : dr;
        for (int w = 0; w < n_warps; ++w) {
            if (warp == w) {
                for (int c = lane, j = 0; c < C; c += 32, ++j) column[c] = (w == 0 ? A(0) : column[c]) + mine[j];
            }
            __syncthreads();
        }
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            const long long at = which == 2 ? rpart_offset + (long long)blockIdx.x * rpart_stride + c
                                            : part_offset + (long long)blockIdx.x * part_stride + which * C + c;
            part[at] = column[c];
        }
        __syncthreads();
    }
}
