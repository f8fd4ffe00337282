// sqllm/detail/binary_matmul_simd.hpp -- the x86 AVX2 and AVX-512 paths of
// the PTQ1.61 matmul (binary_matmul.hpp; not public API).
//
// The binary part uses the sign bits as selections: with P[o] = sum of the
// r2-scaled binarised inputs x'_j whose sign bit is set,
//
//   sum_j s[o, j] x'_j = 2 P[o] - S,      S = sum_j x'_j,
//   y_bin[o] = r1[o] (alpha[o] (2P - S) + mu[o] S) = c1[o] P + c0[o] S,
//   c1 = 2 r1 alpha,  c0 = r1 (mu - alpha).
//
// * batches below kPtq161TableBatch: P by masked adds -- AVX-512: 16 sign
//   bits are one mask register, one masked add per 16 inputs; AVX2: a byte
//   of signs is spread into a lane mask (broadcast, and, compare), one
//   and + add per 8 inputs;
// * larger batches, in tiles of 8 rows: per group of 8 binarised inputs a
//   256-entry table of 8-lane vectors (entry v = sum of the tile's inputs
//   selected by the bits of v, one add per entry), built once per tile and
//   reused by every output row, so a byte of signs is one 8-lane lookup;
//   the tables are built and used 32 groups at a time (256 KiB) so they stay
//   in L2.
//
// The salient part (the uniform codes over the gathered salient channels):
// per output row the codes are decoded to floats once (4-bit codes by
// nibble unpacking, other widths by decode32) and dotted with each batch
// row's gathered salient inputs; per group, s (dot - z * sum x).
//
// Every output is summed by one thread in a fixed order: the result does
// not depend on the thread count.
#pragma once

// included by binary_matmul.hpp after Ptq161View
#include "sqllm/cpu_features.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sqllm/half.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/quant/uniform.hpp"

#if defined(SQLLM_X86_SIMD)
#include <immintrin.h>
#endif

namespace sqllm {
namespace detail {

/// Batches of at least this many rows take the table path.
constexpr std::size_t kPtq161TableBatch = 4;
/// Groups of 8 binarised inputs whose tables are built and used together.
constexpr std::size_t kPtq161TableChunk = 32;

/// What one call prepares for every path: gathered, scaled inputs and the
/// per-row coefficients.  Padding entries are zero.
struct Ptq161Prep {
  std::size_t batch = 0, out = 0;
  std::size_t n_bin = 0, n_sal = 0;
  std::size_t sb = 0;    ///< sign bytes per row
  std::size_t nbp = 0;   ///< xb row stride: n_bin padded to a multiple of 16 (>= 8 * sb)
  std::size_t nsp = 0;   ///< xs row stride: n_sal padded to a multiple of 32
  std::size_t sgroups = 0, gsize = 0;  ///< salient groups and their size (per-row grid: nsp)
  std::vector<float> xb;    ///< batch x nbp: r2[j] * x[bin[j]]
  std::vector<float> S;     ///< batch: sum of xb row
  std::vector<float> xs;    ///< batch (rounded up to 8) x nsp: x[sal[k]]
  std::vector<float> gsum;  ///< batch (rounded up to 8) x sgroups: sum of xs over each group
  std::vector<float> c1, c0;  ///< out
  std::vector<float> ssc, sscz;  ///< out x sgroups: salient scale s and s * z
  std::vector<float> szf;        ///< out x sgroups: salient zero z
  /// 4-bit salient codes on the AVX-512 path: each run of 32 codes is decoded to the
  /// dequantized weights s (q - z) by a 16-entry register table (vpermps), even codes
  /// first, then odd ones; xs is stored in that order (xs[32c + i] = x of code 32c + 2i,
  /// xs[32c + 16 + i] = x of code 32c + 2i + 1) and no group correction is needed.
  bool deq = false;
};

/// Decode the salient codes of row o (n of them, BITS wide) into q[0..nsp), nsp = n rounded
/// up to 32; the entries past n are zero (the stream's tail bits are zero).
template <int BITS>
inline void ptq161_decode_row_generic(const std::uint32_t* row, std::size_t n, std::size_t nsp,
                                      float* q) {
  const std::size_t words = packed_words(n, BITS);
  std::size_t c = 0;
  for (; (c + 1) * BITS <= words; ++c) decode32<BITS>(row, c, q + 32 * c);
  if (32 * c < nsp) {  // the last, partial run of 32 codes: from a zero-padded copy
    std::uint32_t tail[BITS] = {};
    for (std::size_t w = c * BITS; w < words; ++w) tail[w - c * BITS] = row[w];
    decode32<BITS>(tail, 0, q + 32 * c);
  }
}

inline void ptq161_decode_row_any(const UniformView& s, std::size_t o, std::size_t nsp, float* q) {
  const std::uint32_t* row = s.qweight + o * packed_words(s.in, s.bits);
  switch (s.bits) {
    case 2: ptq161_decode_row_generic<2>(row, s.in, nsp, q); break;
    case 3: ptq161_decode_row_generic<3>(row, s.in, nsp, q); break;
    case 4: ptq161_decode_row_generic<4>(row, s.in, nsp, q); break;
    case 5: ptq161_decode_row_generic<5>(row, s.in, nsp, q); break;
    case 6: ptq161_decode_row_generic<6>(row, s.in, nsp, q); break;
    case 7: ptq161_decode_row_generic<7>(row, s.in, nsp, q); break;
    default: ptq161_decode_row_generic<8>(row, s.in, nsp, q); break;
  }
}

#if defined(SQLLM_X86_SIMD)
// GCC 12 reports the intrinsics' own "undefined" placeholders (`__m512 __Y = __Y;`
// in avx512fintrin.h) as uninitialised when they are inlined here: false positives.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace ptq161_x86 {

/// fp16 bits -> float (exact), 8 at a time with F16C.
__attribute__((target("avx2,f16c"))) inline void halves_to_floats_f16c(const std::uint16_t* h,
                                                                         std::size_t n, float* f) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) f[i] = half_bits_to_float(h[i]);
}

