// Helpers shared by every kernel file.
//
// The kernels are compiled at run time by NVRTC (through cupy.RawModule), which
// has no host standard library: no <cmath>, no <cstdio>, no INFINITY macro.
// Everything a kernel needs beyond CUDA's built-in device functions is here.
// The loader pastes this file in place of `#include "common.cuh"` so that CuPy's
// kernel cache sees every byte of the source (a changed header recompiles).
//
// Every kernel is a template over the storage type T (float, double, and for the
// mixed-precision path bf16). The double instantiations exist so tests can compare
// a kernel with the NumPy formula to ~1e-12, where an indexing slip cannot hide
// inside float32 noise.
#pragma once

// bfloat16 storage: the top 16 bits of an IEEE float (8 exponent bits, 7 mantissa
// bits). Defined here rather than taken from <cuda_bf16.h> because NVRTC under
// CuPy sees no CUDA headers unless its include path is set up, and a header-free
// type also runs in the CPU emulator. Arithmetic never happens in bf16: a value
// is widened to float on load (exact: shift the bits up) and rounded back on
// store, to nearest with ties to even, as cuBLAS, PyTorch and ml_dtypes round.
// Host code sees the same 2-byte layout as ml_dtypes.bfloat16.
__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN stays a quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even; overflow rounds to infinity
    return (unsigned short)(u >> 16);
}

struct bf16 {
    unsigned short bits;
    bf16() = default;  // trivial, so a bf16 array may live in __shared__ memory
    __device__ explicit bf16(float f) : bits(float_to_bf16_bits(f)) {}
    __device__ explicit bf16(double f) : bits(float_to_bf16_bits((float)f)) {}
    __device__ explicit operator float() const { return __uint_as_float((unsigned)bits << 16); }
};

// 16-byte (128-bit) global memory accesses: one instruction moves 8 bf16, 4 float or
// 2 double instead of one, so a memory-bound kernel issues a fraction of the load and
// store instructions for the same bytes. Pack<T, N> is N values of T, aligned as the
// access needs (N * sizeof(T) a multiple of 8: a 16-byte access per 16 bytes, or one
// 8-byte access for a pack of 8 bytes); load_pack/store_pack move one between
// registers and the address p, which must be aligned to 16 bytes (8 for an 8-byte
// pack): kernels check `aligned16` on their pointers (and that no pack straddles a
// row) and take a scalar path otherwise. The emulator checks the alignment of every
// such access, so a wrong guard fails the tests instead of faulting on the GPU.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : 8) Pack {
    T v[N];
};

// Values of T per 16-byte access; for kernels reading several types, the largest
// count over them (so the narrowest type moves 16 bytes and the wider ones 32 or 64).
template <typename T> __host__ __device__ constexpr int per16() { return 16 / (int)sizeof(T); }
template <typename T, typename U> __host__ __device__ constexpr int per16() { return per16<T>() > per16<U>() ? per16<T>() : per16<U>(); }

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15ull) == 0; }

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
    constexpr int bytes = (int)sizeof(T) * N;
    static_assert(bytes % 8 == 0 && (bytes == 8 || bytes % 16 == 0), "a pack is 8 bytes or a multiple of 16");
    Pack<T, N> r;
#ifdef NANOGPT_EMULATION
    emu_check_aligned(p, bytes >= 16 ? 16 : 8);
    memcpy(&r, p, bytes);
#else
    if constexpr (bytes == 8) {
        *reinterpret_cast<uint2*>(&r) = *reinterpret_cast<const uint2*>(p);
    } else {
#pragma unroll
        for (int k = 0; k < bytes / 16; ++k) reinterpret_cast<uint4*>(&r)[k] = reinterpret_cast<const uint4*>(p)[k];
    }
#endif
    return r;
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& x) {
    constexpr int bytes = (int)sizeof(T) * N;
    static_assert(bytes % 8 == 0 && (bytes == 8 || bytes % 16 == 0), "a pack is 8 bytes or a multiple of 16");
#ifdef NANOGPT_EMULATION
    emu_check_aligned(p, bytes >= 16 ? 16 : 8);
    memcpy(p, &x, bytes);
#else
    if constexpr (bytes == 8) {
        *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(&x);
    } else {
#pragma unroll
        for (int k = 0; k < bytes / 16; ++k) reinterpret_cast<uint4*>(p)[k] = reinterpret_cast<const uint4*>(&x)[k];
    }
#endif
}

// The row lanes of the column-sum kernels (fused.cu): lane k sums rows k, k + COLUMN_ROWS,
// ... of a chunk, and the lanes are added in order. Every kernel that writes column
// partial sums (also attention_mma.cu's dq store) follows it, so all give the same bits.
// (fused.COLUMN_BLOCK[1] launches that many row lanes: tests/kernels/test_compile.py checks.)
#define COLUMN_ROWS 8

// for (k = this thread's index in the grid; k < count; k += threads in the grid): a
// grid-stride loop, with which any grid covers any count.
#define GRID_STRIDE(k, count) \
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < (count); k += (long long)gridDim.x * blockDim.x)

// Two bf16 in one 32-bit register, `lo` in the low half: the operand format of
// the tensor-core mma instructions (the element with the smaller index is low).
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return (unsigned)float_to_bf16_bits(lo) | ((unsigned)float_to_bf16_bits(hi) << 16);
}

