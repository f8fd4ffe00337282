// Emulation shim for <cuda_fp16.h> (see sqllm_emu.hpp): IEEE binary16 storage
// and the conversions sqllm's kernels use, rounding to nearest even.
#pragma once
#if !defined(SQLLM_CUDA_EMULATION)
#error "cuda/emulation is on the include path but SQLLM_CUDA_EMULATION is not defined"
#endif
#include <cstdint>

#include "sqllm/half.hpp"
#include "sqllm_emu.hpp"

struct __half {
  std::uint16_t bits;
};
inline float __half2float(__half h) { return ::sqllm::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{::sqllm::float_to_half_bits(f)}; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