// ---- shared helpers ---------------------------------------------------------------

SQLLM_TARGET_AVX2 inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

/// Run c (32 codes) of a 4-bit row as bytes; the last run may be partial: a masked load
/// (words past the row are neither read nor faulted on, and read as zero).
SQLLM_TARGET_AVX2 inline __m128i load_run4(const std::uint32_t* row, std::size_t words, std::size_t c) {
  if ((c + 1) * 4 <= words) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 4 * c));
  const int n = static_cast<int>(words - 4 * c);  // 1..3
  const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3));
  return _mm_maskload_epi32(reinterpret_cast<const int*>(row + 4 * c), m);
}

/// 4-bit codes of row o into q (32 at a time by nibble unpacking), zero padded to nsp.
SQLLM_TARGET_AVX2 inline void decode_row4(const UniformView& s, std::size_t o, std::size_t nsp,
                                          float* q) {
  const std::size_t words = packed_words(s.in, 4);
  const std::uint32_t* row = s.qweight + o * words;
  const __m128i low = _mm_set1_epi8(0x0F);
  const std::size_t runs = nsp / 32;  // the last run may be partial: decoded from a zero-padded copy
  for (std::size_t c = 0; c < runs; ++c) {
    const __m128i v = load_run4(row, words, c);
    const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
    const __m128i a = _mm_unpacklo_epi8(lo, hi), b = _mm_unpackhi_epi8(lo, hi);  // codes 0..15, 16..31
    float* d = q + 32 * c;
    _mm256_storeu_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a)));
    _mm256_storeu_ps(d + 8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8))));
    _mm256_storeu_ps(d + 16, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)));
    _mm256_storeu_ps(d + 24, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))));
  }
}

SQLLM_TARGET_AVX2 inline void decode_row(const UniformView& s, std::size_t o, std::size_t nsp, float* q) {
  if (s.bits == 4)
    decode_row4(s, o, nsp, q);
  else
    ptq161_decode_row_any(s, o, nsp, q);
}

/// The 16 dequantized values s (k - z), k = 0..15, of row o's group g.
SQLLM_TARGET_AVX512 inline __m512 deq_table(const Ptq161Prep& p, std::size_t o, std::size_t g) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_mul_ps(_mm512_set1_ps(p.ssc[o * p.sgroups + g]),
                       _mm512_sub_ps(iota, _mm512_set1_ps(p.szf[o * p.sgroups + g])));
}

