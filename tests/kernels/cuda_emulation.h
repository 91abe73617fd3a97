// Runs CUDA kernels on the CPU, for the CPU test suite only.
//
// Every CUDA thread of a block is a fiber (a ucontext with its own stack) on one
// OS thread; the blocks of a grid run one after another, so a kernel's
// `__shared__` arrays can be function statics. A fiber runs until it reaches
// __syncthreads or a warp-wide operation (__shfl_xor_sync, mma, ldmatrix), then
// the next one runs. A barrier opens when every thread it needs has arrived: the
// whole block for __syncthreads, the 32 lanes of a warp for a warp-wide operation.
//
// Schedules. One warp at a time runs until all its lanes wait at __syncthreads
// (or have returned), so a warp drifts a whole barrier interval ahead of the
// others, as warps do on the GPU. The order alternates, round by round, between
// ascending and descending warp (and lane) index, which exposes both kinds of
// missing barrier (reading what a later warp has not written yet, and
// overwriting what an earlier warp still needs). A barrier that some threads
// never reach (a divergent __syncthreads, an early return) is reported as a
// deadlock at once.
//
// Races. The library is compiled with -fsanitize=thread, but against the hooks
// below instead of ThreadSanitizer's runtime: every load and store the compiler
// emits in kernel code calls __tsan_readN / __tsan_writeN, and those in __shared__
// memory (function statics, so the library's .bss) are checked. Each 4-byte word of shared memory
// remembers the warp, barrier epoch and code address of its last write and of its
// reads; a warp touching a word that another warp wrote in the same epoch (no
// __syncthreads between), or writing a word another warp read in it, is an error
// naming the kernel, the address and both source lines. This does not depend on
// the schedule: a missing barrier is caught even where the numbers come out right.
//
// Asynchronous copies and ldmatrix: cp.async copies land in shared memory only at
// the cp.async.wait_group that retires their group (a missing wait reads stale
// data), and count as writes both when issued and when they land; ldmatrix reads
// the rows the lanes point at, by PTX's fragment layout. atomicAdd is one
// uninterruptible read-modify-write (the fibers never preempt one another).
//
// A kernel whose first launch never reached a barrier (an elementwise kernel, say)
// runs later launches as plain calls, thread after thread, which is much faster;
// should such a kernel reach a barrier after all, the launch fails loudly.
// It knows nothing of speed, memory coalescing or bank conflicts.
#pragma once
#include <math.h>
#include <dlfcn.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

// Attributes of the emulator's own functions: not instrumented (they run on the
// kernels' behalf), and not inlined, so __builtin_return_address(0) is the
// kernel's code that called them.
#define EMU_RUNTIME __attribute__((no_sanitize_thread, noinline, visibility("hidden")))

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static  // zero-initialised statics: the library's .bss, see emu_shared_access
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

struct EmuCopy {  // one cp.async: bytes read at issue, written to shared memory when its group is waited for
    unsigned char* dst;
    unsigned char data[16];
    int bytes;
    const void* pc;  // where it was issued, for race reports
};

// Switching fibers. makecontext gives a fiber its stack and entry point, and it is
// entered once with setcontext; every later switch is a _setjmp/_longjmp pair, which
// (unlike swapcontext) makes no system call to save the signal mask: a barrier costs
// one switch per thread, so this is most of the emulator's time otherwise.
// (Build with _FORTIFY_SOURCE off: its longjmp check refuses a jump to another stack.)
struct EmuFiber {
    ucontext_t context;  // the entry context: getcontext once, makecontext per block
    jmp_buf jump;        // where the fiber resumes once it has started
    bool started = false;
    std::unique_ptr<char[]> stack;
    dim3 index;
    EmuState state = EmuState::ready;
    std::vector<std::vector<EmuCopy>> copy_groups;  // committed cp.async groups, oldest first
    std::vector<EmuCopy> open_copies;               // issued since the last commit_group
    unsigned warp_ops = 0;  // warp-wide operations so far (every lane of a warp makes the same ones)
};

