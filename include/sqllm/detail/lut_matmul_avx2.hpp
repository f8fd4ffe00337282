// sqllm/detail/lut_matmul_avx2.hpp -- the x86 AVX2/FMA path of the CPU LUT
// matmul for 1..4-bit codes (not part of the public API).
//
// Eight consecutive codes starting at a multiple of 8 occupy BITS bytes that
// start on a byte boundary (8*BITS bits), so a 32-bit broadcast load and a
// per-lane variable shift put code l in the low BITS bits of lane l (higher
// bits hold the following codes).  Row grouping: the 2^BITS <= 16 entry table
// of a row lives in two ymm registers, repeated with period 2^BITS over
// entries 0..7, so vpermps (which reads only the low 3 index bits) needs no
// mask; 4-bit codes pick between the two halves by bit 3 (a blend on the
// index shifted to the sign bit).  Column grouping gathers from the
// per-column tables.  Each decoded group of eight weights is multiplied with
// up to NB batch rows held in NB accumulators, so codes are read once per NB
// rows.  Every function is compiled for AVX2+FMA by its target attribute and
// only called after cpu_supports(CpuKernel::Avx2) (lut_matmul.hpp).
#pragma once

#include "sqllm/cpu_features.hpp"

#if defined(SQLLM_X86_SIMD)
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

SQLLM_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

/// Lane l: code 8*group + l in bits 0..BITS-1, the next codes above (unmasked).
template <int BITS>
SQLLM_TARGET_AVX2 inline __m256i decode8(const unsigned char* row_bytes, std::size_t group) {
  std::uint32_t v;
  std::memcpy(&v, row_bytes + group * BITS, sizeof v);
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS,
                                           6 * BITS, 7 * BITS);
  return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(v)), shifts);
}

// Row grouping: lookup in a table held in registers (lo = entries 0..7, hi = 8..15).
template <int BITS>
SQLLM_TARGET_AVX2 inline __m256 lookup(__m256i idx, __m256 lo, __m256 hi) {
  __m256 w = _mm256_permutevar8x32_ps(lo, idx);
  if (BITS == 4) {
    const __m256 wh = _mm256_permutevar8x32_ps(hi, idx);
    w = _mm256_blendv_ps(w, wh, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
  return w;
}

/// Decode group g (codes 8g..8g+7) and accumulate it into NB batch rows.
template <int BITS, bool ROW, int NB>
SQLLM_TARGET_AVX2 __attribute__((always_inline)) inline void step(
    __m256* acc, const unsigned char* bytes, __m256 lo, __m256 hi, __m256i mask, __m256i col_step,
    const float* tables, const float* xp, std::size_t g) {
  constexpr std::size_t K = std::size_t{1} << BITS;
  const __m256i idx = decode8<BITS>(bytes, g);
  __m256 w;
  if (ROW) {
    w = lookup<BITS>(idx, lo, hi);
  } else {
    const float* base = tables + g * 8 * K;
    w = _mm256_i32gather_ps(base, _mm256_add_epi32(_mm256_and_si256(idx, mask), col_step), 4);
  }
  SQLLM_UNROLL
  for (int b = 0; b < NB; ++b)
    acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + (g * NB + b) * 8), acc[b]);
}

