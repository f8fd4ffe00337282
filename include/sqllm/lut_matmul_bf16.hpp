// sqllm/lut_matmul_bf16.hpp -- the CPU LUT matmul for bf16 activations.
//
// y = x · Ŵᵀ (+ sparse) with x in bfloat16 (uint16 bit patterns) and y fp32,
// row grouping, 2..4-bit codes.  The products are formed the way torch's int4
// weight-only CPU kernel forms them: bf16 × bf16, accumulated in fp32 (the
// AVX512-BF16 dot product vdpbf16ps: 32 multiply-adds an instruction, twice
// as many as an fp32 FMA).  That needs the table values in bf16: each row's
// 2^bits entries are rounded to bf16 (nearest, ties to even) once per call.
// So this path computes Σ_i bf16(T_o[c_oi]) · x_i, not Σ_i T_o[c_oi] · x_i:
// a relative change of at most 2^-8 per weight (bf16 keeps 8 significant
// bits), the same size as the rounding of x itself to bf16 and of y back to
// bf16.  The sparse part is added in fp32 with exact fp32 products of its fp16
// values and x.  Callers that need the fp32 path's numbers convert x to fp32
// and call lut_matmul (lut_matmul.hpp) instead.  QuantLinear takes this path
// for every bf16 input when the CPU has it (one arithmetic for prefill and
// decode), and the fp32 path otherwise.
//
// Decode of 32 codes (4·BITS bytes at byte 4·BITS·g of the row's LSB-first
// stream): one byte permute (vpermb) gives output qword q the 8 bytes that
// hold codes 4q..4q+3, one vpmultishiftqb moves code 4q+j to the low bits of
// word j of that qword, and one vpermw looks the 32 words up in the row's
// table (2^bits bf16 entries repeated to 32, so the bits above the code, which
// belong to the next codes, do not matter).  Each batch row then costs one
// vdpbf16ps per 32 weights; two output rows share every x load.
//
// vdpbf16ps treats bf16 denormals (|x| < 2^-126) as zero and flushes denormal
// results: irrelevant for activations and weights of a network, and stated
// here because a float64 reference would keep them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "sqllm/config.hpp"
#include "sqllm/cpu_features.hpp"
#include "sqllm/error.hpp"
#include "sqllm/format/lut.hpp"
#include "sqllm/half.hpp"
#include "sqllm/packing.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(SQLLM_X86_SIMD)
#include <immintrin.h>
#endif

namespace sqllm {

/// fp32 -> bf16 bits, round to nearest, ties to even (NaN kept a quiet NaN).
inline std::uint16_t float_to_bf16_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu) != 0)
    return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