struct EmuBlock {
    std::vector<EmuFiber> fibers;
    int current = 0;
    int at_syncthreads = 0;
    std::vector<int> warp_arrived;  // lanes of each warp waiting in a shuffle
    std::vector<int> warp_size;
    alignas(8) unsigned char slots[2][1024][8];  // shuffle values, by parity and linear thread index
    jmp_buf scheduler;  // where a fiber that waits (or returns) gives control back
    std::string error;
    bool direct = false;          // threads run as plain calls: no barrier may be reached
    bool reached_barrier = false;
    void (*call)(void*, void**) = nullptr;
    void* kernel = nullptr;
    void** params = nullptr;
    const char* name = "";        // the kernel's name expression, for error messages
};
static EmuBlock* g_block = nullptr;
static const std::size_t EMU_STACK_BYTES = 256 * 1024;

// Give control back to the scheduler until this fiber's barrier opens.
EMU_RUNTIME inline void emu_wait(EmuState state) {
    EmuFiber& self = g_block->fibers[g_block->current];
    self.state = state;
    if (!_setjmp(self.jump)) _longjmp(g_block->scheduler, 1);
}

// ---- the shared-memory race detector ----

// The bounds of this library's .bss (the linker defines them), where __shared__
// arrays live. The emulator's own zero-initialised globals live there too, but
// only the emulator's own (uninstrumented) code writes them.
extern "C" char __bss_start[] __attribute__((weak, visibility("hidden")));
extern "C" char _end[] __attribute__((weak, visibility("hidden")));
static bool g_in_kernel = false;  // a fiber (or a direct call) is running kernel code

struct EmuShadowWord {
    unsigned long long write_epoch = 0, read_epoch = 0;
    const void* write_pc = nullptr;
    const void* read_pc = nullptr;
    const void* read_pc2 = nullptr;  // a second warp's read in the same epoch, if any
    int write_warp = -1, read_warp = -1, read_warp2 = -1;
};
// One per 4-byte word of .bss; a plain array, since std::vector's code would be
// instrumented and call the hooks from inside them.
static EmuShadowWord* g_shadow = nullptr;
static unsigned long long g_epoch = 1;      // advances at every barrier and every new block

// "file:line" of a code address in this library (and the lines it was inlined
// into), through addr2line and the library's debug line tables.
EMU_RUNTIME inline std::string emu_source_line(const void* pc) {
    Dl_info info;
    if (!pc || !dladdr(pc, &info) || !info.dli_fname) return "an unknown line";
    const auto offset = reinterpret_cast<std::uintptr_t>(pc) - reinterpret_cast<std::uintptr_t>(info.dli_fbase) - 1;
    char command[4096];
    std::snprintf(command, sizeof command, "addr2line -i -p -s -e '%s' 0x%zx 2>/dev/null", info.dli_fname,
                  (std::size_t)offset);
    std::string out;
    if (FILE* pipe = popen(command, "r")) {
        char buf[512];
        while (std::fgets(buf, sizeof buf, pipe)) out += buf;
        pclose(pipe);
    }
    for (auto& c : out) if (c == '\n') c = ' ';
    while (!out.empty() && out.back() == ' ') out.pop_back();
    return out.empty() ? "an unknown line" : out;
}

// "array + byte offset" for an address in a __shared__ array, from the library's
// symbol table (nm), or the bare address.
EMU_RUNTIME inline std::string emu_shared_name(const void* p) {
    Dl_info info;
    char address[32];
    std::snprintf(address, sizeof address, "%p", p);
    if (!dladdr(p, &info) || !info.dli_fname) return address;
    const auto offset = reinterpret_cast<std::uintptr_t>(p) - reinterpret_cast<std::uintptr_t>(info.dli_fbase);
    char command[4096];
    std::snprintf(command, sizeof command, "nm -C -S --defined-only '%s' 2>/dev/null", info.dli_fname);
    std::string found = address;
    if (FILE* pipe = popen(command, "r")) {
        char line[4096];
        while (std::fgets(line, sizeof line, pipe)) {
            unsigned long long value, size;
            char type;
            int used = 0;
            if (std::sscanf(line, "%llx %llx %c %n", &value, &size, &type, &used) == 3 && offset >= value &&
                offset < value + size) {
                std::string name = line + used;
                while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
                found = "shared " + name + " + " + std::to_string(offset - value) + " bytes";
            }
        }
        pclose(pipe);
    }
    return found;
}

