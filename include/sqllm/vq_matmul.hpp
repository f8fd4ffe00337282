// sqllm/vq_matmul.hpp -- the VQ format (VPTQ's packed layout): one view of
// the buffers, its validation, dequantization and the CPU matmul.
//
// Layout (docs/formats.md, "vq"): G = num_groups, v, k, k_res, B = log2 k +
// log2 k_res bits per index slot.
//   indices            [G, ceil(out/v), packed_words(group_size, B)] uint32:
//                      slot c of vector row r of group g = main | (res << log2 k),
//                      the packing.hpp stream (LSB first, codes may straddle words)
//   centroids          [G, k*v]      res_centroids [G, k_res*v] (k_res = 0: absent)
//   outlier_indices    [ceil(out/v_o), outlier_size] (uint16 values < k_o)
//   outlier_centroids  [k_o*v_o]
//   perm               [in] or absent: position j holds original column perm[j]
//   scale, bias        [in] or absent (enable_norm)
// Decode: W'[r*v + t, j] = C_g[main][t] + R_g[res][t] for j = outlier_size +
// g*group_size + c (the first outlier_size positions from the outlier
// codebook); rows >= out dropped; W[:, perm[j]] = W'[:, j]; W[:, c] =
// W[:, c] * scale[c] + bias[c].  Arithmetic in fp32.
//
// Matmul (small batches): y = x W^T never materialises W.  With x~[j] =
// x[perm[j]] * scale[perm[j]] and beta = sum_c x[c] * bias[c], y[o] =
// sum_j x~[j] W'[o, j] + beta: every vector row of v outputs walks its index
// slots, gathers the v-float centroid (+ residual) and accumulates it times
// x~[j] for each batch row.  Work per vector row is independent (OpenMP over
// vector rows; results identical for any thread count).
//
// Matmul (large batches, vq_matmul_gemm): tiles of kVqGemmTileRows vector rows of
// W' are decoded (position order, before perm/norm) into a thread-local buffer
// and multiplied with all of x~ through Eigen's GEMM, so the arithmetic runs at
// BLAS speed while W is never materialised whole; beta is added as above.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <vector>

#include <Eigen/Core>

#include "sqllm/error.hpp"
#include "sqllm/packing.hpp"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sqllm {

/// Every buffer of one VQ layer (fp32 codebooks; pointers not owned).
struct VqView {
  std::size_t out = 0, in = 0;
  int v = 0;
  std::size_t k = 0, k_res = 0;          ///< powers of two; k_res = 0: no residual
  std::size_t num_groups = 1, group_size = 0;
  const std::uint32_t* indices = nullptr;
  const float* centroids = nullptr;
  const float* res_centroids = nullptr;
  std::size_t outlier_size = 0;
  int v_out = 0;
  std::size_t k_out = 0;
  const std::uint16_t* outlier_indices = nullptr;
  const float* outlier_centroids = nullptr;
  const std::int32_t* perm = nullptr;    ///< or nullptr: identity
  const float* scale = nullptr;          ///< with bias, or both nullptr
  const float* bias = nullptr;

  int index_bits() const {
    int b = 0;
    while ((std::size_t{1} << b) < k) ++b;
    int r = 0;
    while (k_res > 0 && (std::size_t{1} << r) < k_res) ++r;
    return b + r;
  }
  int main_bits() const {
    int b = 0;
    while ((std::size_t{1} << b) < k) ++b;
    return b;
  }
  std::size_t rows_main() const { return (out + static_cast<std::size_t>(v) - 1) / static_cast<std::size_t>(v); }
  std::size_t rows_out() const {
    return outlier_size > 0 ? (out + static_cast<std::size_t>(v_out) - 1) / static_cast<std::size_t>(v_out) : 0;
  }
  std::size_t words() const { return packed_words(group_size, index_bits()); }
};

