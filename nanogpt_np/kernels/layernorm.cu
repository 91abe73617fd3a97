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

// Row access. One warp per row: lane l takes W consecutive channels at a time,
// [W l, W l + W), then [W l + 32 W, ...), and so on, and the warp combines the lanes'
// partial sums with shuffles. W = per16 of the row's types (one 16-byte access of the
// narrowest) when C % W == 0 and every pointer is 16-byte aligned, else W = 1 (lane l
// takes channels l, l + 32, ...). Each channel gets the same arithmetic either way;
// a lane's partial sums add its channels in the order it visits them, so the row
// statistics (and what follows from them) may differ in the last bit between the two
// widths, never from run to run. Kernels dispatch once per launch (row_width).
template <int W, typename T, typename A>
__device__ __forceinline__ void load_as(const T* __restrict__ p, A (&v)[W]) {
    if constexpr (W == 1) {
        v[0] = A(p[0]);
    } else {
        const Pack<T, W> x = load_pack<W>(p);
#pragma unroll
        for (int j = 0; j < W; ++j) v[j] = A(x.v[j]);
    }
}

template <int W, typename T, typename A>
__device__ __forceinline__ void store_as(T* __restrict__ p, const A (&v)[W]) {
    if constexpr (W == 1) {
        p[0] = T(v[0]);
    } else {
        Pack<T, W> x;
#pragma unroll
        for (int j = 0; j < W; ++j) x.v[j] = T(v[j]);
        store_pack(p, x);
    }
}

// True when the rows may be read W channels at a time: C % W == 0 and the pointers aligned.
template <int W>
__device__ __forceinline__ bool rows_allow(int C, const void* p0, const void* p1, const void* p2, const void* p3,
                                           const void* p4 = nullptr, const void* p5 = nullptr) {
    return C % W == 0 && aligned16(p0) && aligned16(p1) && aligned16(p2) && aligned16(p3) && aligned16(p4) &&
           aligned16(p5);
}

// This lane's share of sum(x_row), the first pass of layernorm_row.
template <int W, typename TX, typename A>
__device__ __forceinline__ A row_lane_sum(const TX* __restrict__ x_row, int C, int lane) {
    A sum = 0;
    for (int c = W * lane; c < C; c += 32 * W) {
        A v[W];
        load_as<W>(x_row + c, v);
#pragma unroll
        for (int j = 0; j < W; ++j) sum += v[j];
    }
    return sum;
}

// The LayerNorm of one row x_row (C channels, in memory) into out_row, given this
// lane's share of sum(x_row) (row_lane_sum, or the pass that wrote the row; x_row is
// not __restrict__: it may be what that pass just wrote):
//   mean = x.mean(-1);  var = ((x - mean)^2).mean(-1)  (a second pass over the row, which
//   is in cache: more accurate than E[x^2] - mean^2);  out = (x - mean) * rstd * weight + bias
template <int W, typename TX, typename TO, typename A>
__device__ __forceinline__ void layernorm_row(const TX* x_row, const A* __restrict__ weight,
                                              const A* __restrict__ bias, TO* __restrict__ out_row, int C, int lane,
                                              A eps, A lane_sum, A& mean, A& rstd) {
    mean = warp_sum(lane_sum) / C;
    A sq = 0;
    for (int c = W * lane; c < C; c += 32 * W) {
        A v[W];
        load_as<W>(x_row + c, v);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            const A d = v[j] - mean;
            sq += d * d;
        }
    }
    rstd = A(1) / sqrt_(warp_sum(sq) / C + eps);
    for (int c = W * lane; c < C; c += 32 * W) {
        A v[W], w[W], b[W];
        load_as<W>(x_row + c, v);
        load_as<W>(weight + c, w);
        load_as<W>(bias + c, b);
#pragma unroll
        for (int j = 0; j < W; ++j) v[j] = (v[j] - mean) * rstd * w[j] + b[j];
        store_as<W>(out_row + c, v);
    }
}

