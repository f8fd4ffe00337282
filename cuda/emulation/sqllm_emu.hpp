// sqllm_emu.hpp -- a host emulator of the part of CUDA that sqllm's kernels
// use, so that cuda/*.cu compile as plain C++ and run on the CPU in CI (no
// GPU there).  It exists to test the kernels' logic -- indexing, tiling,
// shared-memory layout, tails, the CSR walk, the warp reductions and the host
// dispatch -- against the CPU references; it says nothing about speed, and
// the device arithmetic is the host's (IEEE fp32 with fma), which is what the
// kernels request from the device (no fast-math).
//
// Use: put cuda/emulation first on the include path and define
// SQLLM_CUDA_EMULATION; <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h>
// then resolve to the shims next to this file.  Kernels are launched through
// SQLLM_KERNEL_LAUNCH (cuda/lut_kernels.cuh), which calls sqllm_emu::launch.
//
// Execution model.  A launch runs synchronously on the calling thread.  The
// blocks run one after another; the threads of a block are cooperative fibers
// (own stacks, see switch_context) scheduled round robin, so __syncthreads and warp shuffles have
// their CUDA meaning and every interleaving they permit is a legal one.
// Checks that a GPU would not report, or would report only as a hang or as
// garbage, become launch errors (cudaErrorLaunchFailure, message in
// sqllm_emu::last_message() and on stderr):
//   * a __syncthreads that not every thread of the block reaches (a thread
//     exited or waits elsewhere): "barrier divergence";
//   * a full-mask shuffle that not all 32 lanes of the warp reach;
//   * a launch configuration CUDA rejects (block size, dynamic shared memory
//     above 48 KiB without cudaFuncAttributeMaxDynamicSharedMemorySize, or
//     above the opt-in maximum) returns the error CUDA returns.
// Dynamic shared memory is a heap block of exactly the requested size filled
// with 0xFF bytes (every float read before it is written is a NaN), so that
// AddressSanitizer builds catch out-of-bounds shared-memory accesses and
// reads of unstaged data show up in the results.  Under AddressSanitizer the
// fiber switches are annotated (__sanitizer_start/finish_switch_fiber).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SQLLM_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SQLLM_EMU_ASAN 1
#endif
#endif
#if defined(SQLLM_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ---------------------------------------------------------------------------
// Qualifiers and built-in types.
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---------------------------------------------------------------------------
// Runtime API subset.
// ---------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoDevice = 100,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr : int { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