// Two neighbouring bf16 of a 4-byte-aligned address as one 32-bit word, and back.
// (The emulator assembles the word from the two halves: same bytes, no aliasing.)
__device__ __forceinline__ unsigned load_bf16x2(const bf16* p) {
#ifdef NANOGPT_EMULATION
    return (unsigned)p[0].bits | ((unsigned)p[1].bits << 16);
#else
    return *reinterpret_cast<const unsigned*>(p);
#endif
}
__device__ __forceinline__ void store_bf16x2(bf16* p, unsigned v) {
#ifdef NANOGPT_EMULATION
    p[0].bits = (unsigned short)(v & 0xffffu);
    p[1].bits = (unsigned short)(v >> 16);
#else
    *reinterpret_cast<unsigned*>(p) = v;
#endif
}

// One half from each of two words, the same half of both (the high halves if
// `high`), packed with w0's in the low half: two rows' bf16 of one column, from
// two row-major words that each hold a pair of columns.
__device__ __forceinline__ unsigned same_halves(unsigned w0, unsigned w1, bool high) {
    return high ? (w0 >> 16) | (w1 & 0xffff0000u) : (w0 & 0xffffu) | (w1 << 16);
}

// The two bf16 of such a word, widened to float.
__device__ __forceinline__ float bf16x2_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16x2_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// d += a @ b on tensor cores, for one warp: a 16x16 bf16 tile times a 16x8 bf16
// tile, accumulated in float (PTX mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32,
// sm_80 and later). All 32 lanes must call it together. Which elements each lane
// holds is fixed by PTX; with g = lane / 4 and t = lane % 4:
//   a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//   a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]          (two bf16 per word, low first)
//   d[0], d[1] = D[g][2t, 2t+1]    d[2], d[3] = D[g+8][2t, 2t+1]
// Written as inline PTX rather than through <mma.h>'s wmma: NVRTC under CuPy needs
// no CUDA headers for it, and the CPU emulator implements exactly this contract
// (tests/kernels/cuda_emulation.h), so the kernels' fragment bookkeeping is
// tested without a GPU; gpu_check's first rows confirm the contract on hardware.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#ifdef NANOGPT_EMULATION
    emu_mma_bf16_16816(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// The type a kernel computes and accumulates in, for storage type T: T itself for
// float and double, float for bf16. Kernels load through it (A(x[i])) and store
// back to T (T(value)), so one template body serves all three.
template <typename T> struct Accumulate { using type = T; };
template <> struct Accumulate<bf16> { using type = float; };
template <typename T> using acc_t = typename Accumulate<T>::type;

// Overloads that pick the float or double device function from the argument type.
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

template <typename T>
__device__ __forceinline__ T max_(T a, T b) { return a > b ? a : b; }
template <typename T>
__device__ __forceinline__ T min_(T a, T b) { return a < b ? a : b; }

// -infinity, built from its bit pattern (NVRTC has no INFINITY macro).
template <typename T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float((int)0xff800000u); }
template <> __device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double((long long)0xfff0000000000000ull);
}

template <typename T> __device__ __forceinline__ T quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float((int)0x7fc00000u); }
template <> __device__ __forceinline__ double quiet_nan<double>() {
    return __longlong_as_double((long long)0x7ff8000000000000ull);
}

// Sum over the 32 lanes of a warp; every lane gets the total. All 32 lanes must call it.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Merge two partial logsumexp states (running max m, sum s of exp(x - m)) into (m, s).
// A state with m == -inf holds nothing; two empty states stay empty (no NaN from inf - inf).
template <typename T>
__device__ __forceinline__ void logsumexp_merge(T& m, T& s, T m2, T s2) {
    const T M = max_(m, m2);
    if (M == neg_inf<T>()) return;
    s = (m == M ? s : s * exp_(m - M)) + (m2 == M ? s2 : s2 * exp_(m2 - M));
    m = M;
}

// Merge the (m, s) states of all threads of a block; every thread gets the result.
// blockDim.x must be a multiple of 32 and at most 1024. Every thread must call it,
// and a kernel calls it once (its shared scratch is not fenced for a second call).
template <typename T>
__device__ void block_logsumexp(T& m, T& s) {
    __shared__ T shared_m[32];
    __shared__ T shared_s[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        const T s2 = __shfl_xor_sync(0xffffffffu, s, offset);
        logsumexp_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        shared_m[warp] = m;
        shared_s[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < n_warps ? shared_m[lane] : neg_inf<T>();
        s = lane < n_warps ? shared_s[lane] : T(0);
        for (int offset = 16; offset > 0; offset >>= 1) {
            const T m2 = __shfl_xor_sync(0xffffffffu, m, offset);
            const T s2 = __shfl_xor_sync(0xffffffffu, s, offset);
            logsumexp_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            shared_m[0] = m;
            shared_s[0] = s;
        }
    }
    __syncthreads();
    m = shared_m[0];
    s = shared_s[0];
}

// *p += v, atomically on the GPU. The CPU emulator runs one thread at a time and
// switches only at barriers and shuffles, so a plain add is already atomic there.
__device__ __forceinline__ void atomic_add_(float* p, float v) {
#ifdef NANOGPT_EMULATION
    *p += v;
#else
    atomicAdd(p, v);
#endif
}
__device__ __forceinline__ void atomic_add_(double* p, double v) {
#ifdef NANOGPT_EMULATION
    *p += v;
#else
    atomicAdd(p, v);  // sm_60 and later
#endif
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024); thread 0 gets
// the total, added in a fixed order (no atomics: the same bits every run). Every
// thread must call it; a kernel calls it at most once per __shared__ array it names.
template <typename T>
__device__ T block_sum(T v, T* scratch32) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) scratch32[warp] = v;
    __syncthreads();
    T total = 0;
    if (warp == 0) {
        total = warp_sum(lane < n_warps ? scratch32[lane] : T(0));
    }
    return total;
}
