// sqllm/detail/lut_matmul_avx512_dword.hpp -- the AVX-512 batch-1 kernel of
// the CPU LUT matmul for row grouping and 1, 2 or 4-bit codes (not part of
// the public API).
//
// With BITS dividing 32 every packed 32-bit word holds C = 32/BITS whole
// codes: code C*j + k of a 64-byte block sits at bits [BITS*k, BITS*(k+1)) of
// its word j.  One 64-byte load gives 16 words; shifting them right by
// BITS*k leaves code C*j + k in the low BITS bits of lane j, and vpermps
// (which reads the low 4 index bits) on the row's table, repeated with period
// 2^BITS to 16 entries, turns them into 16 weights with no mask.  Per 16
// weights that is one shift, one vpermps and one FMA (the byte-aligned kernel
// of lut_matmul_avx512.hpp needs a broadcast and a vpmultishiftqb besides),
// so from cache the kernel runs ~1.5x faster.  x is permuted once per call to
// match: xq[block*16C + 16k + j] = x[block*16C + C*j + k] (permute_x).  The
// columns after the last whole block go through lut_matmul_avx512.hpp's
// 16-code groups on x itself, then a scalar tail.  Every function is compiled
// for AVX-512 by its target attribute and only called after
// cpu_supports(CpuKernel::Avx512).
#pragma once

#include "sqllm/cpu_features.hpp"

#if defined(SQLLM_X86_SIMD)
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "sqllm/csr.hpp"
#include "sqllm/detail/lut_matmul_avx512.hpp"
#include "sqllm/packing.hpp"

namespace sqllm {
namespace detail {
namespace avx512 {

/// Whether the word-aligned kernel applies: row grouping, BITS in {1, 2, 4}.
template <int BITS, bool ROW>
constexpr bool dword_kernel_applies() {
  return ROW && (BITS == 1 || BITS == 2 || BITS == 4);
}

/// Codes per 64-byte block.
template <int BITS>
constexpr std::size_t dword_block() {
  return 16 * (32 / BITS);
}

/// xq[0 .. (in/B)*B) from x (B = dword_block<BITS>()), see the file comment.
template <int BITS>
void permute_x(const float* x, std::size_t in, float* xq) {
  constexpr std::size_t C = 32 / BITS, B = dword_block<BITS>();
  for (std::size_t b0 = 0; b0 + B <= in; b0 += B)
    for (std::size_t k = 0; k < C; ++k)
      for (std::size_t j = 0; j < 16; ++j) xq[b0 + 16 * k + j] = x[b0 + C * j + k];
}

/// Output rows [o0, o1) at batch 1: y[o] = sum_i x[i] Ŵ[o, i] (+ CSR).
template <int BITS>
SQLLM_TARGET_AVX512 void rows_dword(const float* x, const float* xq, std::size_t in,
                                    const std::uint32_t* codes, const float* tables,
                                    const CsrView* csr, float* y, std::size_t o0,
                                    std::size_t o1) {
  static_assert(BITS == 1 || BITS == 2 || BITS == 4, "word-aligned codes: 1, 2 or 4 bits");
  constexpr std::size_t K = std::size_t{1} << BITS, C = 32 / BITS, B = dword_block<BITS>();
  static const Decode16<BITS> dec;
  const __m512i ctrl = _mm512_load_si512(dec.ctrl);
  const std::size_t words = packed_words(in, BITS), row_bytes = words * 4;
  const std::size_t blocks = in / B, groups = in / 16;
  // 16-code groups after the blocks whose 8-byte load stays inside the row.
  std::size_t safe = 0;
  if (row_bytes >= 8) safe = std::min(groups, (row_bytes - 8) / (2 * BITS) + 1);
  const __m512i unused = _mm512_setzero_si512();
  for (std::size_t o = o0; o < o1; ++o) {
    const std::uint32_t* row = codes + o * words;
    alignas(64) float lut[16];
    for (std::size_t k = 0; k < 16; ++k) lut[k] = tables[o * K + k % K];  // period 2^BITS
    const __m512 tab = _mm512_load_ps(lut);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (std::size_t b = 0; b < blocks; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(row + b * 16) + 256, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(row + b * 16);
      const float* xb = xq + b * B;
      SQLLM_UNROLL
      for (std::size_t k = 0; k < C; ++k) {
        // (The all-ones masked form: see hsum in lut_matmul_avx512.hpp.)
        const __m512i idx =
            k == 0 ? v : _mm512_maskz_srli_epi32(0xFFFF, v, static_cast<unsigned>(BITS * k));
        acc[k % 4] = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(0xFFFF, idx, tab),
                                     _mm512_loadu_ps(xb + 16 * k), acc[k % 4]);
      }
    }
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(row);
    const unsigned char* const rowp[1] = {bytes};
    for (std::size_t g = blocks * B / 16; g < groups; ++g)
      group<BITS, true, 1, 1>(acc, rowp, row_bytes, ctrl, &tab, unused, unused, tables, x, g,
                              g >= safe);
    float s = hsum(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    for (std::size_t i = groups * 16; i < in; ++i) s += tables[o * K + get_code(row, i, BITS)] * x[i];
    if (csr != nullptr) {
      for (std::int32_t k = csr->row_ptr[o]; k < csr->row_ptr[o + 1]; ++k)
        s += half_bits_to_float(csr->values[k]) * x[csr->col_idx[k]];
    }
    y[o] = s;
  }
}

}  // namespace avx512
}  // namespace detail
}  // namespace sqllm

#endif  // SQLLM_X86_SIMD
