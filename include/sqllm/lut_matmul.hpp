// sqllm/lut_matmul.hpp -- CPU lookup-table matmul straight from packed codes.
//
//   y[b, o] = sum_i x[b, i] * Ŵ[o, i]  (+ the sparse CSR part, same pass)
//
// x is batch x in (row-major fp32), y is batch x out.  Ŵ is never
// materialised: each thread decodes a few rows of codes at a time (32 codes
// per step, packing.hpp's aligned unit) into a small fp32 buffer through the
// row's (or the columns') lookup table and multiplies that block with every
// batch row while it is in cache.  fp32 accumulate; OpenMP over output rows.
//
// Paths (batches below kGemmMinBatch; larger ones decode tiles of Ŵ with the
// same path's row decoder and multiply them with Eigen's GEMM):
//   avx512  1..4 bits: in-register table, vpermps on 16 codes (detail/lut_matmul_avx512.hpp);
//           batch 1 with 1/2/4-bit row grouping: codes taken whole from 32-bit
//           words, one shift + vpermps + FMA per 16 (detail/lut_matmul_avx512_dword.hpp)
//   avx2    1..4 bits: in-register table, vpermps on 8 codes (detail/lut_matmul_avx2.hpp)
//   scalar  every width: decode 32 codes, then a dot product (portable C++)
// chosen at run time from the CPU's features (cpu_features.hpp), or forced.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <vector>

#include <Eigen/Core>

#include "sqllm/cpu_features.hpp"
#include "sqllm/csr.hpp"
#include "sqllm/detail/lut_matmul_avx2.hpp"
#include "sqllm/detail/lut_matmul_avx512.hpp"
#include "sqllm/detail/lut_matmul_avx512_dword.hpp"
#include "sqllm/dispatch.hpp"
#include "sqllm/error.hpp"
#include "sqllm/format/lut.hpp"
#include "sqllm/nuq.hpp"
#include "sqllm/packing.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sqllm {