// Launch with blockDim.x a multiple of 32 and gridDim.x = ceil(N / (blockDim.x / 32)).
template <typename TX, typename TO>
__global__ void layernorm_forward(const TX* __restrict__ x, const acc_t<TX>* __restrict__ weight,
                                  const acc_t<TX>* __restrict__ bias, TO* __restrict__ out,
                                  acc_t<TX>* __restrict__ mean_out, acc_t<TX>* __restrict__ rstd_out,
                                  int N, int C, acc_t<TX> eps) {
    using A = acc_t<TX>;
    constexpr int G = per16<TX, TO>();
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;  // the whole warp leaves together: no shuffle is left half-done
    const long long offset = (long long)row * C;
    A mean, rstd;
    if (rows_allow<G>(C, x, weight, bias, out))
        layernorm_row<G>(x + offset, weight, bias, out + offset, C, lane, eps,
                         row_lane_sum<G, TX, A>(x + offset, C, lane), mean, rstd);
    else
        layernorm_row<1>(x + offset, weight, bias, out + offset, C, lane, eps,
                         row_lane_sum<1, TX, A>(x + offset, C, lane), mean, rstd);
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// x_row = x + (a + abias), one row, W channels at a time (fused.cu's bias_residual);
// returns this lane's share of sum(x_row) (of the values as stored).
template <int W, typename TX, typename T, typename A>
__device__ __forceinline__ A residual_row(const TX* __restrict__ x, const T* __restrict__ a,
                                          const A* __restrict__ abias, TX* __restrict__ x_row, int C, int lane) {
    A sum = 0;
    for (int c = W * lane; c < C; c += 32 * W) {
        A xv[W], av[W], b[W], v[W];
        load_as<W>(x + c, xv);
        load_as<W>(a + c, av);  // A(acc_t<T>(a)): for bf16 a, acc_t is float = A
        load_as<W>(abias + c, b);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            v[j] = A(TX(xv[j] + (av[j] + b[j])));
            sum += v[j];
        }
        store_as<W>(x_row + c, v);
    }
    return sum;
}

