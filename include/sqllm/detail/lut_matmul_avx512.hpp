// sqllm/detail/lut_matmul_avx512.hpp -- the AVX-512 (F+BW+VL) path of the CPU
// LUT matmul for 1..4-bit codes (not part of the public API).  Needs
// AVX-512 F, BW, VL and VBMI (Ice Lake, Zen 4 and later).
//
// Sixteen consecutive codes starting at a multiple of 16 occupy 2*BITS <= 8
// bytes starting on a byte boundary.  One 64-bit broadcast puts them in every
// qword and vpmultishiftqb moves the bits of code l to the bottom of dword l
// (the following codes above them).  Row grouping: the row's table, repeated
// with period 2^BITS to 16 entries, sits in one zmm register and vpermps
// (which reads the low 4 index bits) turns the 16 codes into 16 weights with
// no mask: two shuffles per 16 weights before the FMAs.  Column grouping
// masks the codes and gathers from the per-column tables.
// Each decoded group of 16 weights is multiplied with NB batch rows held in NB
// accumulators.  Every function is compiled for AVX-512 by its target
// attribute and only called after cpu_supports(CpuKernel::Avx512).
#pragma once

#include "sqllm/cpu_features.hpp"

#if defined(SQLLM_X86_SIMD)
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "sqllm/csr.hpp"
#include "sqllm/packing.hpp"

namespace sqllm {
namespace detail {
namespace avx512 {

/// vpmultishiftqb control: byte k of dword l takes the 8 bits at offset
/// BITS*l + 8k of the broadcast 64-bit word, so lane l holds code l in its
/// low BITS bits (the following codes above them).
template <int BITS>
struct Decode16 {
  alignas(64) std::uint8_t ctrl[64];
  Decode16() {
    for (int l = 0; l < 16; ++l)
      for (int k = 0; k < 4; ++k) ctrl[4 * l + k] = static_cast<std::uint8_t>((BITS * l + 8 * k) % 64);
  }
};

/// Sum of the 16 lanes (the all-ones masked forms here and below: GCC 12's
/// unmasked intrinsics start from an "undefined" register that -Wuninitialized
/// flags once inlined).
SQLLM_TARGET_AVX512 inline float hsum(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  __m256 h = _mm256_add_ps(_mm256_load_ps(t), _mm256_load_ps(t + 8));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
  return _mm_cvtss_f32(q);
}

/// `raw`: the 2*BITS bytes of 16 codes in its low 64 bits.
template <int BITS>
SQLLM_TARGET_AVX512 inline __m512i decode16(__m128i raw, __m512i ctrl) {
  return _mm512_maskz_multishift_epi64_epi8(~__mmask64{0}, ctrl,
                                            _mm512_maskz_broadcastq_epi64(0xFF, raw));
}

/// The weights of group g (16 codes, `raw` its bytes) of a row with table `tab`.
template <int BITS, bool ROW>
SQLLM_TARGET_AVX512 __attribute__((always_inline)) inline __m512 weights16(
    __m128i raw, __m512i ctrl, __m512 tab, __m512i mask, __m512i col_step, const float* tables,
    std::size_t g) {
  constexpr std::size_t K = std::size_t{1} << BITS;
  const __m512i idx = decode16<BITS>(raw, ctrl);
  if (ROW) return _mm512_maskz_permutexvar_ps(0xFFFF, idx, tab);
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF,
                                  _mm512_add_epi32(_mm512_and_si512(idx, mask), col_step),
                                  tables + g * 16 * K, 4);
}

/// Group g of R rows into the accumulators acc[r * NB + b]; `masked`: the
/// load may pass the row's end (row_bytes), so it is masked.
template <int BITS, bool ROW, int NB, int R>
SQLLM_TARGET_AVX512 __attribute__((always_inline)) inline void group(
    __m512* acc, const unsigned char* const* bytes, std::size_t row_bytes, __m512i ctrl,
    const __m512* tab, __m512i mask, __m512i col_step, const float* tables, const float* xp,
    std::size_t g, bool masked) {
  const std::size_t off = g * 2 * BITS;
  __m512 w[R];
  SQLLM_UNROLL
  for (int r = 0; r < R; ++r) {
    const __m128i raw =
        masked ? _mm_maskz_loadu_epi8(
                     static_cast<__mmask16>((1u << std::min<std::size_t>(8, row_bytes - off)) - 1u),
                     bytes[r] + off)
               : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes[r] + off));
    w[r] = weights16<BITS, ROW>(raw, ctrl, tab[r], mask, col_step, tables, g);
  }
  SQLLM_UNROLL
  for (int b = 0; b < NB; ++b) {
    const __m512 xv = _mm512_loadu_ps(xp + (g * NB + b) * 16);
    SQLLM_UNROLL
    for (int r = 0; r < R; ++r) acc[r * NB + b] = _mm512_fmadd_ps(w[r], xv, acc[r * NB + b]);
  }
}