namespace detail {

/// Decode row `o` of Ŵ into dst[0..in).
template <int BITS, bool ROW>
inline void decode_row(const std::uint32_t* codes, const float* tables, std::size_t in,
                       std::size_t o, float* dst) {
  constexpr std::size_t K = std::size_t{1} << BITS;
  const std::size_t words = packed_words(in, BITS);
  const std::uint32_t* row = codes + o * words;
  const float* lut = tables + o * K;  // used when ROW
  const std::size_t full = in / 32;
  std::uint32_t c[32];
  for (std::size_t blk = 0; blk < full; ++blk) {
    decode32<BITS>(row, blk, c);
    float* d = dst + blk * 32;
    if (ROW) {
      for (int j = 0; j < 32; ++j) d[j] = lut[c[j]];
    } else {
      const float* t = tables + blk * 32 * K;
      for (int j = 0; j < 32; ++j) d[j] = t[j * K + c[j]];
    }
  }
  for (std::size_t i = full * 32; i < in; ++i) {
    const std::uint32_t ci = get_code(row, i, BITS);
    dst[i] = ROW ? lut[ci] : tables[i * K + ci];
  }
}

inline float dot(const float* a, const float* b, std::size_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (std::size_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

/// Below this many multiply-adds (batch * in * out) a call runs on the
/// calling thread alone: a 576x1536 layer at batch 1 takes ~30 us on one
/// core, about what waking a second OpenMP thread and joining it costs, and
/// in a decode step the idle workers of sqllm's and torch's OpenMP runtimes
/// would spin against each other between the small calls.
constexpr std::size_t kParallelMinWork = std::size_t{1} << 21;

/// Threads for a call: num_threads (0: OpenMP's default), 1 for small work.
inline int call_threads(int num_threads, std::size_t batch, std::size_t in, std::size_t out) {
  if (batch * in * out < kParallelMinWork) return 1;
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  return num_threads > 0 ? num_threads : 1;
#endif
}

/// Batches of at least this many rows take the blocked-GEMM path.
constexpr std::size_t kGemmMinBatch = 64;

/// Large batches (prefill): decode a tile of TILE rows of Ŵ into a
/// thread-local buffer and multiply it with all of x through Eigen's GEMM, so
/// the arithmetic runs at BLAS speed while Ŵ is never materialised whole.
/// Decodes row o of Ŵ into dst[0..in): decode_row or a SIMD one.
using DecodeRowFn = void (*)(const std::uint32_t* codes, const float* tables, std::size_t in,
                             std::size_t o, float* dst);

template <int BITS, bool ROW>
DecodeRowFn pick_decode_row(CpuKernel kernel) {
#ifdef SQLLM_X86_SIMD
  if constexpr (BITS <= 4) {
    if (kernel == CpuKernel::Avx512) return &avx512::decode_row<BITS, ROW>;
    if (kernel == CpuKernel::Avx2) return &avx2::decode_row<BITS, ROW>;
  }
#endif
  (void)kernel;
  return &decode_row<BITS, ROW>;
}

template <int BITS, bool ROW>
void lut_matmul_gemm(const float* x, std::size_t batch, std::size_t in, std::size_t out,
                     const std::uint32_t* codes, const float* tables, const CsrView* csr,
                     float* y, int num_threads, CpuKernel kernel) {
  const DecodeRowFn decode = pick_decode_row<BITS, ROW>(kernel);
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  constexpr std::size_t TILE = 64;
  const std::ptrdiff_t ntiles = static_cast<std::ptrdiff_t>((out + TILE - 1) / TILE);
  const Eigen::Map<const RowMat> X(x, static_cast<Eigen::Index>(batch), static_cast<Eigen::Index>(in));
#ifdef _OPENMP
  const int nt = call_threads(num_threads, batch, in, out);
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
    RowMat tile(static_cast<Eigen::Index>(TILE), static_cast<Eigen::Index>(in));
    std::vector<float> sparse_vals;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (std::ptrdiff_t t = 0; t < ntiles; ++t) {
      const std::size_t o0 = static_cast<std::size_t>(t) * TILE;
      const std::size_t nr = std::min(TILE, out - o0);
      for (std::size_t r = 0; r < nr; ++r)
        decode(codes, tables, in, o0 + r, tile.data() + r * in);
      Eigen::Map<RowMat, 0, Eigen::OuterStride<>> Y(y + o0, static_cast<Eigen::Index>(batch),
                                                   static_cast<Eigen::Index>(nr),
                                                   Eigen::OuterStride<>(static_cast<Eigen::Index>(out)));
      Y.noalias() = X * tile.topRows(static_cast<Eigen::Index>(nr)).transpose();
      if (csr != nullptr) {
        // Batch row outermost: x[b] stays in cache while the tile's entries are added.
        const std::int32_t k0 = csr->row_ptr[o0], k1 = csr->row_ptr[o0 + nr];
        sparse_vals.resize(static_cast<std::size_t>(k1 - k0));
        for (std::int32_t k = k0; k < k1; ++k)
          sparse_vals[static_cast<std::size_t>(k - k0)] = half_bits_to_float(csr->values[k]);
        for (std::size_t b = 0; b < batch; ++b) {
          const float* xb = x + b * in;
          float* yb = y + b * out;
          for (std::size_t r = 0; r < nr; ++r) {
            const std::size_t o = o0 + r;
            float acc = 0.0f;
            for (std::int32_t k = csr->row_ptr[o]; k < csr->row_ptr[o + 1]; ++k)
              acc += sparse_vals[static_cast<std::size_t>(k - k0)] * xb[csr->col_idx[k]];
            yb[o] += acc;
          }
        }
      }
    }
  }
  (void)num_threads;
}

#ifdef SQLLM_X86_SIMD
/// x for the SIMD kernels: each chunk of up to 8 batch rows [b0, b0+nb) is
/// stored from xp + b0*(in/G)*G as [group g < in/G][row b < nb][G lanes], so a
/// kernel reads the nb rows' inputs of a group from one contiguous run (no
/// 4K-aliased strided streams).  The tail columns (>= (in/G)*G) stay in x.
/// A single batch row is its own packing (no copy).
template <std::size_t G>
void pack_x(const float* x, std::size_t batch, std::size_t in, float* xp) {
  const std::size_t groups = in / G;
  for (std::size_t b0 = 0; b0 < batch; b0 += 8) {
    const std::size_t nb = std::min<std::size_t>(8, batch - b0);
    float* dst = xp + b0 * groups * G;
    for (std::size_t g = 0; g < groups; ++g)
      for (std::size_t b = 0; b < nb; ++b)
        std::copy_n(x + (b0 + b) * in + g * G, G, dst + (g * nb + b) * G);
  }
}

/// The SIMD paths (1..4-bit codes): OpenMP over output rows, each row's
/// kernel compiled for its instruction set (called only when the CPU has it).
template <int BITS, bool ROW, CpuKernel KERNEL>
void lut_matmul_simd(const float* x, std::size_t batch, std::size_t in, std::size_t out,
                     const std::uint32_t* codes, const float* tables, const CsrView* csr,
                     float* y, int num_threads) {
  static_assert(BITS >= 1 && BITS <= 4, "the SIMD paths take 1..4-bit codes");
  if constexpr (KERNEL == CpuKernel::Avx512 && avx512::dword_kernel_applies<BITS, ROW>()) {
    // Batch 1, codes whole in each 32-bit word: the word-aligned kernel
    // (detail/lut_matmul_avx512_dword.hpp) on x permuted once.
    if (batch == 1 && in >= avx512::dword_block<BITS>()) {
      std::vector<float> xq((in / avx512::dword_block<BITS>()) * avx512::dword_block<BITS>());
      avx512::permute_x<BITS>(x, in, xq.data());
      constexpr std::size_t CH = 16;  // rows per OpenMP chunk
      const std::ptrdiff_t nchunks = static_cast<std::ptrdiff_t>((out + CH - 1) / CH);
#ifdef _OPENMP
      const int nt = call_threads(num_threads, batch, in, out);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nchunks > 1)
#endif
      for (std::ptrdiff_t c = 0; c < nchunks; ++c) {
        const std::size_t o0 = static_cast<std::size_t>(c) * CH;
        avx512::rows_dword<BITS>(x, xq.data(), in, codes, tables, csr, y, o0,
                                 std::min(out, o0 + CH));
      }
      return;
    }
  }
  constexpr std::size_t G = KERNEL == CpuKernel::Avx512 ? 16 : 8;
  std::vector<float> packed;
  const float* xp = x;
  if (batch > 1) {
    packed.resize(batch * (in / G) * G);
    pack_x<G>(x, batch, in, packed.data());
    xp = packed.data();
  }
  // AVX-512 takes output rows in pairs from batch 2 on (one x load per two
  // FMAs); at batch 1 one row at a time streams the codes faster from DRAM.
  const std::size_t R = KERNEL == CpuKernel::Avx512 && batch > 1 ? 2 : 1;
#ifdef _OPENMP
  const int nt = call_threads(num_threads, batch, in, out);
#pragma omp parallel for schedule(static, 8) num_threads(nt) if (nt > 1)
#endif
  for (std::ptrdiff_t p = 0; p < static_cast<std::ptrdiff_t>((out + R - 1) / R); ++p) {
    const std::size_t o = static_cast<std::size_t>(p) * R;
    if (KERNEL == CpuKernel::Avx512)
      avx512::rows<BITS, ROW>(x, xp, batch, in, out, codes, tables, csr, y, o, std::min(R, out - o));
    else
      avx2::rows<BITS, ROW>(x, xp, batch, in, out, codes, tables, csr, y, o);
  }
  (void)num_threads;
}
#endif

template <int BITS, bool ROW>
void lut_matmul_impl(const float* x, std::size_t batch, std::size_t in, std::size_t out,
                     const std::uint32_t* codes, const float* tables, const CsrView* csr, float* y,
                     int num_threads) {
  constexpr std::size_t RB = 4;  // rows decoded per step
  const std::ptrdiff_t nblocks = static_cast<std::ptrdiff_t>((out + RB - 1) / RB);
  std::exception_ptr error;
#ifdef _OPENMP
  const int nt = call_threads(num_threads, batch, in, out);
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
    std::vector<float> buf;
    try {
      buf.resize(RB * in);
    } catch (...) {
#pragma omp critical
      error = std::current_exception();
    }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (std::ptrdiff_t blk = 0; blk < nblocks; ++blk) {
      if (buf.empty()) continue;
      const std::size_t o0 = static_cast<std::size_t>(blk) * RB;
      const std::size_t nr = std::min(RB, out - o0);
      for (std::size_t r = 0; r < nr; ++r) decode_row<BITS, ROW>(codes, tables, in, o0 + r, &buf[r * in]);
      for (std::size_t b = 0; b < batch; ++b) {
        const float* xb = x + b * in;
        float* yb = y + b * out;
        for (std::size_t r = 0; r < nr; ++r) {
          float acc = dot(&buf[r * in], xb, in);
          if (csr != nullptr) {
            const std::size_t o = o0 + r;
            for (std::int32_t k = csr->row_ptr[o]; k < csr->row_ptr[o + 1]; ++k)
              acc += half_bits_to_float(csr->values[k]) * xb[csr->col_idx[k]];
          }
          yb[o0 + r] = acc;
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace detail

/// y = x · Ŵᵀ (+ sparse) for the layer `w` (format/lut.hpp); x is batch x in,
/// y batch x out, both row-major fp32.  The view is validated here
/// (check_lut_view, the full CSR walk included) unless `checked` is true (the
/// caller validated it once, e.g. when the layer was loaded).  `kernel` picks
/// the path (Auto: the best the CPU supports, or SQLLM_CPU_KERNEL); a path the
/// CPU lacks throws.  From detail::kGemmMinBatch rows on, it picks the decoder
/// of the GEMM path's tiles.  Widths above 4 bits always take the scalar code.
inline void lut_matmul(const LutView& w, const float* x, std::size_t batch, float* y,
                       int num_threads = 0, bool checked = false,
                       CpuKernel kernel = CpuKernel::Auto) {
  check_lut_view(w, /*check_sparse_contents=*/!checked);
  SQLLM_CHECK((x != nullptr && y != nullptr) || batch == 0, "lut_matmul: null x or y pointer");
  const CpuKernel ker = resolve_cpu_kernel(kernel);
  if (batch == 0) return;
  const std::size_t in = w.in, out = w.out;
  const std::uint32_t* codes = w.codes;
  const float* tables = w.tables;
  const CsrView* csr = w.has_sparse() ? &w.sparse : nullptr;
  const bool row = w.axis == GroupAxis::Row;
  SQLLM_DISPATCH_BITS(w.bits, BITS, {
    if (batch >= detail::kGemmMinBatch) {
      (row ? detail::lut_matmul_gemm<BITS, true> : detail::lut_matmul_gemm<BITS, false>)(
          x, batch, in, out, codes, tables, csr, y, num_threads, ker);
      return;
    }
#ifdef SQLLM_X86_SIMD
    if (BITS <= 4 && ker != CpuKernel::Scalar) {
      constexpr int B = BITS <= 4 ? BITS : 4;
      using detail::lut_matmul_simd;
      if (ker == CpuKernel::Avx512)
        (row ? lut_matmul_simd<B, true, CpuKernel::Avx512> : lut_matmul_simd<B, false, CpuKernel::Avx512>)(
            x, batch, in, out, codes, tables, csr, y, num_threads);
      else
        (row ? lut_matmul_simd<B, true, CpuKernel::Avx2> : lut_matmul_simd<B, false, CpuKernel::Avx2>)(
            x, batch, in, out, codes, tables, csr, y, num_threads);
      return;
    }
#endif
    (row ? detail::lut_matmul_impl<BITS, true> : detail::lut_matmul_impl<BITS, false>)(
        x, batch, in, out, codes, tables, csr, y, num_threads);
  })
  (void)ker;
}

}  // namespace sqllm