EMU_RUNTIME inline void emu_race(const char* now, int warp, const void* pc, const char* then, int other_warp,
                                 const void* other_pc, std::size_t offset);

// Check and record one access of `bytes` at p by the running thread's warp.
EMU_RUNTIME inline void emu_shared_access(const void* p, std::size_t bytes, bool write, const void* pc) {
    const std::size_t offset = reinterpret_cast<const char*>(p) - __bss_start;
    const std::size_t extent = _end - __bss_start;
    if (offset >= extent || !g_in_kernel) return;
    if (!g_shadow) g_shadow = new EmuShadowWord[(extent + 3) / 4];
    const int warp = g_block->current / 32;
    for (std::size_t w = offset / 4; w <= (offset + bytes - 1) / 4 && w < (extent + 3) / 4; ++w) {
        EmuShadowWord& s = g_shadow[w];
        if (s.write_epoch == g_epoch && s.write_warp != warp)
            emu_race(write ? "writes" : "reads", warp, pc, "wrote", s.write_warp, s.write_pc, 4 * w);
        if (write) {
            if (s.read_epoch == g_epoch && s.read_warp != warp)
                emu_race("writes", warp, pc, "read", s.read_warp, s.read_pc, 4 * w);
            if (s.read_epoch == g_epoch && s.read_warp2 >= 0 && s.read_warp2 != warp)
                emu_race("writes", warp, pc, "read", s.read_warp2, s.read_pc2, 4 * w);
            s.write_epoch = g_epoch, s.write_warp = warp, s.write_pc = pc;
        } else if (s.read_epoch != g_epoch) {
            s.read_epoch = g_epoch, s.read_warp = warp, s.read_pc = pc, s.read_warp2 = -1;
        } else if (s.read_warp != warp && s.read_warp2 < 0) {
            s.read_warp2 = warp, s.read_pc2 = pc;  // two warps read it: a write by any warp races with one
        }
    }
}

EMU_RUNTIME inline void emu_race(const char* now, int warp, const void* pc, const char* then, int other_warp,
                                 const void* other_pc, std::size_t offset) {
    throw EmuError(std::string("race on shared memory in ") + g_block->name + ": warp " + std::to_string(warp) + " " +
                   now + " the word at " +
                   emu_shared_name(__bss_start + offset) + " at " +
                   emu_source_line(pc) + ", which warp " + std::to_string(other_warp) + " " + then + " at " +
                   emu_source_line(other_pc) + " with no __syncthreads between them");
}