/// decode_row for the AVX-512 paths.  p.deq: the dequantized weights of row o in the
/// even/odd order of Ptq161Prep::deq; otherwise the codes (16 per store, so the zmm
/// loads of q that follow are forwarded from single stores).
SQLLM_TARGET_AVX512 inline void decode_row_512(const Ptq161Prep& p, const UniformView& s, std::size_t o,
                                               float* q) {
  const std::size_t nsp = p.nsp;
  if (s.bits != 4) return ptq161_decode_row_any(s, o, nsp, q);
  const std::size_t words = packed_words(s.in, 4);
  const std::uint32_t* row = s.qweight + o * words;
  const std::size_t runs = nsp / 32;
  if (p.deq) {
    std::size_t g = 0;
    __m512 tbl = deq_table(p, o, 0);
    for (std::size_t c = 0; c < runs; ++c) {
      if ((32 * c) / p.gsize != g) tbl = deq_table(p, o, g = (32 * c) / p.gsize);
      const __m512i dw = _mm512_cvtepu8_epi32(load_run4(row, words, c));
      _mm512_storeu_ps(q + 32 * c, _mm512_permutexvar_ps(dw, tbl));
      _mm512_storeu_ps(q + 32 * c + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(dw, 4), tbl));
    }
    return;
  }
  const __m128i low = _mm_set1_epi8(0x0F);
  for (std::size_t c = 0; c < runs; ++c) {
    const __m128i v = load_run4(row, words, c);
    const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
    _mm512_storeu_ps(q + 32 * c, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi))));
    _mm512_storeu_ps(q + 32 * c + 16, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi))));
  }
}

/// Lane b of the result = the sum of the 8 lanes of a[b].
SQLLM_TARGET_AVX2 inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

SQLLM_TARGET_AVX2 inline __m256i byte_mask(unsigned byte, __m256i sel) {
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), sel), sel);
}

// ---- small batches: masked adds, one reduction per output -------------------------

/// Rows [o0, o1) for the NB batch rows at b0 (AVX2: a byte of signs -> a lane mask).
template <int NB>
SQLLM_TARGET_AVX2 void small_rows_avx2(const Ptq161Prep& p, const Ptq161View& v, std::size_t b0,
                                       std::size_t o0, std::size_t o1, float* q, float* y) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const float* xb = p.xb.data() + b0 * p.nbp;
  for (std::size_t o = o0; o < o1; ++o) {
    __m256 acc[NB][2];
    for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    if (p.n_bin > 0) {
      const std::uint8_t* sg = v.signs + o * p.sb;
      std::size_t i = 0;
      for (; i + 2 <= p.sb; i += 2) {
        const __m256 m0 = _mm256_castsi256_ps(byte_mask(sg[i], sel));
        const __m256 m1 = _mm256_castsi256_ps(byte_mask(sg[i + 1], sel));
        for (int b = 0; b < NB; ++b) {
          const float* xr = xb + b * p.nbp + 8 * i;
          acc[b][0] = _mm256_add_ps(acc[b][0], _mm256_and_ps(m0, _mm256_loadu_ps(xr)));
          acc[b][1] = _mm256_add_ps(acc[b][1], _mm256_and_ps(m1, _mm256_loadu_ps(xr + 8)));
        }
      }
      if (i < p.sb) {
        const __m256 m0 = _mm256_castsi256_ps(byte_mask(sg[i], sel));
        for (int b = 0; b < NB; ++b)
          acc[b][0] = _mm256_add_ps(acc[b][0], _mm256_and_ps(m0, _mm256_loadu_ps(xb + b * p.nbp + 8 * i)));
      }
    }
    __m256 tot[NB];
    float corr[NB];
    const __m256 c1 = _mm256_set1_ps(p.c1[o]);
    for (int b = 0; b < NB; ++b) {
      tot[b] = _mm256_mul_ps(c1, _mm256_add_ps(acc[b][0], acc[b][1]));
      corr[b] = p.c0[o] * p.S[b0 + b];
    }
    if (p.n_sal > 0) {
      decode_row(v.sal, o, p.nsp, q);
      for (std::size_t g = 0; g < p.sgroups; ++g) {
        const std::size_t k0 = g * p.gsize, k1 = std::min(p.nsp, k0 + p.gsize);
        __m256 d[NB];
        for (int b = 0; b < NB; ++b) d[b] = _mm256_setzero_ps();
        for (std::size_t k = k0; k < k1; k += 8) {
          const __m256 qv = _mm256_loadu_ps(q + k);
          for (int b = 0; b < NB; ++b)
            d[b] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(p.xs.data() + (b0 + b) * p.nsp + k), d[b]);
        }
        const __m256 sc = _mm256_set1_ps(p.ssc[o * p.sgroups + g]);
        const float scz = p.sscz[o * p.sgroups + g];
        for (int b = 0; b < NB; ++b) {
          tot[b] = _mm256_fmadd_ps(sc, d[b], tot[b]);
          corr[b] -= scz * p.gsum[(b0 + b) * p.sgroups + g];
        }
      }
    }
    for (int b = 0; b < NB; ++b) y[(b0 + b) * p.out + o] = hsum256(tot[b]) + corr[b];
  }
}

