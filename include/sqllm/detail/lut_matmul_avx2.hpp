// sqllm/detail/lut_matmul_avx2.hpp -- the x86 AVX2/FMA path of the CPU LUT
// matmul for 1..4-bit codes (not part of the public API).
//
// Eight consecutive codes starting at a multiple of 8 occupy BITS bytes that
// start on a byte boundary (8*BITS bits), so one unaligned 32-bit load,
// a broadcast and a per-lane variable shift yield eight code indices.  The
// 2^BITS <= 16 entry table of a row lives in two ymm registers and is read
// with permutes (row grouping); column grouping gathers from the per-column
// tables.  Each decoded group of eight weights is multiplied with up to NB
// batch rows held in NB accumulators, so codes are read once per NB rows.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define SQLLM_HAVE_AVX2 1
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "sqllm/csr.hpp"
#include "sqllm/packing.hpp"

namespace sqllm {
namespace detail {
namespace avx2 {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int BITS>
inline __m256i decode8(const unsigned char* row_bytes, std::size_t group) {
  std::uint32_t v;
  std::memcpy(&v, row_bytes + group * BITS, sizeof v);
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                           6 * BITS, 7 * BITS);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(v)), shifts),
                          _mm256_set1_epi32((1 << BITS) - 1));
}

// Row grouping: lookup in a table held in registers (lo = entries 0..7, hi = 8..15).
template <int BITS>
inline __m256 lookup(__m256i idx, __m256 lo, __m256 hi) {
  __m256 w = _mm256_permutevar8x32_ps(lo, idx);
  if (BITS == 4) {
    const __m256 wh = _mm256_permutevar8x32_ps(hi, idx);
    w = _mm256_blendv_ps(w, wh, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
  return w;
}

/// One output row o, batch rows [b0, b0+NB): y[b, o] = sum_i x[b, i] Ŵ[o, i].
template <int BITS, bool ROW, int NB>
inline void row_kernel(const float* x, std::size_t in, std::size_t out, const std::uint32_t* codes,
                       const float* tables, const CsrView* csr, float* y, std::size_t o,
                       std::size_t b0) {
  constexpr std::size_t K = std::size_t{1} << BITS;
  const std::size_t words = packed_words(in, BITS);
  const std::uint32_t* row = codes + o * words;
  const auto* bytes = reinterpret_cast<const unsigned char*>(row);
  // Groups of 8 whose 4-byte load stays inside the row.
  const std::size_t row_bytes = words * 4;
  std::size_t groups = in / 8;
  while (groups > 0 && (groups - 1) * BITS + 4 > row_bytes) --groups;

  alignas(32) float lut[16] = {0};
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  if (ROW) {
    std::memcpy(lut, tables + o * K, K * sizeof(float));
    lo = _mm256_load_ps(lut);
    hi = _mm256_load_ps(lut + 8);
  }
  const __m256i col_step = _mm256_setr_epi32(0, K, 2 * K, 3 * K, 4 * K, 5 * K, 6 * K, 7 * K);

  __m256 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps();
  for (std::size_t g = 0; g < groups; ++g) {
    const __m256i idx = decode8<BITS>(bytes, g);
    __m256 w;
    if (ROW) {
      w = lookup<BITS>(idx, lo, hi);
    } else {
      const float* base = tables + g * 8 * K;
      w = _mm256_i32gather_ps(base, _mm256_add_epi32(idx, col_step), 4);
    }
    for (int b = 0; b < NB; ++b)
      acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (b0 + b) * in + g * 8), acc[b]);
  }
  float s[NB];
  for (int b = 0; b < NB; ++b) s[b] = hsum(acc[b]);
  for (std::size_t i = groups * 8; i < in; ++i) {  // tail
    const std::uint32_t c = get_code(row, i, BITS);
    const float w = ROW ? tables[o * K + c] : tables[i * K + c];
    for (int b = 0; b < NB; ++b) s[b] += w * x[(b0 + b) * in + i];
  }
  if (csr != nullptr) {
    for (std::int32_t k = csr->row_ptr[o]; k < csr->row_ptr[o + 1]; ++k) {
      const float v = half_bits_to_float(csr->values[k]);
      const std::size_t i = static_cast<std::size_t>(csr->col_idx[k]);
      for (int b = 0; b < NB; ++b) s[b] += v * x[(b0 + b) * in + i];
    }
  }
  for (int b = 0; b < NB; ++b) y[(b0 + b) * out + o] = s[b];
}

template <int BITS, bool ROW>
inline void rows(const float* x, std::size_t batch, std::size_t in, std::size_t out,
                 const std::uint32_t* codes, const float* tables, const CsrView* csr, float* y,
                 std::size_t o) {
  for (std::size_t b0 = 0; b0 < batch; b0 += 8) {
    switch (std::min<std::size_t>(8, batch - b0)) {
      case 1: row_kernel<BITS, ROW, 1>(x, in, out, codes, tables, csr, y, o, b0); break;
      case 2: row_kernel<BITS, ROW, 2>(x, in, out, codes, tables, csr, y, o, b0); break;
      case 3: row_kernel<BITS, ROW, 3>(x, in, out, codes, tables, csr, y, o, b0); break;
      case 4: row_kernel<BITS, ROW, 4>(x, in, out, codes, tables, csr, y, o, b0); break;
      case 5: row_kernel<BITS, ROW, 5>(x, in, out, codes, tables, csr, y, o, b0); break;
      case 6: row_kernel<BITS, ROW, 6>(x, in, out, codes, tables, csr, y, o, b0); break;
      case 7: row_kernel<BITS, ROW, 7>(x, in, out, codes, tables, csr, y, o, b0); break;
      default: row_kernel<BITS, ROW, 8>(x, in, out, codes, tables, csr, y, o, b0); break;
    }
  }
}

}  // namespace avx2
}  // namespace detail
}  // namespace sqllm

#endif  // __AVX2__ && __FMA__
