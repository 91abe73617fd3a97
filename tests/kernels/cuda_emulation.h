// Runs CUDA kernels on the CPU, for the CPU test suite only.
//
// Every CUDA thread of a block is a fiber (a ucontext with its own stack) on one
// OS thread; the blocks of a grid run one after another, so a kernel's
// `__shared__` arrays can be function statics. A fiber runs until it reaches
// __syncthreads or __shfl_xor_sync, then the next one runs. A barrier opens when
// every thread it needs has arrived: the whole block for __syncthreads, the 32
// lanes of a warp for a shuffle. The order in which fibers run alternates between
// ascending and descending thread index, which exposes both kinds of missing
// barrier (reading what a later thread has not written yet, and overwriting what
// an earlier thread still needs). A barrier that some threads never reach (a
// divergent __syncthreads, an early return) is reported as a deadlock at once.
// A kernel whose first launch never reached a barrier (an elementwise kernel, say)
// runs later launches as plain calls, thread after thread, which is much faster;
// should such a kernel reach a barrier after all, the launch fails loudly.
// It knows nothing of speed, memory coalescing or bank conflicts.
#pragma once
#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static dim3 threadIdx, blockIdx, blockDim, gridDim;  // set by the scheduler for the running fiber

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
inline double __longlong_as_double(long long i) {
    double d;
    std::memcpy(&d, &i, sizeof d);
    return d;
}

struct EmuError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A vector load or store on the GPU faults on a misaligned address; here it says so.
inline void emu_check_aligned(const void* p, unsigned bytes) {
    if (reinterpret_cast<std::uintptr_t>(p) % bytes)
        throw EmuError("a " + std::to_string(bytes) + "-byte vector access at a misaligned address");
}

enum class EmuState { ready, at_syncthreads, at_shuffle, done };

struct EmuFiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    dim3 index;
    EmuState state = EmuState::ready;
};

struct EmuBlock {
    std::vector<EmuFiber> fibers;
    int current = 0;
    int at_syncthreads = 0;
    std::vector<int> warp_arrived;  // lanes of each warp waiting in a shuffle
    std::vector<int> warp_size;
    alignas(8) unsigned char slots[1024][8];  // shuffle values, by linear thread index
    ucontext_t scheduler;
    std::string error;
    bool direct = false;          // threads run as plain calls: no barrier may be reached
    bool reached_barrier = false;
    void (*call)(void*, void**) = nullptr;
    void* kernel = nullptr;
    void** params = nullptr;
};
static EmuBlock* g_block = nullptr;
static const std::size_t EMU_STACK_BYTES = 256 * 1024;

// Give control back to the scheduler until this fiber's barrier opens.
inline void emu_wait(EmuState state) {
    EmuFiber& self = g_block->fibers[g_block->current];
    self.state = state;
    swapcontext(&self.context, &g_block->scheduler);
}

inline void emu_barrier_reached(EmuBlock& b) {
    if (b.direct) throw EmuError("a barrier was reached by a kernel whose first launch reached none");
    b.reached_barrier = true;
}

inline void __syncthreads() {
    EmuBlock& b = *g_block;
    emu_barrier_reached(b);
    if (++b.at_syncthreads == int(b.fibers.size())) {  // the last to arrive opens the barrier
        b.at_syncthreads = 0;
        for (auto& f : b.fibers) if (f.state == EmuState::at_syncthreads) f.state = EmuState::ready;
        return;
    }
    emu_wait(EmuState::at_syncthreads);
}

// One warp-wide meeting point: returns once every lane of this thread's warp has
// arrived (the barrier a shuffle's phases, and mma's, are made of).
inline void emu_warp_phase(EmuBlock& b, int warp) {
    if (++b.warp_arrived[warp] == b.warp_size[warp]) {
        b.warp_arrived[warp] = 0;
        for (int t = warp * 32; t < warp * 32 + b.warp_size[warp]; ++t)
            if (b.fibers[t].state == EmuState::at_shuffle) b.fibers[t].state = EmuState::ready;
    } else {
        emu_wait(EmuState::at_shuffle);
    }
}