/// Rows [o0, o1) for the NB batch rows at b0 (AVX-512: 16 sign bits are one mask register).
/// R rows at a time (R * NB * 2 independent accumulators hide the add latency).
template <int NB>
SQLLM_TARGET_AVX512 void small_rows_avx512(const Ptq161Prep& p, const Ptq161View& v, std::size_t b0,
                                           std::size_t o0, std::size_t o1, float* q, float* y) {
  constexpr int R = NB == 1 ? 4 : NB == 2 ? 2 : 1;
  const float* xb = p.xb.data() + b0 * p.nbp;
  const std::size_t full = p.sb / 2, chunks = (p.sb + 1) / 2;
  for (std::size_t oR = o0; oR < o1; oR += R) {
    const int nr = static_cast<int>(std::min<std::size_t>(R, o1 - oR));
    __m512 acc[R][NB][2];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b][0] = acc[r][b][1] = _mm512_setzero_ps();
    if (p.n_bin > 0) {
      const std::uint8_t* sg[R];
      for (int r = 0; r < R; ++r) sg[r] = v.signs + (oR + static_cast<std::size_t>(r < nr ? r : 0)) * p.sb;
      std::size_t c = 0;
      for (; c + 2 <= full; c += 2) {
        __m512 x0[NB], x1[NB];
        for (int b = 0; b < NB; ++b) {
          x0[b] = _mm512_loadu_ps(xb + b * p.nbp + 16 * c);
          x1[b] = _mm512_loadu_ps(xb + b * p.nbp + 16 * c + 16);
        }
        for (int r = 0; r < R; ++r) {
          std::uint16_t k0, k1;
          std::memcpy(&k0, sg[r] + 2 * c, 2);
          std::memcpy(&k1, sg[r] + 2 * c + 2, 2);
          for (int b = 0; b < NB; ++b) {
            acc[r][b][0] = _mm512_mask_add_ps(acc[r][b][0], static_cast<__mmask16>(k0), acc[r][b][0], x0[b]);
            acc[r][b][1] = _mm512_mask_add_ps(acc[r][b][1], static_cast<__mmask16>(k1), acc[r][b][1], x1[b]);
          }
        }
      }
      for (; c < chunks; ++c) {
        for (int r = 0; r < R; ++r) {
          std::uint16_t k = sg[r][2 * c];
          if (2 * c + 1 < p.sb) k = static_cast<std::uint16_t>(k | (sg[r][2 * c + 1] << 8));
          for (int b = 0; b < NB; ++b)
            acc[r][b][0] = _mm512_mask_add_ps(acc[r][b][0], static_cast<__mmask16>(k), acc[r][b][0],
                                              _mm512_loadu_ps(xb + b * p.nbp + 16 * c));
        }
      }
    }
    for (int r = 0; r < nr; ++r) {
      const std::size_t o = oR + static_cast<std::size_t>(r);
      __m512 tot[NB];
      float corr[NB];
      const __m512 c1 = _mm512_set1_ps(p.c1[o]);
      for (int b = 0; b < NB; ++b) {
        tot[b] = _mm512_mul_ps(c1, _mm512_add_ps(acc[r][b][0], acc[r][b][1]));
        corr[b] = p.c0[o] * p.S[b0 + b];
      }
      if (p.n_sal > 0 && p.deq) {
        // fused: each run of 32 codes -> 2 x 16 dequantized weights by the group's table, FMA
        const std::size_t words = packed_words(v.sal.in, 4);
        const std::uint32_t* row = v.sal.qweight + o * words;
        __m512 d[NB][2];
        for (int b = 0; b < NB; ++b) d[b][0] = d[b][1] = _mm512_setzero_ps();
        std::size_t g = 0;
        __m512 tbl = deq_table(p, o, 0);
        for (std::size_t c = 0; c < p.nsp / 32; ++c) {
          if ((32 * c) / p.gsize != g) tbl = deq_table(p, o, g = (32 * c) / p.gsize);
          const __m512i dw = _mm512_cvtepu8_epi32(load_run4(row, words, c));
          const __m512 q0 = _mm512_permutexvar_ps(dw, tbl);
          const __m512 q1 = _mm512_permutexvar_ps(_mm512_srli_epi32(dw, 4), tbl);
          for (int b = 0; b < NB; ++b) {
            const float* xr = p.xs.data() + (b0 + b) * p.nsp + 32 * c;
            d[b][0] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(xr), d[b][0]);
            d[b][1] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xr + 16), d[b][1]);
          }
        }
        for (int b = 0; b < NB; ++b) tot[b] = _mm512_add_ps(tot[b], _mm512_add_ps(d[b][0], d[b][1]));
      } else if (p.n_sal > 0) {
        decode_row_512(p, v.sal, o, q);
        for (std::size_t g = 0; g < p.sgroups; ++g) {
          const std::size_t k0 = g * p.gsize, k1 = std::min(p.nsp, k0 + p.gsize);
          __m512 d[NB][2];
          for (int b = 0; b < NB; ++b) d[b][0] = d[b][1] = _mm512_setzero_ps();
          for (std::size_t k = k0; k < k1; k += 32) {
            const __m512 q0 = _mm512_loadu_ps(q + k), q1 = _mm512_loadu_ps(q + k + 16);
            for (int b = 0; b < NB; ++b) {
              const float* xr = p.xs.data() + (b0 + b) * p.nsp + k;
              d[b][0] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(xr), d[b][0]);
              d[b][1] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xr + 16), d[b][1]);
            }
          }
          const __m512 sc = _mm512_set1_ps(p.ssc[o * p.sgroups + g]);
          const float scz = p.sscz[o * p.sgroups + g];
          for (int b = 0; b < NB; ++b) {
            tot[b] = _mm512_fmadd_ps(sc, _mm512_add_ps(d[b][0], d[b][1]), tot[b]);
            corr[b] -= scz * p.gsum[(b0 + b) * p.sgroups + g];
          }
        }
      }
      for (int b = 0; b < NB; ++b) y[(b0 + b) * p.out + o] = _mm512_reduce_add_ps(tot[b]) + corr[b];
    }
  }
}