/// R output rows [o, o+R), batch rows [b0, b0+NB): y[b, o] = sum_i x[b, i] Ŵ[o, i].
/// xp: those batch rows of x interleaved by groups (pack_x), the main loop's
/// only x; each x load feeds the R rows' FMAs (R = 2 halves the loads per FMA,
/// which bound the kernel at NB >= 4).
template <int BITS, bool ROW, int NB, int R>
SQLLM_TARGET_AVX512 inline void row_kernel(const float* x, const float* xp, std::size_t in, std::size_t out,
                                           const std::uint32_t* codes, const float* tables,
                                           const CsrView* csr, float* y, std::size_t o,
                                           std::size_t b0) {
  constexpr std::size_t K = std::size_t{1} << BITS;
  static const Decode16<BITS> dec;
  const __m512i ctrl = _mm512_load_si512(dec.ctrl);
  const std::size_t words = packed_words(in, BITS);
  const std::size_t row_bytes = words * 4;
  const std::size_t groups = in / 16;
  // Groups whose 8-byte load stays inside the row; the rest load masked.
  std::size_t safe = 0;
  if (row_bytes >= 8) safe = std::min(groups, (row_bytes - 8) / (2 * BITS) + 1);

  const unsigned char* bytes[R];
  __m512 tab[R];
  for (int r = 0; r < R; ++r) {
    bytes[r] = reinterpret_cast<const unsigned char*>(codes + (o + r) * words);
    tab[r] = _mm512_setzero_ps();
    if (ROW) {
      alignas(64) float lut[16];
      for (std::size_t k = 0; k < 16; ++k) lut[k] = tables[(o + r) * K + k % K];  // period 2^BITS
      tab[r] = _mm512_load_ps(lut);
    }
  }
  const __m512i col_step = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(K)));
  const __m512i mask = _mm512_set1_epi32(static_cast<int>(K) - 1);

  // CH independent accumulators per (row, batch row) hide the FMA latency
  // when R * NB is small: acc[(c * R + r) * NB + b].
  constexpr int CH = R * NB >= 4 ? 1 : 4 / (R * NB);
  __m512 acc[CH * R * NB];
  SQLLM_UNROLL
  for (int a = 0; a < CH * R * NB; ++a) acc[a] = _mm512_setzero_ps();
  std::size_t g = 0;
  const std::size_t safe_main = safe - safe % CH;
  for (; g < safe_main; g += CH) {
    SQLLM_UNROLL
    for (int c = 0; c < CH; ++c)
      group<BITS, ROW, NB, R>(acc + c * R * NB, bytes, row_bytes, ctrl, tab, mask, col_step,
                              tables, xp, g + c, false);
  }
  for (; g < safe; ++g)
    group<BITS, ROW, NB, R>(acc, bytes, row_bytes, ctrl, tab, mask, col_step, tables, xp, g, false);
  for (; g < groups; ++g)
    group<BITS, ROW, NB, R>(acc, bytes, row_bytes, ctrl, tab, mask, col_step, tables, xp, g, true);
  SQLLM_UNROLL
  for (int c = 1; c < CH; ++c)
    SQLLM_UNROLL
    for (int a = 0; a < R * NB; ++a) acc[a] = _mm512_add_ps(acc[a], acc[c * R * NB + a]);
  for (int r = 0; r < R; ++r) {
    const std::size_t orow = o + r;
    const std::uint32_t* row = codes + orow * words;
    float s[NB];
    for (int b = 0; b < NB; ++b) s[b] = hsum(acc[r * NB + b]);
    for (std::size_t i = groups * 16; i < in; ++i) {  // tail
      const std::uint32_t c = get_code(row, i, BITS);
      const float w = ROW ? tables[orow * K + c] : tables[i * K + c];
      for (int b = 0; b < NB; ++b) s[b] += w * x[(b0 + b) * in + i];
    }
    if (csr != nullptr) {
      for (std::int32_t k = csr->row_ptr[orow]; k < csr->row_ptr[orow + 1]; ++k) {
        const float v = half_bits_to_float(csr->values[k]);
        const std::size_t i = static_cast<std::size_t>(csr->col_idx[k]);
        for (int b = 0; b < NB; ++b) s[b] += v * x[(b0 + b) * in + i];
      }
    }
    for (int b = 0; b < NB; ++b) y[(b0 + b) * out + orow] = s[b];
  }
}

