// A CPU emulator of the CUDA execution model, enough to run csrc/entropy_cuda.cu's kernels
// without a GPU: CI compiles that file as plain C++ with this directory first on the include
// path (its cuda_runtime.h and cuda_runtime_api.h come here) and checks the kernels against
// the float64 reference (tests/test_cuda_emulated.py).
//
// Model. A launch runs its blocks one after another. The threads of a block are cooperative
// fibers on the calling OS thread, each on its own stack, switched only at
// barriers: __syncthreads() waits for every live thread of the block, a warp shuffle for every
// live thread of its warp (threads that have returned count as arrived). A barrier that can
// never complete (some threads at __syncthreads, others at a warp barrier or in a different
// one that cannot finish) is a deadlock on a GPU; here it fails the launch with
// cudaErrorLaunchFailure and a message on stderr. Dynamic shared memory is filled with 0xFF
// bytes (a NaN in every float type) before each block, so a read of a value no thread wrote
// shows up in the results; static __shared__ arrays are function statics (zeroed once, then
// left as the previous block wrote them). Atomics are plain read-modify-writes (fibers never
// interleave inside one). A warp-collective matrix instruction (csrc/ek_mma.h) gathers its 32
// lanes' fragments at a warp barrier (warp_all_gather) and computes each lane's part; the device
// reports compute capability 9.0. Launch limits are checked as on an sm_90 device: at most 1024
// threads per block, and at most 48 KiB of dynamic shared memory unless raised with
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) up to
// 227 KiB. cudaDeviceGetAttribute reports one device's shared memory per SM and per block
// (sm_90's 228 and 227 KiB unless a test sets others with simt::device(); the opt-in limit
// above follows it). __syncthreads_count counts the live threads' predicates. Threads run in index
// order between barriers, or in reverse
// (Device::reverse_order), which is how the tests look for races between barriers.
//
// What it cannot show: speed, memory coalescing, bank conflicts, races between threads that do
// not meet at a barrier beyond what running them in both orders shows (fibers run one at a time,
// so such a race resolves the same way in each order),
// and the device's own rounding of expf/logf (the host's math functions run instead).
#pragma once

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <vector>

#define EK_SIMT_EMULATION 1

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {  // the CUDA runtime's values
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

namespace simt {

constexpr int kWarpSize = 32;
constexpr size_t kDefaultDynamicShared = 48 * 1024;

// The emulated device's shared memory (bytes): per SM, and the most one block may opt in to.
struct Device {
  size_t shared_per_sm = 228 * 1024, shared_optin = 227 * 1024;
  size_t last_launch_shared = 0;  // the last launch's dynamic shared memory: the schedule it chose
  const void* last_launch_kernel = nullptr;  // the last launch's kernel
  // Run a block's threads in reverse order between barriers: a thread that reads what another
  // wrote without a barrier between them then sees the other outcome, so comparing the results
  // of both orders shows such a race (tests/test_cuda_emulated.py).
  bool reverse_order = false;
  int binary_version = 90;  // what cudaFuncGetAttributes reports of every kernel's code
};
inline Device& device() {
  static Device d;
  return d;
}
constexpr size_t kStackBytes = 64 * 1024;

enum class Wait { none, block, warp, done };

// Switching stacks. On x86-64 a few instructions save the callee-saved registers on the old
// stack and pop them from the new one (ucontext's swapcontext also makes a signal-mask system
// call per switch, 100x slower; the backward kernel switches millions of times per test).
#if defined(__x86_64__)
extern "C" void simt_switch_stack(void** save_sp, void* load_sp);
__asm__(R"(
    .text
    .weak simt_switch_stack
    .hidden simt_switch_stack
    .type simt_switch_stack, @function
simt_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch_stack, .-simt_switch_stack
)");
struct Context {
  void* sp = nullptr;
};
// A fresh stack whose first switch "returns" into entry (which never returns) with the
// alignment of a called function.
inline void make_context(Context& c, std::vector<char>& stack, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack.data()) + stack.size()) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                          // entry's return address: never used
  *--sp = reinterpret_cast<void*>(entry);   // popped by simt_switch_stack's ret
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
  c.sp = sp;
}
inline void switch_context(Context& from, Context& to) { simt_switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void make_context(Context& c, std::vector<char>& stack, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack.data();
  c.uc.uc_stack.ss_size = stack.size();
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Fiber {
  Context context;
  std::vector<char> stack;
  dim3 thread;
  Wait wait = Wait::none;
};

struct Block {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  int current = 0;
  Context scheduler;
  std::vector<unsigned char> shared;  // dynamic shared memory (16-byte aligned by vector's allocator)
  std::vector<uint64_t> warp_slots;   // a shuffle's values, one per lane
  std::vector<std::array<unsigned char, 64>> warp_exchange;  // a warp-collective instruction's operands, per lane
  std::vector<int> block_votes;  // __syncthreads_count's predicates, per thread
  std::function<void()> body;
};

inline Block*& active() {
  static Block* block = nullptr;
  return block;
}
inline cudaError_t& last_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}
inline std::map<const void*, size_t>& shared_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

inline Fiber& self() { return active()->fibers[active()->current]; }
// Fibers are stored in the order of their linear thread index.
inline int linear_thread() { return active()->current; }

inline void wait_at(Wait kind) {
  Fiber& f = self();
  f.wait = kind;
  switch_context(f.context, active()->scheduler);
}

inline void sync_block() { wait_at(Wait::block); }
inline void sync_warp() { wait_at(Wait::warp); }

template <typename T>
T shfl_down(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "simt: only full-warp shuffles are emulated (mask 0x%x)\n", mask);
    last_error() = cudaErrorLaunchFailure;
  }
  Block& b = *active();
  const int t = linear_thread(), lane = t % kWarpSize, base = t - lane;
  std::memcpy(&b.warp_slots[t], &value, sizeof(T));
  sync_warp();
  T out = value;
  const int src = lane + (int)delta;
  if (src < kWarpSize && base + src < (int)b.fibers.size()) std::memcpy(&out, &b.warp_slots[base + src], sizeof(T));
  sync_warp();  // every lane has read before a later shuffle overwrites the slots
  return out;
}

