// sqllm/uniform_matmul.hpp -- CPU matmul straight from the uniform format's
// packed codes (quant/uniform.hpp):
//
//   y[b, o] = sum_i x[b, i] * s[o, g(i)] * (q[o, i] - z[o, g(i)])
//
// x is batch x in (row-major fp32), y batch x out.  Ŵ is never materialised:
// each thread decodes a few rows of codes (32 at a time, packing.hpp's aligned
// unit) into a small fp32 buffer and multiplies it with every batch row while
// it is in cache, so a row of codes is decoded once per call whatever the
// batch; large batches decode a tile of 64 rows and use Eigen's GEMM.
// fp32 accumulate; OpenMP over output rows (each output is computed by one
// thread in a fixed order: the result does not depend on the thread count).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <vector>

#include <Eigen/Core>

#include "sqllm/detail/uniform_matmul_avx2.hpp"
#include "sqllm/dispatch.hpp"
#include "sqllm/error.hpp"
#include "sqllm/half.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/quant/uniform.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sqllm {
namespace detail {

/// Decode row o of Ŵ into dst[0..in).  sc/zc: scratch of v.groups() floats.
template <int BITS>
inline void uniform_decode_row(const UniformView& v, std::size_t o, float* sc, float* zc,
                               float* dst) {
  const std::size_t G = v.groups();
  for (std::size_t g = 0; g < G; ++g) {
    sc[g] = half_bits_to_float(v.scales[o * G + g]);
    zc[g] = half_bits_to_float(v.zeros[o * G + g]);
  }
  const std::uint32_t* row = v.qweight + o * packed_words(v.in, BITS);
  const std::size_t full = v.in / 32;
  std::uint32_t c[32];
  if (v.g_idx == nullptr) {
    // Groups are 32, 64 or 128 columns (or the whole row): every run of 32
    // codes lies in one group.
    const std::size_t blocks_per_group = v.group_size < 0 ? full + 1 : static_cast<std::size_t>(v.group_size) / 32;
    for (std::size_t blk = 0; blk < full; ++blk) {
      decode32<BITS>(row, blk, c);
      const std::size_t g = v.group_size < 0 ? 0 : blk / blocks_per_group;
      const float s = sc[g], z = zc[g];
      float* d = dst + blk * 32;
      for (int j = 0; j < 32; ++j) d[j] = s * (static_cast<float>(c[j]) - z);
    }
  } else {
    for (std::size_t blk = 0; blk < full; ++blk) {
      decode32<BITS>(row, blk, c);
      const std::int32_t* gi = v.g_idx + blk * 32;
      float* d = dst + blk * 32;
      for (int j = 0; j < 32; ++j) d[j] = sc[gi[j]] * (static_cast<float>(c[j]) - zc[gi[j]]);
    }
  }
  for (std::size_t i = full * 32; i < v.in; ++i) {
    const std::size_t g = uniform_group_of(v, i);
    dst[i] = sc[g] * (static_cast<float>(get_code(row, i, BITS)) - zc[g]);
  }
}

/// Batches of at least this many rows take the tiled-GEMM path.
constexpr std::size_t kUniformGemmMinBatch = 64;

template <int BITS>
void uniform_matmul_impl(const UniformView& v, const float* x, std::size_t batch, float* y,
                         int num_threads) {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const bool gemm = batch >= kUniformGemmMinBatch;
  const std::size_t RB = gemm ? 64 : 4;  // rows decoded per step
  const std::size_t in = v.in, out = v.out;
  const auto nblocks = static_cast<std::ptrdiff_t>((out + RB - 1) / RB);
  std::exception_ptr error;
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
#endif
  {
    RowMat buf;
    std::vector<float> sc, zc;
    bool ok = true;
    try {  // a bad_alloc inside the parallel region must not terminate the process
      buf.resize(static_cast<Eigen::Index>(RB), static_cast<Eigen::Index>(in));
      sc.resize(v.groups());
      zc.resize(v.groups());
    } catch (...) {
      ok = false;
#ifdef _OPENMP
#pragma omp critical
#endif
      error = std::current_exception();
    }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (std::ptrdiff_t blk = 0; blk < nblocks; ++blk) {
      if (!ok) continue;
      const std::size_t o0 = static_cast<std::size_t>(blk) * RB;
      const std::size_t nr = std::min(RB, out - o0);
      for (std::size_t r = 0; r < nr; ++r)
        uniform_decode_row<BITS>(v, o0 + r, sc.data(), zc.data(), buf.data() + r * in);
      if (gemm) {
        const Eigen::Map<const RowMat> X(x, static_cast<Eigen::Index>(batch), static_cast<Eigen::Index>(in));
        Eigen::Map<RowMat, 0, Eigen::OuterStride<>> Y(
            y + o0, static_cast<Eigen::Index>(batch), static_cast<Eigen::Index>(nr),
            Eigen::OuterStride<>(static_cast<Eigen::Index>(out)));
        Y.noalias() = X * buf.topRows(static_cast<Eigen::Index>(nr)).transpose();
      } else {
        for (std::size_t b = 0; b < batch; ++b) {
          const float* xb = x + b * in;
          for (std::size_t r = 0; r < nr; ++r) {
            const float* wr = buf.data() + r * in;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (std::size_t i = 0; i < in; ++i) acc += wr[i] * xb[i];
            y[b * out + o0 + r] = acc;
          }
        }
      }
    }
  }
  (void)num_threads;
  if (error) std::rethrow_exception(error);
}

#ifdef SQLLM_HAVE_AVX2
/// Small batches on AVX2/FMA (2, 3, 4, 8 bits): one output row per step,
/// codes decoded in registers, four batch rows per pass over the codes.
template <int BITS>
void uniform_matmul_avx2(const UniformView& v, const float* x, std::size_t batch, float* y,
                         int num_threads) {
  std::exception_ptr error;
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
#endif
  {
    std::vector<float> sc, zc;
    bool ok = true;
    try {
      sc.resize(v.groups());
      zc.resize(v.groups());
    } catch (...) {
      ok = false;
#ifdef _OPENMP
#pragma omp critical
#endif
      error = std::current_exception();
    }
#ifdef _OPENMP
#pragma omp for schedule(static, 16)
#endif
    for (std::ptrdiff_t o = 0; o < static_cast<std::ptrdiff_t>(v.out); ++o)
      if (ok) avx2::uniform_rows<BITS>(v, x, batch, y, static_cast<std::size_t>(o), sc.data(), zc.data());
  }
  (void)num_threads;
  if (error) std::rethrow_exception(error);
}
#endif

}  // namespace detail

/// y = x · Ŵᵀ for the uniform format.  The view is validated here unless
/// `checked` (the caller validated it once, e.g. at load time).
inline void uniform_matmul(const UniformView& v, const float* x, std::size_t batch, float* y,
                           int num_threads = 0, bool checked = false) {
  if (!checked) check_uniform_view(v);
  if (batch == 0) return;
  SQLLM_DISPATCH_BITS(v.bits, BITS, {
#ifdef SQLLM_HAVE_AVX2
    if constexpr (detail::avx2::uniform_avx2_bits(BITS)) {
      if (batch < detail::kUniformGemmMinBatch) {
        detail::uniform_matmul_avx2<BITS>(v, x, batch, y, num_threads);
        return;
      }
    }
#endif
    detail::uniform_matmul_impl<BITS>(v, x, batch, y, num_threads);
  })
}

}  // namespace sqllm