inline float bf16_bits_to_float(std::uint16_t h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

/// Whether this CPU (and build) has the bf16 path: AVX-512 F/BW/VL/VBMI and
/// AVX512-BF16 (Zen 4, Sapphire Rapids, Cooper Lake and later).  Respects
/// SQLLM_CPU_KERNEL: a forced scalar or avx2 kernel turns it off.
inline bool cpu_supports_bf16_matmul() {
#if defined(SQLLM_X86_SIMD)
  static const bool has = [] {  // SQLLM_CPU_KERNEL read once, as resolve_cpu_kernel does
    if (!cpu_supports(CpuKernel::Avx512) || !__builtin_cpu_supports("avx512bf16")) return false;
    const char* e = std::getenv("SQLLM_CPU_KERNEL");
    if (e == nullptr) return true;
    const CpuKernel k = parse_cpu_kernel(e);
    return k == CpuKernel::Auto || k == CpuKernel::Avx512;
  }();
  return has;
#else
  return false;
#endif
}

/// Whether a layer's view can take the bf16 path (the format side only).
inline bool lut_bf16_applies(const LutView& v) {
  return v.axis == GroupAxis::Row && v.bits >= 2 && v.bits <= 4;
}

#if defined(SQLLM_X86_SIMD)
#define SQLLM_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,avx2,fma")))

namespace detail {
namespace bf16 {

/// Byte-permute indices and multishift controls for 32 BITS-bit codes.
template <int BITS>
struct Decode32 {
  alignas(64) std::uint8_t perm[64];
  alignas(64) std::uint8_t shift[64];
  Decode32() {
    for (int q = 0; q < 8; ++q) {
      const int bit0 = BITS * 4 * q, sb = bit0 / 8, off = bit0 - 8 * sb;
      for (int k = 0; k < 8; ++k) {
        // bytes past the 16 loaded ones read the zeroed upper lanes
        perm[8 * q + k] = static_cast<std::uint8_t>(std::min(sb + k, 63));
      }
      for (int j = 0; j < 4; ++j) {
        shift[8 * q + 2 * j] = static_cast<std::uint8_t>(off + BITS * j);
        shift[8 * q + 2 * j + 1] = static_cast<std::uint8_t>(off + BITS * j);
      }
    }
  }
};

SQLLM_TARGET_AVX512BF16 inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/// Group g (32 codes) of R rows into acc[r * NB + b]; `masked`: the 16-byte
/// load may pass the row's end (row_bytes), so it is masked.
template <int BITS, int NB, int R>
SQLLM_TARGET_AVX512BF16 __attribute__((always_inline)) inline void group32(
    __m512* acc, const unsigned char* const* bytes, std::size_t row_bytes, __m512i perm,
    __m512i shift, const __m512i* tab, const std::uint16_t* const* xb, std::size_t g, bool masked) {
  const std::size_t off = g * 4 * BITS;
  __m512i w[R];
  SQLLM_UNROLL
  for (int r = 0; r < R; ++r) {
    const __m128i raw =
        masked ? _mm_maskz_loadu_epi8(
                     static_cast<__mmask16>((1u << std::min<std::size_t>(16, row_bytes - off)) - 1u),
                     bytes[r] + off)
               : _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes[r] + off));
    const __m512i sel = _mm512_permutexvar_epi8(perm, _mm512_zextsi128_si512(raw));
    const __m512i idx = _mm512_multishift_epi64_epi8(shift, sel);
    w[r] = _mm512_permutexvar_epi16(idx, tab[r]);
  }
  SQLLM_UNROLL
  for (int b = 0; b < NB; ++b) {
    const __m512i xv = _mm512_loadu_si512(xb[b] + g * 32);
    SQLLM_UNROLL
    for (int r = 0; r < R; ++r)
      acc[r * NB + b] = _mm512_dpbf16_ps(acc[r * NB + b], (__m512bh)w[r], (__m512bh)xv);
  }
}

/// R output rows [o, o+R), batch rows [b0, b0+NB).
template <int BITS, int NB, int R>
SQLLM_TARGET_AVX512BF16 void row_kernel(const std::uint16_t* x, std::size_t in, std::size_t out,
                                        const std::uint32_t* codes, const float* tables,
                                        const CsrView* csr, float* y, std::size_t o,
                                        std::size_t b0) {
  constexpr std::size_t K = std::size_t{1} << BITS;
  static const Decode32<BITS> dec;
  const __m512i perm = _mm512_load_si512(dec.perm);
  const __m512i shift = _mm512_load_si512(dec.shift);
  const std::size_t words = packed_words(in, BITS);
  const std::size_t row_bytes = words * 4;
  const std::size_t groups = in / 32;
  constexpr std::size_t GB = 4 * BITS;  // bytes per 32 codes
  // Groups whose 16-byte load stays inside the row; the rest load masked.
  std::size_t safe = 0;
  if (row_bytes >= 16) safe = std::min(groups, (row_bytes - 16) / GB + 1);

  const unsigned char* bytes[R];
  __m512i tab[R];
  for (int r = 0; r < R; ++r) {
    bytes[r] = reinterpret_cast<const unsigned char*>(codes + (o + r) * words);
    alignas(64) std::uint16_t t[32];
    for (std::size_t k = 0; k < 32; ++k) t[k] = float_to_bf16_bits(tables[(o + r) * K + k % K]);
    tab[r] = _mm512_load_si512(t);
  }
  const std::uint16_t* xb[NB];
  for (int b = 0; b < NB; ++b) xb[b] = x + (b0 + b) * in;

  constexpr int CH = R * NB >= 4 ? 1 : 4 / (R * NB);  // chains that hide the latency
  __m512 acc[CH * R * NB];
  SQLLM_UNROLL
  for (int a = 0; a < CH * R * NB; ++a) acc[a] = _mm512_setzero_ps();

  std::size_t g = 0;
  const std::size_t safe_main = safe - safe % CH;
  for (; g < safe_main; g += CH)
    SQLLM_UNROLL
    for (int c = 0; c < CH; ++c)
      group32<BITS, NB, R>(acc + c * R * NB, bytes, row_bytes, perm, shift, tab, xb, g + c, false);
  for (; g < safe; ++g) group32<BITS, NB, R>(acc, bytes, row_bytes, perm, shift, tab, xb, g, false);
  for (; g < groups; ++g) group32<BITS, NB, R>(acc, bytes, row_bytes, perm, shift, tab, xb, g, true);
  SQLLM_UNROLL
  for (int c = 1; c < CH; ++c)
    SQLLM_UNROLL
    for (int a = 0; a < R * NB; ++a) acc[a] = _mm512_add_ps(acc[a], acc[c * R * NB + a]);

  for (int r = 0; r < R; ++r) {
    const std::size_t orow = o + r;
    const std::uint32_t* row = codes + orow * words;
    float s[NB];
    for (int b = 0; b < NB; ++b) s[b] = hsum(acc[r * NB + b]);
    for (std::size_t i = groups * 32; i < in; ++i) {  // tail: the same products, in fp32
      const float w = bf16_bits_to_float(float_to_bf16_bits(tables[orow * K + get_code(row, i, BITS)]));
      for (int b = 0; b < NB; ++b) s[b] += w * bf16_bits_to_float(xb[b][i]);
    }
    if (csr != nullptr) {
      for (std::int32_t k = csr->row_ptr[orow]; k < csr->row_ptr[orow + 1]; ++k) {
        const float v = half_bits_to_float(csr->values[k]);
        const std::size_t i = static_cast<std::size_t>(csr->col_idx[k]);
        for (int b = 0; b < NB; ++b) s[b] += v * bf16_bits_to_float(xb[b][i]);
      }
    }
    for (int b = 0; b < NB; ++b) y[(b0 + b) * out + orow] = s[b];
  }
}

template <int BITS, int R>
SQLLM_TARGET_AVX512BF16 void rows(const std::uint16_t* x, std::size_t batch, std::size_t in,
                                  std::size_t out, const std::uint32_t* codes, const float* tables,
                                  const CsrView* csr, float* y, std::size_t o) {
  for (std::size_t b0 = 0; b0 < batch; b0 += 8) {
    const std::size_t nb = std::min<std::size_t>(8, batch - b0);
    switch (nb) {
#define SQLLM_BF16_CASE(N) \
  case N: row_kernel<BITS, N, R>(x, in, out, codes, tables, csr, y, o, b0); break;
      SQLLM_BF16_CASE(1) SQLLM_BF16_CASE(2) SQLLM_BF16_CASE(3) SQLLM_BF16_CASE(4)
      SQLLM_BF16_CASE(5) SQLLM_BF16_CASE(6) SQLLM_BF16_CASE(7)
      default: row_kernel<BITS, 8, R>(x, in, out, codes, tables, csr, y, o, b0); break;
#undef SQLLM_BF16_CASE
    }
  }
}

template <int BITS>
void matmul(const LutView& v, const std::uint16_t* x, std::size_t batch, float* y, int num_threads) {
  const CsrView* csr = v.has_sparse() ? &v.sparse : nullptr;
  const std::size_t pairs = v.out / 2;
  const auto n = static_cast<std::ptrdiff_t>(pairs + (v.out % 2));
#if defined(_OPENMP)
  int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (batch * v.in * v.out < (std::size_t{1} << 18)) nt = 1;  // not worth waking threads
#pragma omp parallel for schedule(static, 8) num_threads(nt) if (nt > 1)
#endif
  for (std::ptrdiff_t p = 0; p < n; ++p) {
    const std::size_t o = static_cast<std::size_t>(p) * 2;
    if (o + 1 < v.out)
      rows<BITS, 2>(x, batch, v.in, v.out, v.codes, v.tables, csr, y, o);
    else
      rows<BITS, 1>(x, batch, v.in, v.out, v.codes, v.tables, csr, y, o);
  }
  (void)num_threads;
}

}  // namespace bf16
}  // namespace detail
#endif  // SQLLM_X86_SIMD