/// Row o of Ŵ into dst[0..in) (the tiles of the large-batch GEMM path).
template <int BITS, bool ROW>
SQLLM_TARGET_AVX512 void decode_row(const std::uint32_t* codes, const float* tables, std::size_t in,
                                    std::size_t o, float* dst) {
  constexpr std::size_t K = std::size_t{1} << BITS;
  static const Decode16<BITS> dec;
  const __m512i ctrl = _mm512_load_si512(dec.ctrl);
  const std::size_t words = packed_words(in, BITS);
  const std::uint32_t* row = codes + o * words;
  const auto* bytes = reinterpret_cast<const unsigned char*>(row);
  const std::size_t row_bytes = words * 4, groups = in / 16;
  __m512 tab = _mm512_setzero_ps();
  if (ROW) {
    alignas(64) float lut[16];
    for (std::size_t k = 0; k < 16; ++k) lut[k] = tables[o * K + k % K];
    tab = _mm512_load_ps(lut);
  }
  const __m512i col_step = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(K)));
  const __m512i mask = _mm512_set1_epi32(static_cast<int>(K) - 1);
  for (std::size_t g = 0; g < groups; ++g) {
    const std::size_t off = g * 2 * BITS;
    const __m128i raw =
        off + 8 <= row_bytes
            ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + off))
            : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (row_bytes - off)) - 1u), bytes + off);
    const __m512i idx = decode16<BITS>(raw, ctrl);
    const __m512 w = ROW ? _mm512_maskz_permutexvar_ps(0xFFFF, idx, tab)
                         : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF,
                                                    _mm512_add_epi32(_mm512_and_si512(idx, mask), col_step),
                                                    tables + g * 16 * K, 4);
    _mm512_storeu_ps(dst + g * 16, w);
  }
  for (std::size_t i = groups * 16; i < in; ++i) {
    const std::uint32_t c = get_code(row, i, BITS);
    dst[i] = ROW ? tables[o * K + c] : tables[i * K + c];
  }
}

/// All batch rows of output rows [o, o+nrows), nrows = 1 or 2 (xp: x packed by
/// pack_x<16>), at most 8 batch rows per pass over the rows' codes (the codes
/// stay in L1 between passes).
template <int BITS, bool ROW>
SQLLM_TARGET_AVX512 void rows(const float* x, const float* xp, std::size_t batch, std::size_t in,
                              std::size_t out, const std::uint32_t* codes, const float* tables,
                              const CsrView* csr, float* y, std::size_t o, std::size_t nrows) {
  for (std::size_t b0 = 0; b0 < batch; b0 += 8) {
    const float* xc = xp + b0 * (in / 16) * 16;  // this chunk of pack_x's layout
    const std::size_t nb = std::min<std::size_t>(8, batch - b0);
    if (nrows == 2) {
      switch (nb) {
#define SQLLM_AVX512_CASE(N) \
  case N: row_kernel<BITS, ROW, N, 2>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
        SQLLM_AVX512_CASE(1) SQLLM_AVX512_CASE(2) SQLLM_AVX512_CASE(3) SQLLM_AVX512_CASE(4)
        SQLLM_AVX512_CASE(5) SQLLM_AVX512_CASE(6) SQLLM_AVX512_CASE(7)
        default: row_kernel<BITS, ROW, 8, 2>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
#undef SQLLM_AVX512_CASE
      }
    } else {
      switch (nb) {
#define SQLLM_AVX512_CASE(N) \
  case N: row_kernel<BITS, ROW, N, 1>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
        SQLLM_AVX512_CASE(1) SQLLM_AVX512_CASE(2) SQLLM_AVX512_CASE(3) SQLLM_AVX512_CASE(4)
        SQLLM_AVX512_CASE(5) SQLLM_AVX512_CASE(6) SQLLM_AVX512_CASE(7)
        default: row_kernel<BITS, ROW, 8, 1>(x, xc, in, out, codes, tables, csr, y, o, b0); break;
#undef SQLLM_AVX512_CASE
      }
    }
  }
}

}  // namespace avx512
}  // namespace detail
}  // namespace sqllm

#endif  // SQLLM_X86_SIMD