// The residual add of a block's output projection and the LayerNorm that reads its
// result, in one pass: x_out = x + (a + abias) (fused.cu's bias_residual, the same
// bits), then out = layernorm(x_out) as layernorm_forward computes it (the row is
// read back from x_out by the lanes that wrote it: the same W, so each lane reads only
// its own writes). NumPy:
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
    constexpr int G = per16<TX, TO>() > per16<T>() ? per16<TX, TO>() : per16<T>();
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const long long offset = (long long)row * C;
    A mean, rstd;
    if (rows_allow<G>(C, x, a, abias, x_out, weight, bias) && aligned16(out)) {
        const A lane_sum = residual_row<G>(x + offset, a + offset, abias, x_out + offset, C, lane);
        layernorm_row<G>(x_out + offset, weight, bias, out + offset, C, lane, eps, lane_sum, mean, rstd);
    } else {
        const A lane_sum = residual_row<1>(x + offset, a + offset, abias, x_out + offset, C, lane);
        layernorm_row<1>(x_out + offset, weight, bias, out + offset, C, lane, eps, lane_sum, mean, rstd);
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// The two row means LayerNorm's dx needs, mean(g) and mean(g * xhat) with
// g = dout * weight, from one warp's pass over a row (both backward kernels use it).
template <int W, typename TO, typename TX, typename A>
__device__ __forceinline__ void layernorm_row_means(const TO* __restrict__ dout, const TX* __restrict__ x,
                                                    const A* __restrict__ weight, long long offset, A m, A r,
                                                    int C, int lane, A& mean_g, A& mean_g_xhat) {
    A sum_g = 0, sum_g_xhat = 0;
    for (int c = W * lane; c < C; c += 32 * W) {
        A xv[W], d[W], w[W];
        load_as<W>(x + offset + c, xv);
        load_as<W>(dout + offset + c, d);
        load_as<W>(weight + c, w);
#pragma unroll
        for (int j = 0; j < W; ++j) {
            const A xhat = (xv[j] - m) * r;
            const A g = d[j] * w[j];
            sum_g += g;
            sum_g_xhat += g * xhat;
        }
    }
    mean_g = warp_sum(sum_g) / C;
    mean_g_xhat = warp_sum(sum_g_xhat) / C;
}

// Channels c .. c + W - 1 of one row's dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
// g = dout * weight, xhat = (x - mean) * rstd, before rounding to TX, plus what dx holds
// with accumulate; their dout and xhat come back too (the fused kernel's dweight and
// dbias need them).
template <int W, typename TO, typename TX, typename A>
__device__ __forceinline__ void layernorm_dx_channels(const TO* __restrict__ dout, const TX* __restrict__ x,
                                                      const A* __restrict__ weight, const TX* dx, long long offset,
                                                      int c, A m, A r, A mean_g, A mean_g_xhat, int accumulate,
                                                      A (&d)[W], A (&xhat)[W], A (&out)[W]) {
    A xv[W], w[W], prev[W];
    load_as<W>(x + offset + c, xv);
    load_as<W>(dout + offset + c, d);
    load_as<W>(weight + c, w);
    if (accumulate) load_as<W>(dx + offset + c, prev);
#pragma unroll
    for (int j = 0; j < W; ++j) {
        xhat[j] = (xv[j] - m) * r;
        const A g = d[j] * w[j];
        const A value = r * (g - mean_g - xhat[j] * mean_g_xhat);
        out[j] = accumulate ? prev[j] + value : value;
    }
}

// One row of dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), written or added into dx.
template <int W, typename TO, typename TX, typename A>
__device__ __forceinline__ void layernorm_dx_row(const TO* __restrict__ dout, const TX* __restrict__ x,
                                                 const A* __restrict__ weight, TX* __restrict__ dx, long long offset,
                                                 A m, A r, int C, int lane, int accumulate) {
    A mean_g, mean_g_xhat;
    layernorm_row_means<W>(dout, x, weight, offset, m, r, C, lane, mean_g, mean_g_xhat);
    for (int c = W * lane; c < C; c += 32 * W) {
        A d[W], xhat[W], out[W];
        layernorm_dx_channels<W>(dout, x, weight, dx, offset, c, m, r, mean_g, mean_g_xhat, accumulate, d, xhat, out);
        store_as<W>(dx + offset + c, out);
    }
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
    constexpr int G = per16<TX, TO>();
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const long long offset = (long long)row * C;
    if (rows_allow<G>(C, dout, x, weight, dx))
        layernorm_dx_row<G>(dout, x, weight, dx, offset, mean[row], rstd[row], C, lane, accumulate);
    else
        layernorm_dx_row<1>(dout, x, weight, dx, offset, mean[row], rstd[row], C, lane, accumulate);
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
// dbias (and residual) column sums of its rows stay in per-lane arrays (local memory:
// ptxas gives them a 384-byte stack frame, as they are indexed at run time; lane l
// holds the channels it visits, as in the row kernels above: C <= 32 * LN_MAX_COLUMNS_PER_LANE)
// until the block's warps add theirs into shared memory one after another, in a fixed
// order (no atomics: the same bits every run), and the block writes row by of the
// partial sums. The same formulas as the two kernels above, one read of dout and x
// instead of two. Launch with gridDim.x = n_chunks, blockDim.x = LN_FUSED_THREADS.
#define LN_MAX_COLUMNS_PER_LANE 32
#define LN_FUSED_THREADS 256
template <int W, typename TO, typename TX, typename A>
__device__ __forceinline__ void layernorm_backward_fused_rows(
    const TO* __restrict__ dout, const TX* __restrict__ x, const A* __restrict__ weight, const A* __restrict__ mean,
    const A* __restrict__ rstd, TX* __restrict__ dx, int accumulate, A* __restrict__ part, long long part_offset,
    int part_stride, int N, int C, int rows_per_chunk, TO* __restrict__ cast_out, long long rpart_offset,
    int rpart_stride, int with_cast, A* column) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    A dw[LN_MAX_COLUMNS_PER_LANE], db[LN_MAX_COLUMNS_PER_LANE], dr[LN_MAX_COLUMNS_PER_LANE];
    for (int j = 0; j < LN_MAX_COLUMNS_PER_LANE; ++j) dw[j] = db[j] = dr[j] = A(0);
    const int r0 = blockIdx.x * rows_per_chunk, r1 = min_(N, r0 + rows_per_chunk);
    for (int row = r0 + warp; row < r1; row += n_warps) {
        const long long offset = (long long)row * C;
        const A m = mean[row], r = rstd[row];
        A mean_g, mean_g_xhat;
        layernorm_row_means<W>(dout, x, weight, offset, m, r, C, lane, mean_g, mean_g_xhat);
        for (int c = W * lane, k = 0; c < C; c += 32 * W, k += W) {  // dw[k + j]: channel c + j
            A d[W], xhat[W], stored[W];
            layernorm_dx_channels<W>(dout, x, weight, dx, offset, c, m, r, mean_g, mean_g_xhat, accumulate, d, xhat,
                                     stored);
#pragma unroll
            for (int j = 0; j < W; ++j) {
                stored[j] = A(TX(stored[j]));  // dx as stored
                dw[k + j] += d[j] * xhat[j];
                db[k + j] += d[j];
                if (with_cast) dr[k + j] += stored[j];  // the exact gradient, before rounding to TO
            }
            store_as<W>(dx + offset + c, stored);
            if (with_cast) store_as<W>(cast_out + offset + c, stored);
        }
    }
    // the warps' column sums, added in warp order, then written as row blockIdx.x of part
    for (int which = 0; which < 3; ++which) {
        if (which == 2 && !with_cast) break;
        A* mine = which == 0 ? dw : which == 1 ? db : dr;
        for (int w = 0; w < n_warps; ++w) {
            if (warp == w) {
                for (int c = W * lane, k = 0; c < C; c += 32 * W, k += W)
                    for (int j = 0; j < W; ++j) column[c + j] = (w == 0 ? A(0) : column[c + j]) + mine[k + j];
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

template <typename TO, typename TX>
__global__ void layernorm_backward_fused(const TO* __restrict__ dout, const TX* __restrict__ x,
                                         const acc_t<TX>* __restrict__ weight, const acc_t<TX>* __restrict__ mean,
                                         const acc_t<TX>* __restrict__ rstd, TX* __restrict__ dx, int accumulate,
                                         acc_t<TX>* __restrict__ part, long long part_offset, int part_stride,
                                         int N, int C, int rows_per_chunk, TO* __restrict__ cast_out,
                                         long long rpart_offset, int rpart_stride, int with_cast) {
    constexpr int G = per16<TX, TO>();
    __shared__ acc_t<TX> column[LN_MAX_COLUMNS_PER_LANE * 32];  // one array for both widths' code
    if (rows_allow<G>(C, dout, x, weight, dx, cast_out))
        layernorm_backward_fused_rows<G>(dout, x, weight, mean, rstd, dx, accumulate, part, part_offset, part_stride,
                                         N, C, rows_per_chunk, cast_out, rpart_offset, rpart_stride, with_cast, column);
    else
        layernorm_backward_fused_rows<1>(dout, x, weight, mean, rstd, dx, accumulate, part, part_offset, part_stride,
                                         N, C, rows_per_chunk, cast_out, rpart_offset, rpart_stride, with_cast, column);
}