// Every lane's `mine` into all[lane] of every lane of the warp: what a warp-collective
// instruction (csrc/ek_mma.h's matrix product) sees of its operands. A barrier of the warp, as a
// shuffle: all 32 lanes must take part (a partial warp is a launch failure).
template <typename T, int N>
void warp_all_gather(const T (&mine)[N], T (&all)[kWarpSize][N]) {
  static_assert(sizeof(T) * N <= sizeof(Block::warp_exchange[0]), "at most 64 bytes per lane");
  Block& b = *active();
  const int t = linear_thread(), base = t - t % kWarpSize;
  if (base + kWarpSize > (int)b.fibers.size()) {
    std::fprintf(stderr, "simt: a warp-collective instruction in a partial warp\n");
    last_error() = cudaErrorLaunchFailure;
    return;
  }
  std::memcpy(b.warp_exchange[t].data(), mine, sizeof(T) * N);
  sync_warp();
  for (int l = 0; l < kWarpSize; ++l) std::memcpy(all[l], b.warp_exchange[base + l].data(), sizeof(T) * N);
  sync_warp();  // every lane has read before a later exchange overwrites the slots
}

// A thread's whole life: the kernel, then back to the scheduler for good.
inline void fiber_entry() {
  active()->body();
  Fiber& f = self();
  f.wait = Wait::done;
  switch_context(f.context, active()->scheduler);
  __builtin_unreachable();
}

// Releases fibers [lo, hi) waiting at a `kind` barrier when every live one of them waits there.
inline bool release_group(Block& b, int lo, int hi, Wait kind) {
  bool any = false, all = true;
  for (int i = lo; i < hi; ++i) {
    any |= b.fibers[i].wait == kind;
    all &= b.fibers[i].wait == kind || b.fibers[i].wait == Wait::done;
  }
  if (!(any && all)) return false;
  for (int i = lo; i < hi; ++i)
    if (b.fibers[i].wait == kind) b.fibers[i].wait = Wait::none;
  return true;
}

// Releases the threads whose barrier is complete (warps first); false if none could be (a deadlock).
inline bool release(Block& b) {
  const int n = (int)b.fibers.size();
  bool released = false;
  for (int lo = 0; lo < n; lo += kWarpSize) released |= release_group(b, lo, std::min(n, lo + kWarpSize), Wait::warp);
  return released || release_group(b, 0, n, Wait::block);
}