template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = 32) {
    static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
    if (mask != 0xffffffffu || width != 32) throw EmuError("the emulator supports only full-warp shuffles");
    EmuBlock& b = *g_block;
    emu_barrier_reached(b);
    const int tid = b.current, warp = tid / 32, lane = tid % 32, source = lane ^ lane_mask;
    if (source >= b.warp_size[warp]) throw EmuError("__shfl_xor_sync reads a lane past the end of a partial warp");
    std::memcpy(b.slots[tid], &value, sizeof(V));
    emu_warp_phase(b, warp);  // phase 1: every lane has written its value
    V result;
    std::memcpy(&result, b.slots[warp * 32 + source], sizeof(V));
    emu_warp_phase(b, warp);  // phase 2: every lane has read, so the slots may be reused
    return result;
}

// The tensor-core product of common.cuh's mma_bf16_16816, by the fragment layout
// PTX documents for mma.m16n8k16 (.bf16 operands, .f32 accumulators): each lane
// posts its registers, every lane rebuilds the 16x16 A and 16x8 B tiles from the
// whole warp's registers and computes its own four outputs. A mistake in how a
// kernel fills its fragments therefore gives wrong numbers here as on the GPU.
#define NANOGPT_EMULATION 1
struct EmuMmaSlot {
    unsigned a[4], b[2];
    float d[4];
};
inline float emu_bf16_half(unsigned word, int high) {
    return __uint_as_float((high ? (word >> 16) : (word & 0xffffu)) << 16);
}
inline void emu_mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&bv)[2]) {
    EmuBlock& b = *g_block;
    emu_barrier_reached(b);
    const int tid = b.current, warp = tid / 32, lane = tid % 32;
    if (b.warp_size[warp] != 32) throw EmuError("mma.sync needs a full warp of 32 lanes");
    static EmuMmaSlot slots[1024];
    EmuMmaSlot& mine = slots[tid];
    for (int i = 0; i < 4; ++i) mine.a[i] = a[i], mine.d[i] = d[i];
    mine.b[0] = bv[0], mine.b[1] = bv[1];
    emu_warp_phase(b, warp);  // every lane has posted its fragments
    const EmuMmaSlot* w = slots + warp * 32;
    auto A = [&](int row, int k) {  // a[(row >= 8) + 2 (k >= 8)] of lane 4 (row % 8) + (k % 8) / 2
        return emu_bf16_half(w[(row % 8) * 4 + (k % 8) / 2].a[(row >= 8) + 2 * (k >= 8)], k % 2);
    };
    auto B = [&](int k, int col) {  // b[k >= 8] of lane 4 col + (k % 8) / 2
        return emu_bf16_half(w[col * 4 + (k % 8) / 2].b[k >= 8], k % 2);
    };
    const int g = lane / 4, t = lane % 4;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = 0.0f;
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        out[i] = w[lane].d[i] + acc;
    }
    emu_warp_phase(b, warp);  // every lane has read: the slots may be reused
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

static void emu_fiber_main() {
    EmuBlock& b = *g_block;
    try {
        b.call(b.kernel, b.params);
    } catch (const std::exception& e) {
        if (b.error.empty()) b.error = e.what();
    }
    b.fibers[b.current].state = EmuState::done;
    setcontext(&b.scheduler);
}

// Run one block to completion; returns an error message, empty on success.
static std::string emu_run_block(EmuBlock& b) {
    for (std::size_t t = 0; t < b.fibers.size(); ++t) {
        EmuFiber& f = b.fibers[t];
        if (!f.stack) f.stack.reset(new char[EMU_STACK_BYTES]);
        f.state = EmuState::ready;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.get();
        f.context.uc_stack.ss_size = EMU_STACK_BYTES;
        f.context.uc_link = &b.scheduler;
        makecontext(&f.context, emu_fiber_main, 0);
    }
    b.at_syncthreads = 0;
    std::fill(b.warp_arrived.begin(), b.warp_arrived.end(), 0);
    const int n = int(b.fibers.size());
    for (long round = 0;; ++round) {
        bool ran = false;
        for (int k = 0; k < n; ++k) {
            const int t = (round % 2 == 0) ? k : n - 1 - k;
            if (b.fibers[t].state != EmuState::ready) continue;
            b.current = t;
            threadIdx = b.fibers[t].index;
            swapcontext(&b.scheduler, &b.fibers[t].context);
            ran = true;
            if (!b.error.empty()) return b.error;
        }
        if (ran) continue;
        int done = 0, syncing = 0, shuffling = 0;
        for (auto& f : b.fibers) {
            done += f.state == EmuState::done;
            syncing += f.state == EmuState::at_syncthreads;
            shuffling += f.state == EmuState::at_shuffle;
        }
        if (done == n) return "";
        char message[256];
        std::snprintf(message, sizeof message,
                      "deadlock at %s: %d threads wait at __syncthreads, %d in a shuffle, %d have returned "
                      "(a divergent barrier or an early return)",
                      syncing ? "__syncthreads" : "__shfl_xor_sync", syncing, shuffling, done);
        return message;
    }
}