namespace sqllm_emu {

/// The emulated device (an H100's limits by default); tests may change it
/// before the first query of an attribute.
struct DeviceConfig {
  int device_count = 1;
  int max_threads_per_block = 1024;
  int default_dynamic_smem = 48 * 1024;
  int max_smem_optin = 227 * 1024;
};
inline DeviceConfig& device() {
  static DeviceConfig d;
  return d;
}

/// One recorded launch (for tests that check which kernel ran).
struct LaunchRecord {
  const void* kernel;
  dim3 grid, block;
  std::size_t smem;
};

struct State {
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
  cudaError_t fail_next_launch = cudaSuccess;  // test hook: the next launch returns this
  std::vector<LaunchRecord> launches;
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
};
inline State& state() {
  static thread_local State s;
  return s;
}
inline const std::string& last_message() { return state().last_message; }
inline std::vector<LaunchRecord>& launches() { return state().launches; }
inline void fail_next_launch(cudaError_t e) { state().fail_next_launch = e; }

// ---------------------------------------------------------------------------
// Fibers.
// ---------------------------------------------------------------------------
constexpr int kWarpSize = 32;
constexpr std::size_t kStackBytes = 512 * 1024;

// Context switch.  On x86-64 a few instructions that save the callee-saved
// registers (and the SSE/x87 control words) on the old stack and restore
// them from the new one; elsewhere POSIX swapcontext, which is correct but
// makes a system call per switch (signal mask).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
struct Context {
  void* sp = nullptr;
};
__attribute__((naked, noinline)) static void emu_switch_stacks(void** /*save_sp*/, void* /*new_sp*/) {
  asm("pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
/// A fresh context that starts entry() on the given stack (entry never returns).
inline void make_context(Context& c, char* stack, std::size_t size, void (*entry)()) {
  auto top = reinterpret_cast<std::uintptr_t>(stack + size) & ~std::uintptr_t{15};
  auto* w = reinterpret_cast<std::uint64_t*>(top);
  w[-1] = 0;                                            // entry's (never used) return address
  w[-2] = reinterpret_cast<std::uint64_t>(entry);       // where the first switch returns to
  for (int k = 3; k <= 8; ++k) w[-k] = 0;               // rbp rbx r12 r13 r14 r15
  w[-9] = 0x1F80u | (std::uint64_t{0x037Fu} << 32);     // default MXCSR, x87 control word
  c.sp = &w[-9];
}
inline void switch_context(Context& from, Context& to) { emu_switch_stacks(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void make_context(Context& c, char* stack, std::size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  dim3 tid;
  int linear = 0;
  enum { kReady, kWaitBlock, kWaitWarp, kDone } status = kReady;
  unsigned wait_gen = 0;
  unsigned shuffles = 0;  // shuffles done (parity selects the exchange buffer)
  void* asan_fake = nullptr;
};

struct Warp {
  int size = kWarpSize;
  int arrived = 0;
  unsigned gen = 0;
  std::uint64_t slot[2][kWarpSize] = {};
};

struct Block {
  dim3 block_idx, block_dim, grid_dim;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Fiber* current = nullptr;
  Context sched;
  int bar_arrived = 0;
  unsigned bar_gen = 0;
  void* smem = nullptr;
  std::string error;
  const std::function<void()>* body = nullptr;
  void* asan_main_fake = nullptr;
  const void* asan_main_bottom = nullptr;
  std::size_t asan_main_size = 0;
};

/// Fiber stacks, kept across launches (fresh mappings would be faulted in
/// again on every launch).
inline char* fiber_stack(std::size_t k) {
  struct Pool {
    std::vector<char*> stacks;
    ~Pool() {
      for (char* p : stacks) std::free(p);
    }
  };
  static thread_local Pool pool;
  while (pool.stacks.size() <= k) pool.stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
  char* s = pool.stacks[k];
#if defined(SQLLM_EMU_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(s, kStackBytes);  // frames of fibers that ended mid-call
#endif
  return s;
}

inline Block*& current_block() {
  static thread_local Block* b = nullptr;
  return b;
}
inline Fiber& current_fiber() {
  Block* b = current_block();
  if (b == nullptr || b->current == nullptr) {
    std::fprintf(stderr, "sqllm_emu: device code called outside a kernel launch\n");
    std::abort();
  }
  return *b->current;
}

/// Switch from the running fiber back to the block scheduler.
inline void yield_to_scheduler(bool dying = false) {
  Block* b = current_block();
  Fiber* f = b->current;
#if defined(SQLLM_EMU_ASAN)
  __sanitizer_start_switch_fiber(dying ? nullptr : &f->asan_fake, b->asan_main_bottom, b->asan_main_size);
#else
  (void)dying;
#endif
  switch_context(f->ctx, b->sched);
#if defined(SQLLM_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f->asan_fake, &b->asan_main_bottom, &b->asan_main_size);
#endif
}

inline void fiber_main() {
  Block* b = current_block();
#if defined(SQLLM_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &b->asan_main_bottom, &b->asan_main_size);
#endif
  (*b->body)();
  b->current->status = Fiber::kDone;
  yield_to_scheduler(/*dying=*/true);
}

inline void fail(const std::string& what) {
  Block* b = current_block();
  if (b->error.empty()) b->error = what;
}

/// Runs every fiber of the block to completion; false (and b.error) on a
/// deadlock, i.e. a barrier that can never complete.
inline bool run_block(Block& b) {
  for (Fiber& f : b.fibers) {
    make_context(f.ctx, f.stack, kStackBytes, &fiber_main);
    f.status = Fiber::kReady;
    f.shuffles = 0;
  }
  for (;;) {
    bool progress = false;
    int done = 0;
    for (Fiber& f : b.fibers) {
      bool runnable = false;
      switch (f.status) {
        case Fiber::kDone:
          ++done;
          break;
        case Fiber::kReady:
          runnable = true;
          break;
        case Fiber::kWaitBlock:
          runnable = f.wait_gen != b.bar_gen;
          break;
        case Fiber::kWaitWarp:
          runnable = f.wait_gen != b.warps[static_cast<std::size_t>(f.linear / kWarpSize)].gen;
          break;
      }
      if (!runnable) continue;
      f.status = Fiber::kReady;
      b.current = &f;
#if defined(SQLLM_EMU_ASAN)
      __sanitizer_start_switch_fiber(&b.asan_main_fake, f.stack, kStackBytes);
#endif
      switch_context(b.sched, f.ctx);
#if defined(SQLLM_EMU_ASAN)
      __sanitizer_finish_switch_fiber(b.asan_main_fake, nullptr, nullptr);
#endif
      b.current = nullptr;
      progress = true;
      if (!b.error.empty()) return false;
    }
    if (done == b.nthreads) return true;
    if (!progress) {
      int at_block = 0, at_warp = 0;
      for (const Fiber& f : b.fibers) {
        at_block += f.status == Fiber::kWaitBlock;
        at_warp += f.status == Fiber::kWaitWarp;
      }
      char msg[256];
      std::snprintf(msg, sizeof msg,
                    "barrier divergence in block (%u,%u,%u): %d threads wait at __syncthreads, %d at a "
                    "warp shuffle, %d have exited",
                    b.block_idx.x, b.block_idx.y, b.block_idx.z, at_block, at_warp, done);
      b.error = msg;
      return false;
    }
  }
}

inline void block_barrier() {
  Block* b = current_block();
  Fiber& f = *b->current;
  f.wait_gen = b->bar_gen;
  if (++b->bar_arrived == b->nthreads) {
    b->bar_arrived = 0;
    ++b->bar_gen;
    return;
  }
  f.status = Fiber::kWaitBlock;
  yield_to_scheduler();
}

inline void warp_barrier(Warp& w) {
  Fiber& f = *current_block()->current;
  f.wait_gen = w.gen;
  if (++w.arrived == w.size) {
    w.arrived = 0;
    ++w.gen;
    return;
  }
  f.status = Fiber::kWaitWarp;
  yield_to_scheduler();
}

template <class T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a 1..8-byte value");
  Block* b = current_block();
  Fiber& f = *b->current;
  Warp& w = b->warps[static_cast<std::size_t>(f.linear / kWarpSize)];
  const unsigned full = w.size == kWarpSize ? 0xffffffffu : ((1u << w.size) - 1u);
  if (mask != full || width != kWarpSize) {
    fail("sqllm_emu: only full-warp shuffles (mask of all lanes, width 32) are emulated");
    yield_to_scheduler();
  }
  const int lane = f.linear % kWarpSize;
  const int parity = static_cast<int>(f.shuffles & 1u);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[parity][lane] = bits;
  warp_barrier(w);
  int src = lane ^ lane_mask;
  if (src < 0 || src >= w.size) src = lane;
  T r;
  std::memcpy(&r, &w.slot[parity][src], sizeof(T));
  ++f.shuffles;
  return r;
}

inline void* dynamic_shared() { return current_block()->smem; }

inline cudaError_t set_error(cudaError_t e, const std::string& msg) {
  state().last_error = e;
  state().last_message = msg;
  if (e != cudaSuccess) std::fprintf(stderr, "sqllm_emu: %s\n", msg.c_str());
  return e;
}

/// Runs kernel(args...) over grid x block (synchronously).
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream, A&&... args) {
  (void)stream;
  State& st = state();
  const void* key = reinterpret_cast<const void*>(kernel);
  st.launches.push_back(LaunchRecord{key, grid, block, smem});
  if (st.fail_next_launch != cudaSuccess) {
    const cudaError_t e = st.fail_next_launch;
    st.fail_next_launch = cudaSuccess;
    set_error(e, "launch failure injected by the test (fail_next_launch)");
    return;
  }
  const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > device().max_threads_per_block || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid launch configuration");
    return;
  }
  std::size_t smem_limit = static_cast<std::size_t>(device().default_dynamic_smem);
  const auto granted = st.max_dynamic_smem.find(key);
  if (granted != st.max_dynamic_smem.end()) smem_limit = static_cast<std::size_t>(granted->second);
  if (smem > smem_limit) {
    set_error(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(smem) + " B above the kernel's limit " +
                                         std::to_string(smem_limit) + " B");
    return;
  }

  // Kernel parameters are copied, as CUDA copies them to the device.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const std::function<void()> body = [&params, kernel] { std::apply(kernel, params); };

  Block b;
  b.block_dim = block;
  b.grid_dim = grid;
  b.nthreads = static_cast<int>(nthreads);
  b.body = &body;
  b.fibers.resize(static_cast<std::size_t>(nthreads));
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber& f = b.fibers[static_cast<std::size_t>(t)];
    f.linear = t;
    f.tid = dim3(static_cast<unsigned>(t) % block.x, static_cast<unsigned>(t) / block.x % block.y,
                 static_cast<unsigned>(t) / (block.x * block.y));
    f.stack = fiber_stack(static_cast<std::size_t>(t));
  }
  b.warps.resize(static_cast<std::size_t>((nthreads + kWarpSize - 1) / kWarpSize));
  for (std::size_t w = 0; w < b.warps.size(); ++w) {
    b.warps[w].size = static_cast<int>(std::min<long long>(kWarpSize, nthreads - static_cast<long long>(w) * kWarpSize));
  }
  Block* const saved = current_block();
  current_block() = &b;
  std::string error;
  for (unsigned z = 0; z < grid.z && error.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && error.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && error.empty(); ++x) {
        b.block_idx = dim3(x, y, z);
        b.bar_arrived = 0;
        for (Warp& w : b.warps) w.arrived = 0;
        b.smem = smem > 0 ? std::malloc(smem) : nullptr;
        if (b.smem != nullptr) std::memset(b.smem, 0xFF, smem);
        if (!run_block(b)) error = b.error;
        std::free(b.smem);
        b.smem = nullptr;
      }
    }
  }
  current_block() = saved;
  // A successful launch leaves an earlier (non-sticky) error in place, as CUDA does.
  if (!error.empty()) set_error(cudaErrorLaunchFailure, error);
}

}  // namespace sqllm_emu