// ---- larger batches: per-8 tables over tiles of 8 batch rows ------------------------

/// Tables of groups [g0, g1) from the transposed tile xT (xT[j * 8 + b]).
SQLLM_TARGET_AVX2 inline void build_tables(const float* xT, std::size_t g0, std::size_t g1, float* T) {
  for (std::size_t g = g0; g < g1; ++g) {
    float* Tg = T + (g - g0) * 256 * 8;
    _mm256_storeu_ps(Tg, _mm256_setzero_ps());
    for (unsigned k = 0; k < 8; ++k) {
      const __m256 xk = _mm256_loadu_ps(xT + (g * 8 + k) * 8);
      const unsigned n = 1u << k;
      for (unsigned val = 0; val < n; ++val)
        _mm256_storeu_ps(Tg + (n + val) * 8, _mm256_add_ps(_mm256_loadu_ps(Tg + val * 8), xk));
    }
  }
}

/// acc[o * 8 + b] (+)= the lookups of groups [g0, g1) for rows [o0, o1).
SQLLM_TARGET_AVX2 inline void lookup_rows(const Ptq161Prep& p, const Ptq161View& v, const float* T,
                                          std::size_t g0, std::size_t g1, std::size_t o0,
                                          std::size_t o1, float* acc) {
  for (std::size_t o = o0; o < o1; ++o) {
    const std::uint8_t* sg = v.signs + o * p.sb;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    std::size_t g = g0;
    for (; g + 2 <= g1; g += 2) {
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(T + ((g - g0) * 256 + sg[g]) * 8));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(T + ((g + 1 - g0) * 256 + sg[g + 1]) * 8));
    }
    if (g < g1) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(T + ((g - g0) * 256 + sg[g]) * 8));
    a0 = _mm256_add_ps(a0, a1);
    float* d = acc + o * 8;
    _mm256_storeu_ps(d, g0 == 0 ? a0 : _mm256_add_ps(_mm256_loadu_ps(d), a0));
  }
}

