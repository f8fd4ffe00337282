// sqllm/detail/uniform_matmul_avx2.hpp -- the x86 AVX2/FMA path of the
// uniform matmul for 2, 3, 4 and 8-bit codes, small batches (not public API).
//
// Eight consecutive codes starting at a multiple of 8 occupy BITS whole bytes,
// so one load + per-lane shifts (lut_matmul_avx2.hpp's decode8) or, for 8 bits,
// a byte -> int32 widening yields eight codes.  Each group of eight weights
// is formed as s * (q - z) (one rounding, as the reference) and multiplied
// with up to NB batch rows held in NB accumulators: the codes of a row are
// read once per NB batch rows.
#pragma once

#include "sqllm/detail/lut_matmul_avx2.hpp"

#ifdef SQLLM_HAVE_AVX2
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "sqllm/half.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/quant/uniform.hpp"

namespace sqllm {
namespace detail {
namespace avx2 {

/// Widths this path handles.
constexpr bool uniform_avx2_bits(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }

template <int BITS>
inline __m256i decode8_any(const unsigned char* bytes, std::size_t g) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + g * 8)));
  } else {
    return decode8<BITS>(bytes, g);
  }
}

/// Output row o for batch rows [b0, b0 + NB).  sc/zc: the row's scales and
/// zeros as floats (v.groups() each).
template <int BITS, int NB>
inline void uniform_row_kernel(const UniformView& v, const float* x, float* y, std::size_t o,
                               std::size_t b0, const float* sc, const float* zc) {
  const std::size_t in = v.in;
  const std::size_t words = packed_words(in, BITS);
  const std::uint32_t* row = v.qweight + o * words;
  const auto* bytes = reinterpret_cast<const unsigned char*>(row);
  // Groups of 8 whose load (4 bytes; 8 for 8-bit codes) stays inside the row.
  const std::size_t load = BITS == 8 ? 8 : 4;
  std::size_t groups = in / 8;
  while (groups > 0 && (groups - 1) * BITS + load > words * 4) --groups;
  const std::size_t per = v.group_size < 0 ? groups + 1 : static_cast<std::size_t>(v.group_size) / 8;

  __m256 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps();
  for (std::size_t g = 0; g < groups; ++g) {
    const __m256 q = _mm256_cvtepi32_ps(decode8_any<BITS>(bytes, g));
    __m256 s, z;
    if (v.g_idx == nullptr) {
      const std::size_t grp = v.group_size < 0 ? 0 : g / per;  // 8 | group_size
      s = _mm256_set1_ps(sc[grp]);
      z = _mm256_set1_ps(zc[grp]);
    } else {
      const __m256i gi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.g_idx + g * 8));
      s = _mm256_i32gather_ps(sc, gi, 4);
      z = _mm256_i32gather_ps(zc, gi, 4);
    }
    const __m256 w = _mm256_mul_ps(s, _mm256_sub_ps(q, z));
    for (int b = 0; b < NB; ++b)
      acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (b0 + b) * in + g * 8), acc[b]);
  }
  float r[NB];
  for (int b = 0; b < NB; ++b) r[b] = hsum(acc[b]);
  for (std::size_t i = groups * 8; i < in; ++i) {  // tail
    const std::size_t grp = uniform_group_of(v, i);
    const float w = sc[grp] * (static_cast<float>(get_code(row, i, BITS)) - zc[grp]);
    for (int b = 0; b < NB; ++b) r[b] += w * x[(b0 + b) * in + i];
  }
  for (int b = 0; b < NB; ++b) y[(b0 + b) * v.out + o] = r[b];
}

template <int BITS>
inline void uniform_rows(const UniformView& v, const float* x, std::size_t batch, float* y,
                         std::size_t o, float* sc, float* zc) {
  const std::size_t G = v.groups();
  for (std::size_t g = 0; g < G; ++g) {
    sc[g] = half_bits_to_float(v.scales[o * G + g]);
    zc[g] = half_bits_to_float(v.zeros[o * G + g]);
  }
  for (std::size_t b0 = 0; b0 < batch; b0 += 4) {
    switch (std::min<std::size_t>(4, batch - b0)) {
      case 1: uniform_row_kernel<BITS, 1>(v, x, y, o, b0, sc, zc); break;
      case 2: uniform_row_kernel<BITS, 2>(v, x, y, o, b0, sc, zc); break;
      case 3: uniform_row_kernel<BITS, 3>(v, x, y, o, b0, sc, zc); break;
      default: uniform_row_kernel<BITS, 4>(v, x, y, o, b0, sc, zc); break;
    }
  }
}

}  // namespace avx2
}  // namespace detail
}  // namespace sqllm

#endif  // SQLLM_HAVE_AVX2