/// Check the parameters and the values the decode trusts (outlier indices
/// below k_out, perm a permutation, finite codebooks and norm).
inline void check_vq_view(const VqView& q) {
  SQLLM_CHECK(q.out > 0 && q.in > 0, "vq layer: empty shape (", q.out, ", ", q.in, ")");
  SQLLM_CHECK(q.v >= 2 && q.v <= 16, "vq layer: vector length must be in 2..16, got ", q.v);
  auto pow2 = [](std::size_t k) { return k >= 2 && (k & (k - 1)) == 0 && k <= 65536; };
  SQLLM_CHECK(pow2(q.k), "vq layer: num_centroids must be a power of two in 2..65536, got ", q.k);
  SQLLM_CHECK(q.k_res == 0 || pow2(q.k_res),
              "vq layer: num_res_centroids must be 0 or a power of two in 2..65536, got ", q.k_res);
  SQLLM_CHECK(q.num_groups >= 1 && q.group_size >= 1, "vq layer: group_num and group_size must be >= 1");
  SQLLM_CHECK(q.outlier_size < q.in, "vq layer: outlier_size (", q.outlier_size, ") must be < in_features (", q.in, ")");
  SQLLM_CHECK(q.outlier_size + (q.num_groups - 1) * q.group_size < q.in &&
                  q.outlier_size + q.num_groups * q.group_size >= q.in,
              "vq layer: ", q.num_groups, " groups of ", q.group_size, " columns after ", q.outlier_size,
              " outlier columns do not cover in_features=", q.in);
  SQLLM_CHECK(q.indices != nullptr && q.centroids != nullptr, "vq layer: missing indices or centroids");
  SQLLM_CHECK((q.k_res > 0) == (q.res_centroids != nullptr), "vq layer: residual codebook missing or unexpected");
  SQLLM_CHECK((q.scale == nullptr) == (q.bias == nullptr), "vq layer: scale and bias go together");
  for (std::size_t i = 0; i < q.num_groups * q.k * static_cast<std::size_t>(q.v); ++i)
    SQLLM_CHECK(std::isfinite(q.centroids[i]), "vq layer: centroids contain NaN or Inf");
  for (std::size_t i = 0; q.res_centroids && i < q.num_groups * q.k_res * static_cast<std::size_t>(q.v); ++i)
    SQLLM_CHECK(std::isfinite(q.res_centroids[i]), "vq layer: res_centroids contain NaN or Inf");
  if (q.outlier_size > 0) {
    SQLLM_CHECK(q.v_out >= 2 && q.v_out <= 16, "vq layer: outlier vector length must be in 2..16, got ", q.v_out);
    SQLLM_CHECK(q.k_out >= 1 && q.k_out <= 65536, "vq layer: outlier centroids must be in 1..65536, got ", q.k_out);
    SQLLM_CHECK(q.outlier_indices != nullptr && q.outlier_centroids != nullptr,
                "vq layer: outlier_size > 0 needs outlier_indices and outlier_centroids");
    const std::size_t n = q.rows_out() * q.outlier_size;
    for (std::size_t i = 0; i < n; ++i)
      SQLLM_CHECK(q.outlier_indices[i] < q.k_out, "vq layer: corrupt outlier index ", q.outlier_indices[i],
                  " at vector row ", i / q.outlier_size, ", column ", i % q.outlier_size,
                  " (the outlier codebook has ", q.k_out, " centroids)");
    for (std::size_t i = 0; i < q.k_out * static_cast<std::size_t>(q.v_out); ++i)
      SQLLM_CHECK(std::isfinite(q.outlier_centroids[i]), "vq layer: outlier_centroids contain NaN or Inf");
  }
  if (q.perm != nullptr) {
    std::vector<char> seen(q.in, 0);
    for (std::size_t j = 0; j < q.in; ++j) {
      const std::int32_t c = q.perm[j];
      SQLLM_CHECK(c >= 0 && static_cast<std::size_t>(c) < q.in && !seen[static_cast<std::size_t>(c)],
                  "vq layer: perm is not a permutation of 0..", q.in - 1, " (entry ", j, " = ", c, ")");
      seen[static_cast<std::size_t>(c)] = 1;
    }
  }
  if (q.scale != nullptr)
    for (std::size_t c = 0; c < q.in; ++c)
      SQLLM_CHECK(std::isfinite(q.scale[c]) && std::isfinite(q.bias[c]),
                  "vq layer: weight_scale/weight_bias contain NaN or Inf at column ", c);
}