// ---------------------------------------------------------------------------
// Built-in variables and device functions.
// ---------------------------------------------------------------------------
#define threadIdx (::sqllm_emu::current_fiber().tid)
#define blockIdx (::sqllm_emu::current_block()->block_idx)
#define blockDim (::sqllm_emu::current_block()->block_dim)
#define gridDim (::sqllm_emu::current_block()->grid_dim)

inline void __syncthreads() { ::sqllm_emu::block_barrier(); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::sqllm_emu::shfl_xor(mask, v, lane_mask, width);
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const std::uint64_t v = (static_cast<std::uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31u));
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
using std::fmaf;

// ---------------------------------------------------------------------------
// Runtime functions.
// ---------------------------------------------------------------------------
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorNoDevice:
      return "cudaErrorNoDevice";
    case cudaErrorLaunchOutOfResources:
      return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : ::sqllm_emu::state().last_message.c_str();
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::sqllm_emu::state().last_error;
  ::sqllm_emu::state().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::sqllm_emu::state().last_error; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = ::sqllm_emu::device().device_count;
  return *n > 0 ? cudaSuccess : cudaErrorNoDevice;
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return ::sqllm_emu::device().device_count > 0 ? cudaSuccess : cudaErrorNoDevice;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return cudaErrorInvalidDevice;
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *v = ::sqllm_emu::device().max_smem_optin;
  return cudaSuccess;
}
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > ::sqllm_emu::device().max_smem_optin) {
    return ::sqllm_emu::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: invalid value");
  }
  ::sqllm_emu::state().max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