/// Lane b: sum over k in [k0, k1) of q[k] * xs[b * nsp + k] (8 batch rows; k1 - k0 a multiple of 16).
SQLLM_TARGET_AVX2 inline __m256 dots8_avx2(const float* q, const float* xs, std::size_t nsp,
                                           std::size_t k0, std::size_t k1) {
  __m256 d[8];
  for (int b = 0; b < 8; ++b) d[b] = _mm256_setzero_ps();
  for (std::size_t k = k0; k < k1; k += 8) {
    const __m256 qv = _mm256_loadu_ps(q + k);
    for (int b = 0; b < 8; ++b) d[b] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(xs + b * nsp + k), d[b]);
  }
  return hsum8x8(d);
}

SQLLM_TARGET_AVX512 inline __m256 dots8_avx512(const float* q, const float* xs, std::size_t nsp,
                                               std::size_t k0, std::size_t k1) {
  __m512 d[8];
  for (int b = 0; b < 8; ++b) d[b] = _mm512_setzero_ps();
  for (std::size_t k = k0; k < k1; k += 16) {
    const __m512 qv = _mm512_loadu_ps(q + k);
    for (int b = 0; b < 8; ++b) d[b] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(xs + b * nsp + k), d[b]);
  }
  __m256 h[8];
  for (int b = 0; b < 8; ++b)
    h[b] = _mm256_add_ps(_mm512_castps512_ps256(d[b]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d[b]), 1)));
  return hsum8x8(h);
}

/// Rows [o0, o1) of the tile's nb batch rows at b0: y from acc (P, 8 per row) and the
/// salient part (xs rows of the tile: 8, zero past the batch).  ST / gsT: S and the
/// group sums of the tile's rows, transposed (ST[b], gsT[g * 8 + b]).
template <bool AVX512>
SQLLM_TARGET_AVX2 void finish_rows_x86(const Ptq161Prep& p, const Ptq161View& v, const float* acc,
                                         const float* ST, const float* gsT, std::size_t b0,
                                         std::size_t nb, std::size_t o0, std::size_t o1, float* q,
                                         float* y) {
  const __m256 Sv = _mm256_loadu_ps(ST);
  for (std::size_t o = o0; o < o1; ++o) {
    const __m256 P = p.n_bin > 0 ? _mm256_loadu_ps(acc + o * 8) : _mm256_setzero_ps();
    __m256 tot = _mm256_fmadd_ps(_mm256_set1_ps(p.c1[o]), P, _mm256_mul_ps(_mm256_set1_ps(p.c0[o]), Sv));
    if (p.n_sal > 0 && p.deq) {
      decode_row_512(p, v.sal, o, q);
      tot = _mm256_add_ps(tot, dots8_avx512(q, p.xs.data() + b0 * p.nsp, p.nsp, 0, p.nsp));
    } else if (p.n_sal > 0) {
      if (AVX512)
        decode_row_512(p, v.sal, o, q);
      else
        decode_row(v.sal, o, p.nsp, q);
      const float* xs = p.xs.data() + b0 * p.nsp;
      for (std::size_t g = 0; g < p.sgroups; ++g) {
        const std::size_t k0 = g * p.gsize, k1 = std::min(p.nsp, k0 + p.gsize);
        const __m256 dots = AVX512 ? dots8_avx512(q, xs, p.nsp, k0, k1) : dots8_avx2(q, xs, p.nsp, k0, k1);
        const float sc = p.ssc[o * p.sgroups + g], scz = p.sscz[o * p.sgroups + g];
        tot = _mm256_fmadd_ps(_mm256_set1_ps(sc), dots, tot);
        tot = _mm256_fnmadd_ps(_mm256_set1_ps(scz), _mm256_loadu_ps(gsT + g * 8), tot);
      }
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, tot);
    for (std::size_t b = 0; b < nb; ++b) y[(b0 + b) * p.out + o] = t[b];
  }
}

/// Transpose the tile's binarised inputs: xT[j * 8 + b], rows past nb zero.
inline void transpose_tile(const Ptq161Prep& p, std::size_t b0, std::size_t nb, float* xT) {
  const std::size_t n8 = p.sb * 8;
  std::fill(xT, xT + n8 * 8, 0.0f);
  for (std::size_t b = 0; b < nb; ++b) {
    const float* xr = p.xb.data() + (b0 + b) * p.nbp;
    for (std::size_t j = 0; j < n8; ++j) xT[j * 8 + b] = xr[j];
  }
}

}  // namespace ptq161_x86
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // SQLLM_X86_SIMD

}  // namespace detail
}  // namespace sqllm