namespace detail {

/// Calls f(j, vec) for every position j of vector row `vrow` with the decoded
/// vector (the outlier codebook's positions, or the groups').
template <class F>
void vq_for_each_row(const VqView& q, std::size_t vrow, bool outliers, std::vector<float>& buf, F&& f) {
  if (outliers) {
    const std::size_t vo = static_cast<std::size_t>(q.v_out);
    for (std::size_t j = 0; j < q.outlier_size; ++j)
      f(j, q.outlier_centroids + static_cast<std::size_t>(q.outlier_indices[vrow * q.outlier_size + j]) * vo);
    return;
  }
  const std::size_t V = static_cast<std::size_t>(q.v), W = q.words();
  const int B = q.index_bits(), mb = q.main_bits();
  const std::uint32_t mmask = static_cast<std::uint32_t>(q.k - 1);
  buf.resize(V);
  for (std::size_t g = 0; g < q.num_groups; ++g) {
    const std::uint32_t* row = q.indices + (g * q.rows_main() + vrow) * W;
    const float* C = q.centroids + g * q.k * V;
    const float* R = q.res_centroids ? q.res_centroids + g * q.k_res * V : nullptr;
    const std::size_t j0 = q.outlier_size + g * q.group_size;
    const std::size_t n = std::min(q.group_size, q.in - j0);
    for (std::size_t c = 0; c < n; ++c) {
      const std::uint32_t code = get_code(row, c, B);
      const float* cv = C + static_cast<std::size_t>(code & mmask) * V;
      if (R != nullptr) {
        const float* rv = R + static_cast<std::size_t>(code >> mb) * V;
        for (std::size_t t = 0; t < V; ++t) buf[t] = cv[t] + rv[t];
        f(j0 + c, buf.data());
      } else {
        f(j0 + c, cv);
      }
    }
  }
}

inline int vq_threads(int nt) {
#ifdef _OPENMP
  return nt > 0 ? nt : omp_get_max_threads();
#else
  (void)nt;
  return 1;
#endif
}

/// The group codebooks' share of y for vector rows [0, rows_main): V is a
/// compile-time vector length so one centroid is a few SIMD registers; codes
/// of a row are decoded 64 bits at a time; batches of 2+ rows go 16 rows per
/// pass with the batch in the SIMD lanes.
template <int V>
void vq_matmul_main(const VqView& q, const float* xt, std::size_t N, float* y, int nt) {
  constexpr std::size_t NB = 16;  // batch rows per pass (the lanes of the batched path)
  const std::size_t W = q.words(), nrows = q.rows_main(), in = q.in;
  const int B = q.index_bits(), mb = q.main_bits();
  const std::uint32_t mmask = static_cast<std::uint32_t>(q.k - 1);
  const std::uint64_t cmask = (std::uint64_t{1} << B) - 1u;
  // Batched path: x~ re-laid out position-major in blocks of NB batch rows
  // (xb[blk][j][lane], zero-padded), so one slot's NB activations are contiguous
  // and each centroid coordinate multiplies NB lanes at once.
  const std::size_t nblk = (N + NB - 1) / NB;
  std::vector<float> xb;
  if (N > 1) {
    xb.assign(nblk * in * NB, 0.0f);
    for (std::size_t b = 0; b < N; ++b)
      for (std::size_t j = 0; j < in; ++j) xb[((b / NB) * in + j) * NB + b % NB] = xt[b * in + j];
  }
  std::exception_ptr error;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
  for (std::ptrdiff_t rr = 0; rr < static_cast<std::ptrdiff_t>(nrows); ++rr) {
    try {
      const std::size_t r = static_cast<std::size_t>(rr);
      for (std::size_t blk = 0; blk < (N > 1 ? nblk : 1); ++blk) {
        float acc1[V] = {};     // N == 1: one batch row, SIMD over the vector
        float accb[V][NB] = {};  // N > 1: SIMD over NB batch rows
#if defined(__AVX512F__)
        __m512 zacc[V];
        for (int t = 0; t < V; ++t) zacc[t] = _mm512_setzero_ps();
#elif defined(__AVX2__) && defined(__FMA__)
        __m256 yacc[V][2];
        for (int t = 0; t < V; ++t) yacc[t][0] = yacc[t][1] = _mm256_setzero_ps();
#endif
        for (std::size_t g = 0; g < q.num_groups; ++g) {
          const std::uint32_t* row = q.indices + (g * nrows + r) * W;
          const float* C = q.centroids + g * q.k * V;
          const float* R = q.res_centroids ? q.res_centroids + g * q.k_res * V : nullptr;
          const std::size_t j0 = q.outlier_size + g * q.group_size;
          const std::size_t n = std::min(q.group_size, in - j0);
          std::size_t bit = 0;
          for (std::size_t c = 0; c < n; ++c, bit += static_cast<std::size_t>(B)) {
            const std::size_t w = bit >> 5;
            std::uint64_t word = row[w];
            if (w + 1 < W) word |= static_cast<std::uint64_t>(row[w + 1]) << 32;
            const auto code = static_cast<std::uint32_t>((word >> (bit & 31u)) & cmask);
            float vec[V];
            const float* cv = C + static_cast<std::size_t>(code & mmask) * V;
            if (R != nullptr) {
              const float* rv = R + static_cast<std::size_t>(code >> mb) * V;
              for (int t = 0; t < V; ++t) vec[t] = cv[t] + rv[t];
            } else {
              for (int t = 0; t < V; ++t) vec[t] = cv[t];
            }
            if (N == 1) {
              const float xv = xt[j0 + c];
              for (int t = 0; t < V; ++t) acc1[t] += xv * vec[t];
            } else {
              const float* xl = xb.data() + (blk * in + j0 + c) * NB;
#if defined(__AVX512F__)
              const __m512 xv = _mm512_loadu_ps(xl);
              for (int t = 0; t < V; ++t) zacc[t] = _mm512_fmadd_ps(_mm512_set1_ps(vec[t]), xv, zacc[t]);
#elif defined(__AVX2__) && defined(__FMA__)
              const __m256 xa = _mm256_loadu_ps(xl), xb8 = _mm256_loadu_ps(xl + 8);
              for (int t = 0; t < V; ++t) {
                const __m256 vt = _mm256_set1_ps(vec[t]);
                yacc[t][0] = _mm256_fmadd_ps(vt, xa, yacc[t][0]);
                yacc[t][1] = _mm256_fmadd_ps(vt, xb8, yacc[t][1]);
              }
#else
              for (int t = 0; t < V; ++t)
                for (std::size_t l = 0; l < NB; ++l) accb[t][l] += vec[t] * xl[l];
#endif
            }
          }
        }
#if defined(__AVX512F__)
        for (int t = 0; t < V; ++t) _mm512_storeu_ps(accb[t], zacc[t]);
#elif defined(__AVX2__) && defined(__FMA__)
        for (int t = 0; t < V; ++t) {
          _mm256_storeu_ps(accb[t], yacc[t][0]);
          _mm256_storeu_ps(accb[t] + 8, yacc[t][1]);
        }
#endif
        const std::size_t nb = N == 1 ? 1 : std::min(NB, N - blk * NB);
        for (std::size_t b = 0; b < nb; ++b)
          for (std::size_t t = 0; t < static_cast<std::size_t>(V) && r * V + t < q.out; ++t)
            y[(blk * NB + b) * q.out + r * V + t] += N == 1 ? acc1[t] : accb[t][b];
      }
    } catch (...) {
#ifdef _OPENMP
#pragma omp critical
#endif
      error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

#define SQLLM_VQ_CASE(N) \
  case N:                \
    return vq_matmul_main<N>(q, xt, batch, y, nt);

inline void vq_matmul_main_dispatch(const VqView& q, const float* xt, std::size_t batch, float* y, int nt) {
  switch (q.v) {
    SQLLM_VQ_CASE(2) SQLLM_VQ_CASE(3) SQLLM_VQ_CASE(4) SQLLM_VQ_CASE(5) SQLLM_VQ_CASE(6)
    SQLLM_VQ_CASE(7) SQLLM_VQ_CASE(8) SQLLM_VQ_CASE(9) SQLLM_VQ_CASE(10) SQLLM_VQ_CASE(11)
    SQLLM_VQ_CASE(12) SQLLM_VQ_CASE(13) SQLLM_VQ_CASE(14) SQLLM_VQ_CASE(15) SQLLM_VQ_CASE(16)
    default:
      throw Error(detail::concat("unsupported vector length v=", q.v, " (supported: 2..16)"));
  }
}
#undef SQLLM_VQ_CASE

}  // namespace detail

/// The (out x in) fp32 weight, row-major.
inline void vq_dequantize(const VqView& q, float* Wout, int num_threads = 0) {
  const int nt = detail::vq_threads(num_threads);
  for (int pass = 0; pass < 2; ++pass) {
    const bool outl = pass == 0;
    if (outl && q.outlier_size == 0) continue;
    const std::size_t vl = static_cast<std::size_t>(outl ? q.v_out : q.v);
    const std::size_t nrows = outl ? q.rows_out() : q.rows_main();
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
    for (std::ptrdiff_t rr = 0; rr < static_cast<std::ptrdiff_t>(nrows); ++rr) {
      std::vector<float> buf;
      const std::size_t r = static_cast<std::size_t>(rr);
      detail::vq_for_each_row(q, r, outl, buf, [&](std::size_t j, const float* vec) {
        const std::size_t c = q.perm ? static_cast<std::size_t>(q.perm[j]) : j;
        const float s = q.scale ? q.scale[c] : 1.0f, b = q.bias ? q.bias[c] : 0.0f;
        for (std::size_t t = 0; t < vl && r * vl + t < q.out; ++t)
          Wout[(r * vl + t) * q.in + c] = q.scale ? vec[t] * s + b : vec[t];
      });
    }
  }
  (void)nt;
}

/// y (N x out) = x (N x in) W^T, fp32, without materialising W.
inline void vq_matmul(const VqView& q, const float* x, std::size_t N, float* y, int num_threads = 0) {
  if (N == 0) return;
  const int nt = detail::vq_threads(num_threads);
  // x~ (N x in, position order) and beta.
  std::vector<float> xt(N * q.in);
  std::vector<float> beta(N, 0.0f);
  for (std::size_t b = 0; b < N; ++b) {
    double bs = 0.0;
    for (std::size_t j = 0; j < q.in; ++j) {
      const std::size_t c = q.perm ? static_cast<std::size_t>(q.perm[j]) : j;
      xt[b * q.in + j] = q.scale ? x[b * q.in + c] * q.scale[c] : x[b * q.in + c];
      if (q.bias) bs += static_cast<double>(x[b * q.in + j]) * static_cast<double>(q.bias[j]);
    }
    beta[b] = static_cast<float>(bs);
  }
  std::fill(y, y + N * q.out, 0.0f);
  detail::vq_matmul_main_dispatch(q, xt.data(), N, y, nt);
  if (q.outlier_size > 0) {  // the outlier codebook's columns (a few; generic loop)
    const std::size_t vl = static_cast<std::size_t>(q.v_out), nrows = q.rows_out();
    std::exception_ptr error;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
    for (std::ptrdiff_t rr = 0; rr < static_cast<std::ptrdiff_t>(nrows); ++rr) {
      try {
        const std::size_t r = static_cast<std::size_t>(rr);
        std::vector<float> buf, acc(N * vl, 0.0f);
        detail::vq_for_each_row(q, r, true, buf, [&](std::size_t j, const float* vec) {
          for (std::size_t b = 0; b < N; ++b) {
            const float xv = xt[b * q.in + j];
            float* a = acc.data() + b * vl;
            for (std::size_t t = 0; t < vl; ++t) a[t] += xv * vec[t];
          }
        });
        for (std::size_t b = 0; b < N; ++b)
          for (std::size_t t = 0; t < vl && r * vl + t < q.out; ++t) y[b * q.out + r * vl + t] += acc[b * vl + t];
      } catch (...) {
#ifdef _OPENMP
#pragma omp critical
#endif
        error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
  }
  if (q.bias)
    for (std::size_t b = 0; b < N; ++b)
      for (std::size_t o = 0; o < q.out; ++o) y[b * q.out + o] += beta[b];
  (void)nt;
}

/// Vector rows per tile of the GEMM path (a tile is rows*v x in floats).
constexpr std::size_t kVqGemmTileRows = 16;

/// The x~ = x[:, perm] * scale (position order) and beta = x . bias of vq_matmul.
inline void vq_transform_x(const VqView& q, const float* x, std::size_t N, std::vector<float>& xt,
                           std::vector<float>& beta) {
  xt.assign(N * q.in, 0.0f);
  beta.assign(N, 0.0f);
  for (std::size_t b = 0; b < N; ++b) {
    double bs = 0.0;
    for (std::size_t j = 0; j < q.in; ++j) {
      const std::size_t c = q.perm ? static_cast<std::size_t>(q.perm[j]) : j;
      xt[b * q.in + j] = q.scale ? x[b * q.in + c] * q.scale[c] : x[b * q.in + c];
      if (q.bias) bs += static_cast<double>(x[b * q.in + j]) * static_cast<double>(q.bias[j]);
    }
    beta[b] = static_cast<float>(bs);
  }
}

/// y (N x out) = x (N x in) W^T, fp32, for large batches: tiles of W' decoded and
/// multiplied by Eigen's GEMM (W is never materialised whole).  Any batch works;
/// below ~16 rows vq_matmul (no decode) is faster.
inline void vq_matmul_gemm(const VqView& q, const float* x, std::size_t N, float* y, int num_threads = 0) {
  if (N == 0) return;
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::vector<float> xt, beta;
  vq_transform_x(q, x, N, xt, beta);
  const std::size_t V = static_cast<std::size_t>(q.v);
  const std::size_t TR = kVqGemmTileRows, TO = TR * V;
  const std::size_t rows = q.rows_main();
  const std::ptrdiff_t ntiles = static_cast<std::ptrdiff_t>((rows + TR - 1) / TR);
  const Eigen::Map<const RowMat> X(xt.data(), static_cast<Eigen::Index>(N), static_cast<Eigen::Index>(q.in));
  const int nt = detail::vq_threads(num_threads);
  std::exception_ptr error;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    RowMat tile(static_cast<Eigen::Index>(TO), static_cast<Eigen::Index>(q.in));
    std::vector<float> buf;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (std::ptrdiff_t t = 0; t < ntiles; ++t) {
      try {
        const std::size_t r0 = static_cast<std::size_t>(t) * TR;
        const std::size_t o0 = r0 * V;
        const std::size_t nr = std::min(TO, q.out - o0);  // output rows of this tile
        float* T = tile.data();
        for (std::size_t r = r0; r < std::min(rows, r0 + TR); ++r) {
          detail::vq_for_each_row(q, r, false, buf, [&](std::size_t j, const float* vec) {
            for (std::size_t e = 0; e < V && r * V + e < q.out; ++e) T[(r * V + e - o0) * q.in + j] = vec[e];
          });
        }
        if (q.outlier_size > 0) {
          const std::size_t vo = static_cast<std::size_t>(q.v_out);
          for (std::size_t o = o0; o < o0 + nr; ++o) {
            const std::uint16_t* oi = q.outlier_indices + (o / vo) * q.outlier_size;
            for (std::size_t j = 0; j < q.outlier_size; ++j)
              T[(o - o0) * q.in + j] = q.outlier_centroids[static_cast<std::size_t>(oi[j]) * vo + o % vo];
          }
        }
        Eigen::Map<RowMat, 0, Eigen::OuterStride<>> Y(y + o0, static_cast<Eigen::Index>(N),
                                                     static_cast<Eigen::Index>(nr),
                                                     Eigen::OuterStride<>(static_cast<Eigen::Index>(q.out)));
        Y.noalias() = X * tile.topRows(static_cast<Eigen::Index>(nr)).transpose();
        if (q.bias) {
          for (std::size_t b = 0; b < N; ++b)
            for (std::size_t o = o0; o < o0 + nr; ++o) y[b * q.out + o] += beta[b];
        }
      } catch (...) {
#ifdef _OPENMP
#pragma omp critical
#endif
        error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
  (void)nt;
}

}  // namespace sqllm
