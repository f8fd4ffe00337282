// Emulation shim for <cuda_bf16.h> (see sqllm_emu.hpp): bfloat16 storage and
// the conversions sqllm's kernels use, rounding to nearest even.
#pragma once
#if !defined(SQLLM_CUDA_EMULATION)
#error "cuda/emulation is on the include path but SQLLM_CUDA_EMULATION is not defined"
#endif
#include <cstdint>
#include <cstring>

#include "sqllm_emu.hpp"

struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (overflow carries into inf)
  return __nv_bfloat16{static_cast<std::uint16_t>(u >> 16)};
}