// The hooks -fsanitize=thread makes the compiler call before each memory access.
extern "C" {
#define EMU_TSAN_HOOK(n)                                                                                          \
    EMU_RUNTIME void __tsan_read##n(void* p) { emu_shared_access(p, n, false, __builtin_return_address(0)); }         \
    EMU_RUNTIME void __tsan_write##n(void* p) { emu_shared_access(p, n, true, __builtin_return_address(0)); }         \
    EMU_RUNTIME void __tsan_unaligned_read##n(void* p) { emu_shared_access(p, n, false, __builtin_return_address(0)); } \
    EMU_RUNTIME void __tsan_unaligned_write##n(void* p) { emu_shared_access(p, n, true, __builtin_return_address(0)); }
EMU_TSAN_HOOK(1)
EMU_TSAN_HOOK(2)
EMU_TSAN_HOOK(4)
EMU_TSAN_HOOK(8)
EMU_TSAN_HOOK(16)
#undef EMU_TSAN_HOOK
EMU_RUNTIME void __tsan_read_range(void* p, unsigned long n) { emu_shared_access(p, n, false, __builtin_return_address(0)); }
EMU_RUNTIME void __tsan_write_range(void* p, unsigned long n) { emu_shared_access(p, n, true, __builtin_return_address(0)); }
EMU_RUNTIME void __tsan_init() {}
EMU_RUNTIME void __tsan_func_entry(void*) {}
EMU_RUNTIME void __tsan_func_exit() {}
EMU_RUNTIME void __tsan_vptr_update(void**, void*) {}
EMU_RUNTIME void __tsan_vptr_read(void**) {}
// atomics the C++ runtime's code uses (guards of function statics): plain atomics
EMU_RUNTIME char __tsan_atomic8_load(const volatile char* a, int) { return __atomic_load_n(a, __ATOMIC_ACQUIRE); }
EMU_RUNTIME void __tsan_atomic8_store(volatile char* a, char v, int) { __atomic_store_n(a, v, __ATOMIC_RELEASE); }
EMU_RUNTIME int __tsan_atomic32_load(const volatile int* a, int) { return __atomic_load_n(a, __ATOMIC_ACQUIRE); }
EMU_RUNTIME void __tsan_atomic32_store(volatile int* a, int v, int) { __atomic_store_n(a, v, __ATOMIC_RELEASE); }
EMU_RUNTIME int __tsan_atomic32_fetch_add(volatile int* a, int v, int) { return __atomic_fetch_add(a, v, __ATOMIC_ACQ_REL); }
}

EMU_RUNTIME inline void emu_barrier_reached(EmuBlock& b) {
    if (b.direct) throw EmuError("a barrier was reached by a kernel whose first launch reached none");
    b.reached_barrier = true;
}

EMU_RUNTIME inline void __syncthreads() {
    EmuBlock& b = *g_block;
    emu_barrier_reached(b);
    if (++b.at_syncthreads == int(b.fibers.size())) {  // the last to arrive opens the barrier
        b.at_syncthreads = 0;
        ++g_epoch;  // what was written before the barrier is visible to every warp after it
        for (auto& f : b.fibers) if (f.state == EmuState::at_syncthreads) f.state = EmuState::ready;
        return;
    }
    emu_wait(EmuState::at_syncthreads);
}

// One warp-wide meeting point: returns once every lane of this thread's warp has
// arrived. A warp-wide operation posts its operands, meets, and reads the
// others': one meeting suffices, because consecutive operations post into
// alternate slot sets (emu_slot_set), and a lane can only post into a set again
// after every lane has met at the operation in between, done reading it.
EMU_RUNTIME inline void emu_warp_phase(EmuBlock& b, int warp) {
    if (++b.warp_arrived[warp] == b.warp_size[warp]) {
        b.warp_arrived[warp] = 0;
        for (int t = warp * 32; t < warp * 32 + b.warp_size[warp]; ++t)
            if (b.fibers[t].state == EmuState::at_shuffle) b.fibers[t].state = EmuState::ready;
    } else {
        emu_wait(EmuState::at_shuffle);
    }
}

// Which of two slot sets this thread's next warp-wide operation uses.
EMU_RUNTIME inline int emu_slot_set(EmuBlock& b) { return b.fibers[b.current].warp_ops++ & 1; }