// ---- kernel registry: name expression -> (signature, call with a cuLaunchKernel-style void**) ----

template <typename T> struct EmuCode;
template <> struct EmuCode<float> { static constexpr char value = 'f'; };
template <> struct EmuCode<double> { static constexpr char value = 'd'; };
template <> struct EmuCode<int> { static constexpr char value = 'i'; };
template <> struct EmuCode<long long> { static constexpr char value = 'q'; };
template <typename T> struct EmuCode<T*> { static constexpr char value = EmuCode<T>::value - 32; };
template <typename T> struct EmuCode<const T*> { static constexpr char value = EmuCode<T>::value - 32; };

struct EmuEntry {
    std::string signature;  // one letter per parameter; upper case for a pointer
    void (*call)(void* kernel, void** params);
    void* kernel;
};

template <typename... Args, std::size_t... I>
void emu_call(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<Args>*>(params[I])...);
}

template <typename... Args>
EmuEntry emu_entry(void (*kernel)(Args...)) {
    EmuEntry e;
    e.signature = std::string{EmuCode<std::remove_cv_t<Args>>::value...};
    e.kernel = reinterpret_cast<void*>(kernel);
    e.call = [](void* k, void** params) {
        emu_call(reinterpret_cast<void (*)(Args...)>(k), params, std::index_sequence_for<Args...>{});
    };
    return e;
}

const std::map<std::string, EmuEntry>& emu_registry();  // defined by the generated file

static void emu_error(char* err, int errlen, const std::string& message) {
    std::snprintf(err, errlen, "%s", message.c_str());
}

extern "C" int emu_signature(const char* name, char* out, int outlen) {
    auto it = emu_registry().find(name);
    if (it == emu_registry().end()) return 1;
    std::snprintf(out, outlen, "%s", it->second.signature.c_str());
    return 0;
}

extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, void** params, char* err, int errlen) {
    auto it = emu_registry().find(name);
    if (it == emu_registry().end()) {
        emu_error(err, errlen, std::string("no kernel named ") + name);
        return 1;
    }
    const int n = int(bx * by * bz);
    if (n < 1 || n > 1024) {
        emu_error(err, errlen, std::string(name) + ": block size outside 1..1024");
        return 1;
    }
    auto block = std::make_unique<EmuBlock>();
    block->fibers.resize(n);
    for (int t = 0; t < n; ++t) {
        block->fibers[t].index = dim3{unsigned(t) % bx, (unsigned(t) / bx) % by, unsigned(t) / (bx * by)};
    }
    for (int w = 0; w * 32 < n; ++w) block->warp_size.push_back(std::min(32, n - w * 32));
    block->warp_arrived.assign(block->warp_size.size(), 0);
    block->call = it->second.call;
    block->kernel = it->second.kernel;
    block->params = params;
    blockDim = dim3{bx, by, bz};
    gridDim = dim3{gx, gy, gz};
    g_block = block.get();
    static std::map<std::string, bool> barrier_free;  // learned from each kernel's first launch
    auto known = barrier_free.find(name);
    block->direct = known != barrier_free.end() && known->second;
    std::string error;
    for (unsigned z = 0; z < gz && error.empty(); ++z)
        for (unsigned y = 0; y < gy && error.empty(); ++y)
            for (unsigned x = 0; x < gx && error.empty(); ++x) {
                blockIdx = dim3{x, y, z};
                if (!block->direct) {
                    error = emu_run_block(*block);
                    continue;
                }
                for (int t = 0; t < n && error.empty(); ++t) {
                    block->current = t;
                    threadIdx = block->fibers[t].index;
                    try {
                        block->call(block->kernel, block->params);
                    } catch (const std::exception& e) {
                        error = e.what();
                    }
                }
            }
    if (known == barrier_free.end() && error.empty()) barrier_free[name] = !block->reached_barrier;
    g_block = nullptr;
    if (!error.empty()) {
        emu_error(err, errlen, std::string(name) + ": " + error);
        return 1;
    }
    return 0;
}
