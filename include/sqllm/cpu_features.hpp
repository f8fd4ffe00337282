// sqllm/cpu_features.hpp -- which SIMD kernel the CPU LUT matmul runs.
//
// The SIMD kernels are compiled with function-level target attributes
// (detail/simd.hpp), not with the translation unit's -m flags, so one binary
// carries every path and picks one at run time from what the CPU reports:
// a module built on an AVX-512 machine still runs (scalar or AVX2) on an older
// one.  CpuKernel::Auto takes the best supported path, or the one named by the
// environment variable SQLLM_CPU_KERNEL (scalar | avx2 | avx512), read once; an
// explicit request of a path the CPU lacks throws sqllm::Error.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

#include "sqllm/error.hpp"

// x86 with GCC or Clang: the SIMD kernels exist (compiled per function for
// their target, whatever the -m flags of the translation unit).
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__CUDACC__) && !defined(SQLLM_NO_SIMD)
#define SQLLM_X86_SIMD 1
#define SQLLM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SQLLM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma")))
#endif

namespace sqllm {

enum class CpuKernel { Auto, Scalar, Avx2, Avx512 };

inline const char* to_string(CpuKernel k) {
  switch (k) {
    case CpuKernel::Auto: return "auto";
    case CpuKernel::Scalar: return "scalar";
    case CpuKernel::Avx2: return "avx2";
    case CpuKernel::Avx512: return "avx512";
  }
  return "?";
}

inline CpuKernel parse_cpu_kernel(const std::string& s) {
  if (s == "auto" || s.empty()) return CpuKernel::Auto;
  if (s == "scalar") return CpuKernel::Scalar;
  if (s == "avx2") return CpuKernel::Avx2;
  if (s == "avx512") return CpuKernel::Avx512;
  throw Error(detail::concat("cpu kernel must be auto, scalar, avx2 or avx512, got '", s, "'"));
}

/// Whether this CPU (and this build) can run kernel `k`.
inline bool cpu_supports(CpuKernel k) {
  switch (k) {
    case CpuKernel::Auto:
    case CpuKernel::Scalar:
      return true;
#if defined(SQLLM_X86_SIMD)
    case CpuKernel::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuKernel::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
             __builtin_cpu_supports("avx2") &&
             __builtin_cpu_supports("fma");
#endif
    default:
      return false;
  }
}

/// The best kernel this CPU supports.
inline CpuKernel best_cpu_kernel() {
  static const CpuKernel best = cpu_supports(CpuKernel::Avx512) ? CpuKernel::Avx512
                                : cpu_supports(CpuKernel::Avx2) ? CpuKernel::Avx2
                                                                : CpuKernel::Scalar;
  return best;
}

/// Auto -> SQLLM_CPU_KERNEL if set, else the best supported; anything else is
/// checked against the CPU.
inline CpuKernel resolve_cpu_kernel(CpuKernel requested) {
  if (requested == CpuKernel::Auto) {
    static const CpuKernel from_env = [] {
      const char* e = std::getenv("SQLLM_CPU_KERNEL");
      return e != nullptr ? parse_cpu_kernel(e) : CpuKernel::Auto;
    }();
    requested = from_env == CpuKernel::Auto ? best_cpu_kernel() : from_env;
  }
  SQLLM_CHECK(cpu_supports(requested), "cpu kernel '", to_string(requested),
              "' is not supported by this CPU or build (best: ", to_string(best_cpu_kernel()), ")");
  return requested;
}

}  // namespace sqllm