/// y (batch x out, fp32) = x (batch x in, bf16 bits) · Ŵᵀ (+ sparse), with
/// the table values rounded to bf16 (see the top of this file).  Throws
/// sqllm::Error when the CPU lacks AVX512-BF16 or the layer is not row-grouped
/// with 2..4-bit codes (callers check cpu_supports_bf16_matmul() and
/// lut_bf16_applies() and otherwise use lut_matmul on fp32 x).
inline void lut_matmul_bf16(const LutView& v, const std::uint16_t* x, std::size_t batch, float* y,
                            int num_threads = 0, bool checked = false) {
  if (!checked) check_lut_view(v);
  SQLLM_CHECK(lut_bf16_applies(v), "lut_matmul_bf16: needs row grouping and 2..4-bit codes, got ",
              v.bits, "-bit ", v.axis == GroupAxis::Row ? "row" : "column", " grouping");
  SQLLM_CHECK(cpu_supports_bf16_matmul(),
              "lut_matmul_bf16: this CPU (or build, or SQLLM_CPU_KERNEL) has no AVX512-BF16 path");
  SQLLM_CHECK((x != nullptr && y != nullptr) || batch == 0, "lut_matmul_bf16: null x or y pointer");
  if (batch == 0) return;
#if defined(SQLLM_X86_SIMD)
  switch (v.bits) {
    case 2: detail::bf16::matmul<2>(v, x, batch, y, num_threads); break;
    case 3: detail::bf16::matmul<3>(v, x, batch, y, num_threads); break;
    default: detail::bf16::matmul<4>(v, x, batch, y, num_threads); break;
  }
#else
  (void)num_threads;
#endif
}

}  // namespace sqllm