/// One output row o, batch rows [b0, b0+NB): y[b, o] = sum_i x[b, i] Ŵ[o, i].
/// xp: those rows of x interleaved by groups (pack_x), the main loop's only x.
template <int BITS, bool ROW, int NB>
SQLLM_TARGET_AVX2 inline void row_kernel(const float* x, const float* xp, std::size_t in,
                                         std::size_t out, const std::uint32_t* codes,
                                         const float* tables, const CsrView* csr, float* y,
                                         std::size_t o, std::size_t b0) {
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
    for (std::size_t k = 0; k < 16; ++k) lut[k] = tables[o * K + k % K];  // period 2^BITS
    lo = _mm256_load_ps(lut);
    hi = _mm256_load_ps(lut + 8);
  }
  const __m256i col_step = _mm256_setr_epi32(0, K, 2 * K, 3 * K, 4 * K, 5 * K, 6 * K, 7 * K);

  // CH independent accumulators per batch row hide the FMA latency when NB is small.
  constexpr int CH = NB >= 4 ? 1 : 4 / NB;
  __m256 acc[CH * NB];
  SQLLM_UNROLL
  for (int a = 0; a < CH * NB; ++a) acc[a] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(K) - 1);
  std::size_t g = 0;
  for (; g + CH <= groups; g += CH) {
    SQLLM_UNROLL
    for (int c = 0; c < CH; ++c)
      step<BITS, ROW, NB>(acc + c * NB, bytes, lo, hi, mask, col_step, tables, xp, g + c);
  }
  for (; g < groups; ++g) step<BITS, ROW, NB>(acc, bytes, lo, hi, mask, col_step, tables, xp, g);
  SQLLM_UNROLL
  for (int c = 1; c < CH; ++c)
    SQLLM_UNROLL
    for (int b = 0; b < NB; ++b) acc[b] = _mm256_add_ps(acc[b], acc[c * NB + b]);
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

/// Row o of Ŵ into dst[0..in) (the tiles of the large-batch GEMM path).
template <int BITS, bool ROW>
SQLLM_TARGET_AVX2 void decode_row(const std::uint32_t* codes, const float* tables, std::size_t in,
                                  std::size_t o, float* dst) {
  constexpr std::size_t K = std::size_t{1} << BITS;
  const std::size_t words = packed_words(in, BITS);
  const std::uint32_t* row = codes + o * words;
  const auto* bytes = reinterpret_cast<const unsigned char*>(row);
  const std::size_t row_bytes = words * 4;
  std::size_t groups = in / 8;
  while (groups > 0 && (groups - 1) * BITS + 4 > row_bytes) --groups;
  alignas(32) float lut[16] = {0};
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  if (ROW) {
    for (std::size_t k = 0; k < 16; ++k) lut[k] = tables[o * K + k % K];
    lo = _mm256_load_ps(lut);
    hi = _mm256_load_ps(lut + 8);
  }
  const __m256i col_step = _mm256_setr_epi32(0, K, 2 * K, 3 * K, 4 * K, 5 * K, 6 * K, 7 * K);
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(K) - 1);
  for (std::size_t g = 0; g < groups; ++g) {
    const __m256i idx = decode8<BITS>(bytes, g);
    const __m256 w = ROW ? lookup<BITS>(idx, lo, hi)
                         : _mm256_i32gather_ps(
                               tables + g * 8 * K,
                               _mm256_add_epi32(_mm256_and_si256(idx, mask), col_step), 4);
    _mm256_storeu_ps(dst + g * 8, w);
  }
  for (std::size_t i = groups * 8; i < in; ++i) {
    const std::uint32_t c = get_code(row, i, BITS);
    dst[i] = ROW ? tables[o * K + c] : tables[i * K + c];
  }
}

template <int BITS, bool ROW>
SQLLM_TARGET_AVX2 void rows(const float* x, const float* xp, std::size_t batch, std::size_t in,
                            std::size_t out, const std::uint32_t* codes, const float* tables,
                            const CsrView* csr, float* y, std::size_t o) {
  for (std::size_t b0 = 0; b0 < batch; b0 += 8) {
    const float* xc = xp + b0 * (in / 8) * 8;  // this chunk of pack_x's layout
    switch (std::min<std::size_t>(8, batch - b0)) {
      case 1: row_kernel<BITS, ROW, 1>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
      case 2: row_kernel<BITS, ROW, 2>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
      case 3: row_kernel<BITS, ROW, 3>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
      case 4: row_kernel<BITS, ROW, 4>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
      case 5: row_kernel<BITS, ROW, 5>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
      case 6: row_kernel<BITS, ROW, 6>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
      case 7: row_kernel<BITS, ROW, 7>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
      default: row_kernel<BITS, ROW, 8>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
    }
  }
}

}  // namespace avx2
}  // namespace detail
}  // namespace sqllm

#endif  // SQLLM_X86_SIMD