// Runs one block to completion; false on a deadlock.
inline bool run_block(Block& b) {
  active() = &b;
  for (size_t i = 0; i < b.fibers.size(); ++i) {
    b.fibers[i].wait = Wait::none;
    make_context(b.fibers[i].context, b.fibers[i].stack, fiber_entry);
  }
  for (;;) {
    bool live = false;
    const size_t count = b.fibers.size();
    for (size_t k = 0; k < count; ++k) {
      const size_t i = device().reverse_order ? count - 1 - k : k;
      if (b.fibers[i].wait != Wait::none) continue;
      b.current = (int)i;
      switch_context(b.scheduler, b.fibers[i].context);
    }
    for (const Fiber& f : b.fibers) live |= f.wait != Wait::done;
    if (!live) break;
    if (!release(b)) {
      std::fprintf(stderr, "simt: block (%u, %u, %u) deadlocked: its threads wait at barriers that cannot complete\n",
                   b.block_idx.x, b.block_idx.y, b.block_idx.z);
      active() = nullptr;
      return false;
    }
  }
  active() = nullptr;
  return true;
}

inline cudaError_t run(const void* kernel, dim3 grid, dim3 block, size_t shared, std::function<void()> body) {
  const size_t threads = (size_t)block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535)
    return last_error() = cudaErrorInvalidConfiguration;
  auto limit = shared_limits().find(kernel);
  if (shared > (limit == shared_limits().end() ? kDefaultDynamicShared : limit->second))
    return last_error() = cudaErrorInvalidValue;
  Block b;
  b.block_dim = block;
  b.grid_dim = grid;
  b.body = std::move(body);
  b.fibers.resize(threads);
  b.warp_slots.assign(threads, 0);
  b.warp_exchange.resize(threads);
  b.block_votes.assign(threads, 0);
  for (size_t i = 0; i < threads; ++i) {
    b.fibers[i].stack.resize(kStackBytes);
    b.fibers[i].thread = dim3((unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                              (unsigned)(i / ((size_t)block.x * block.y)));
  }
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.block_idx = dim3(x, y, z);
        b.shared.assign(shared, 0xff);
        if (!run_block(b)) return last_error() = cudaErrorLaunchFailure;
      }
  return cudaSuccess;
}

// kernel<<<grid, block, shared, stream>>>(args...) is written
// EK_LAUNCH_KERNEL(kernel, grid, block, shared, stream)(args...) in the sources.
template <typename... Params>
auto launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t) {
  return [=](auto... args) {
    device().last_launch_shared = shared;
    device().last_launch_kernel = reinterpret_cast<const void*>(kernel);
    const cudaError_t e = run(reinterpret_cast<const void*>(kernel), grid, block, shared, [=] { kernel(args...); });
    if (e != cudaSuccess) last_error() = e;
  };
}

}  // namespace simt

// ---- the CUDA names the sources use ---------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define threadIdx (::simt::self().thread)
#define blockIdx (::simt::active()->block_idx)
#define blockDim (::simt::active()->block_dim)
#define gridDim (::simt::active()->grid_dim)
#define EK_DYNAMIC_SHARED(name) unsigned char* name = ::simt::active()->shared.data()
#define EK_LAUNCH_KERNEL(kernel, grid, block, shared, stream) ::simt::launch(kernel, grid, block, shared, stream)

inline void __syncthreads() { ::simt::sync_block(); }
// The barrier, returning how many of the block's live threads passed a nonzero predicate.
inline int __syncthreads_count(int predicate) {
  ::simt::Block& b = *::simt::active();
  b.block_votes[::simt::linear_thread()] = predicate != 0;
  ::simt::sync_block();
  int count = 0;
  for (size_t i = 0; i < b.fibers.size(); ++i) count += b.fibers[i].wait != ::simt::Wait::done && b.block_votes[i];
  ::simt::sync_block();  // every thread has counted before a later vote overwrites
  return count;
}
inline void __syncwarp(unsigned = 0xffffffffu) { ::simt::sync_warp(); }
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  return ::simt::shfl_down(mask, value, delta);
}
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::simt::last_error();
  ::simt::last_error() = cudaSuccess;
  return e;
}
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || (size_t)value > simt::device().shared_optin)
    return cudaErrorInvalidValue;
  simt::shared_limits()[reinterpret_cast<const void*>(kernel)] = (size_t)value;
  return cudaSuccess;
}

// A kernel's attributes: the emulated code is sm_90's (the binary version the launchers check)
// unless a test sets another with simt::device().
struct cudaFuncAttributes {
  int binaryVersion, ptxVersion;
};
template <typename... Params>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, void (*)(Params...)) {
  attributes->binaryVersion = attributes->ptxVersion = simt::device().binary_version;
  return cudaSuccess;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  *value = attr == cudaDevAttrComputeCapabilityMajor ? 9  // sm_90, whose tensor-core instructions ek_mma.h emulates
           : (int)(attr == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? simt::device().shared_per_sm
                                                                       : simt::device().shared_optin);
  return cudaSuccess;
}

using std::isfinite;
using std::max;
using std::min;