template <typename V>
EMU_RUNTIME V __shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = 32) {
    static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
    if (mask != 0xffffffffu || width != 32) throw EmuError("the emulator supports only full-warp shuffles");
    EmuBlock& b = *g_block;
    emu_barrier_reached(b);
    const int tid = b.current, warp = tid / 32, lane = tid % 32, source = lane ^ lane_mask;
    if (source >= b.warp_size[warp]) throw EmuError("__shfl_xor_sync reads a lane past the end of a partial warp");
    const int set = emu_slot_set(b);
    std::memcpy(b.slots[set][tid], &value, sizeof(V));
    emu_warp_phase(b, warp);  // every lane has written its value
    V result;
    std::memcpy(&result, b.slots[set][warp * 32 + source], sizeof(V));
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
EMU_RUNTIME inline void emu_mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&bv)[2]) {
    EmuBlock& b = *g_block;
    emu_barrier_reached(b);
    const int tid = b.current, warp = tid / 32, lane = tid % 32;
    if (b.warp_size[warp] != 32) throw EmuError("mma.sync needs a full warp of 32 lanes");
    static EmuMmaSlot slots[2][1024];
    const int set = emu_slot_set(b);
    EmuMmaSlot& mine = slots[set][tid];
    for (int i = 0; i < 4; ++i) mine.a[i] = a[i], mine.d[i] = d[i];
    mine.b[0] = bv[0], mine.b[1] = bv[1];
    emu_warp_phase(b, warp);  // every lane has posted its fragments
    const EmuMmaSlot* w = slots[set] + warp * 32;
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
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: `count` 8x8 matrices
// of 16-bit elements, matrix i's 8 rows at the addresses lanes 8i .. 8i+7 give
// (16 bytes each, 16-byte aligned). Register i of lane l receives row l/4,
// columns 2(l%4) and 2(l%4)+1 of matrix i (the smaller column in the low half);
// with .trans, of the transposed matrix: rows 2(l%4) and 2(l%4)+1 of column l/4.
EMU_RUNTIME inline void emu_ldmatrix(unsigned* regs, int count, bool trans, const void* row) {
    EmuBlock& b = *g_block;
    emu_barrier_reached(b);
    const int tid = b.current, warp = tid / 32, lane = tid % 32;
    if (b.warp_size[warp] != 32) throw EmuError("ldmatrix needs a full warp of 32 lanes");
    emu_check_aligned(row, 16);
    static const void* rows[2][1024];
    const int set = emu_slot_set(b);
    rows[set][tid] = row;
    emu_warp_phase(b, warp);  // every lane has posted its row address
    const void* pc = __builtin_return_address(0);
    for (int i = 0; i < count; ++i) {
        auto element = [&](int r, int c) {  // matrix i, row r, column c
            const auto* p = static_cast<const unsigned short*>(rows[set][warp * 32 + 8 * i + r]);
            emu_shared_access(p + c, 2, false, pc);
            return (unsigned)p[c];
        };
        const int g = lane / 4, t = lane % 4;
        regs[i] = trans ? element(2 * t, g) | (element(2 * t + 1, g) << 16)
                        : element(g, 2 * t) | (element(g, 2 * t + 1) << 16);
    }
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: 16 bytes to shared
// memory, the first src_bytes from global memory and the rest zeros. The source
// is read now; the copy lands at the cp.async.wait_group that retires its group.
// It counts as a write to shared memory from now until then (checked now and
// when it lands).
EMU_RUNTIME inline void emu_cp_async(void* dst, const void* src, int src_bytes) {
    emu_check_aligned(dst, 16);
    emu_check_aligned(src, 16);
    if (src_bytes < 0 || src_bytes > 16) throw EmuError("cp.async: src_bytes outside 0..16");
    const void* pc = __builtin_return_address(0);
    if (reinterpret_cast<const char*>(dst) < __bss_start || reinterpret_cast<const char*>(dst) >= _end)
        throw EmuError("cp.async: the destination is not __shared__ memory");
    emu_shared_access(dst, 16, true, pc);
    EmuCopy copy{static_cast<unsigned char*>(dst), {}, 16, pc};
    std::memcpy(copy.data, src, src_bytes);
    g_block->fibers[g_block->current].open_copies.push_back(copy);
}
EMU_RUNTIME inline void emu_cp_async_commit() {
    EmuFiber& self = g_block->fibers[g_block->current];
    self.copy_groups.push_back(std::move(self.open_copies));
    self.open_copies.clear();
}
// cp.async.wait_group n: every committed group but the newest n has landed.
EMU_RUNTIME inline void emu_cp_async_wait(int newest_pending) {
    EmuFiber& self = g_block->fibers[g_block->current];
    while (int(self.copy_groups.size()) > newest_pending) {
        for (const EmuCopy& c : self.copy_groups.front()) {
            emu_shared_access(c.dst, c.bytes, true, c.pc);
            std::memcpy(c.dst, c.data, c.bytes);
        }
        self.copy_groups.erase(self.copy_groups.begin());
    }
}

// atomicAdd on a float: the fibers never preempt one another, so a plain
// read-modify-write is atomic; the order of the additions follows the schedule.
EMU_RUNTIME inline float atomicAdd(float* address, float value) {
    const float old = *address;
    *address = old + value;
    return old;
}

EMU_RUNTIME static void emu_fiber_main() {
    EmuBlock& b = *g_block;
    try {
        b.call(b.kernel, b.params);
        const EmuFiber& self = b.fibers[b.current];
        if (!self.copy_groups.empty() || !self.open_copies.empty())
            throw EmuError("a thread returned with cp.async copies it never waited for (cp.async.wait_group)");
    } catch (const std::exception& e) {
        if (b.error.empty()) b.error = e.what();
    }
    b.fibers[b.current].state = EmuState::done;
    _longjmp(b.scheduler, 1);
}

// Run one block to completion; returns an error message, empty on success.
EMU_RUNTIME static std::string emu_run_block(EmuBlock& b) {
    for (std::size_t t = 0; t < b.fibers.size(); ++t) {
        EmuFiber& f = b.fibers[t];
        if (!f.stack) {
            f.stack.reset(new char[EMU_STACK_BYTES]);
            getcontext(&f.context);  // a system call: once per fiber, not per block
            f.context.uc_stack.ss_sp = f.stack.get();
            f.context.uc_stack.ss_size = EMU_STACK_BYTES;
            f.context.uc_link = nullptr;  // emu_fiber_main never returns: it jumps back
        }
        f.state = EmuState::ready;
        f.started = false;
        f.copy_groups.clear();
        f.open_copies.clear();
        f.warp_ops = 0;
        makecontext(&f.context, emu_fiber_main, 0);
    }
    b.at_syncthreads = 0;
    ++g_epoch;  // nothing of the previous block's shared memory use is this block's
    std::fill(b.warp_arrived.begin(), b.warp_arrived.end(), 0);
    const int n = int(b.fibers.size()), n_warps = int(b.warp_size.size());
    for (long round = 0;; ++round) {
        bool ran = false;
        const bool up = round % 2 == 0;
        for (int k = 0; k < n_warps; ++k) {
            const int warp = up ? k : n_warps - 1 - k;
            // this warp alone, until each of its lanes waits at __syncthreads or has returned
            for (bool warp_ran = true; warp_ran;) {
                warp_ran = false;
                for (int lane = 0; lane < b.warp_size[warp]; ++lane) {
                    const int t = warp * 32 + (up ? lane : b.warp_size[warp] - 1 - lane);
                    if (b.fibers[t].state != EmuState::ready) continue;
                    b.current = t;
                    threadIdx = b.fibers[t].index;
                    g_in_kernel = true;
                    if (!_setjmp(b.scheduler)) {
                        EmuFiber& f = b.fibers[t];
                        if (f.started) _longjmp(f.jump, 1);
                        f.started = true;
                        setcontext(&f.context);
                    }
                    g_in_kernel = false;
                    ran = warp_ran = true;
                    if (!b.error.empty()) return b.error;
                }
            }
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

extern "C" __attribute__((visibility("default"))) int emu_signature(const char* name, char* out, int outlen) {
    auto it = emu_registry().find(name);
    if (it == emu_registry().end()) return 1;
    std::snprintf(out, outlen, "%s", it->second.signature.c_str());
    return 0;
}

extern "C" __attribute__((visibility("default"), no_sanitize_thread)) int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
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
    block->name = name;
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
                ++g_epoch;
                if (!block->direct) {
                    error = emu_run_block(*block);
                    continue;
                }
                for (int t = 0; t < n && error.empty(); ++t) {
                    block->current = t;
                    threadIdx = block->fibers[t].index;
                    g_in_kernel = true;
                    try {
                        block->call(block->kernel, block->params);
                    } catch (const std::exception& e) {
                        error = e.what();
                    }
                    g_in_kernel = false;
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
