// sqllm/glut.hpp -- grouped lookup tables with compact (8-bit) tables.
//
// The "glut" format (docs/formats.md): a weight W (out x in, row-major) is cut
// along each row into groups of g consecutive input columns (the last group of
// a row holds in - (G-1) g columns when g does not divide in; G = ceil(in/g)).
// Every (row, group) has its own table of K = 2^bits entries, stored compactly:
//
//   entry k of table (o, j) = offset[o, j] + scale[o, j] * q[o, j, k]
//
// with q uint8 and offset/scale fp16 -- 8 K + 32 bits per table instead of
// 16 K (fp16) or 32 K (fp32) -- computed in fp32 as one fused multiply-add,
// glut_entry() of sqllm/format/glut.hpp (with GlutView, the one view of the
// layout), everywhere (kernels, CUDA, references, Python) so that every
// path decodes the same fp32 values bit for bit.  The codes are packed with
// packing.hpp (one bit stream per output row) exactly as the "lut" format:
// Ŵ[o, i] = entry code(o, i) of table (o, i / g).
//
// Building a table (glut_quantize): the Fisher-weighted exact (or Lloyd) 1-D
// k-means of the group's values (kmeans1d.hpp), the K centroids made compact
// (offset = the smallest centroid rounded to fp16, scale = the range / 255
// rounded to fp16 and nudged up until the largest centroid is reachable,
// q = the nearest step), then every weight gets the nearest *decoded* entry.
//
// Error feedback (glut_gptq, with quant/gptq.hpp): the tables as above, the
// codes assigned column by column by the GPTQ engine (nearest decoded entry of
// the updated weight), and then every row's tables refit to the final codes by
// least squares in the Hessian metric:
//
//   t* = argmin_t (w - A t)^T H (w - A t) + lambda ||t - t0||^2
//
// (A: the 0/1 matrix that maps the row's G K table entries to its weights,
// t0 the tables before the refit, lambda = percdamp * mean(diag H) -- it also
// keeps entries that no weight uses at their old value), made compact again;
// a row keeps its old tables when the refit, once compact, does not lower its
// proxy error.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "sqllm/error.hpp"
#include "sqllm/format/glut.hpp"
#include "sqllm/half.hpp"
#include "sqllm/kmeans1d.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/quant/gptq.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sqllm {

/// Parameters of the grouped quantizer.
struct GlutParams {
  int bits = 4;                               ///< 1..8
  int group_size = 128;                       ///< columns per table (>= 1)
  KMeansMethod method = KMeansMethod::Exact;  ///< exact DP or Lloyd
  int max_iter = 50;                          ///< Lloyd iterations
  int num_threads = 0;                        ///< OpenMP threads; <= 0: the default
};

inline void check_glut_params(const GlutParams& p) {
  SQLLM_CHECK(p.bits >= kGlutMinBits && p.bits <= kGlutMaxBits, "glut: bits must be in 1..8, got ",
              p.bits);
  SQLLM_CHECK(p.group_size >= kGlutMinGroup, "glut: group_size must be >= 1, got ", p.group_size);
}

/// Decode all tables of a view to fp32: out x G x K.
inline void glut_decode_tables(const GlutView& v, float* dst) {
  const std::size_t T = v.out * v.groups(), K = v.K();
  for (std::size_t t = 0; t < T; ++t) {
    const float s = half_bits_to_float(v.scales[t]), o = half_bits_to_float(v.offsets[t]);
    for (std::size_t k = 0; k < K; ++k) dst[t * K + k] = glut_entry(v.tables[t * K + k], s, o);
  }
}

namespace detail {

/// The compact form of K float values (any order): offset, scale (fp16 bits)
/// and q[K].  offset = fp16(min) (rounded down if it rounded up), scale the
/// smallest fp16 >= (max - offset) / 255 that reaches max, q the nearest step.
inline void glut_compact(const float* c, std::size_t K, std::uint8_t* q, std::uint16_t* scale_bits,
                         std::uint16_t* offset_bits) {
  float lo = c[0], hi = c[0];
  for (std::size_t k = 1; k < K; ++k) {
    lo = std::min(lo, c[k]);
    hi = std::max(hi, c[k]);
  }
  SQLLM_CHECK(std::abs(lo) <= 65504.0f && std::abs(hi) <= 65504.0f,
              "glut: a table value ", (std::abs(lo) > std::abs(hi) ? lo : hi),
              " is outside the float16 range of the compact tables (|x| <= 65504)");
  std::uint16_t ob = float_to_half_bits(lo);
  float off = half_bits_to_float(ob);
  if (off > lo) {  // step one fp16 ulp down (toward -inf)
    ob = (ob & 0x8000u) ? static_cast<std::uint16_t>(ob + 1u)
                        : (ob == 0 ? static_cast<std::uint16_t>(0x8001u) : static_cast<std::uint16_t>(ob - 1u));
    off = half_bits_to_float(ob);
  }
  std::uint16_t sb = 0;
  float sc = 0.0f;
  if (hi > off) {
    sb = float_to_half_bits((hi - off) / 255.0f);
    sc = half_bits_to_float(sb);
    while (glut_entry(255, sc, off) < hi && sb < 0x7bffu) {  // positive fp16: next ulp up
      ++sb;
      sc = half_bits_to_float(sb);
    }
  }
  for (std::size_t k = 0; k < K; ++k) {
    int qq = 0;
    if (sc > 0.0f) {
      // nearest step by the decoded value (the rounding of (c - off)/sc can be off by one)
      qq = static_cast<int>(std::lround((static_cast<double>(c[k]) - off) / sc));
      qq = std::min(255, std::max(0, qq));
      for (int d = -1; d <= 1; d += 2) {
        const int alt = qq + d;
        if (alt < 0 || alt > 255) continue;
        if (std::abs(glut_entry(static_cast<std::uint8_t>(alt), sc, off) - c[k]) <
            std::abs(glut_entry(static_cast<std::uint8_t>(qq), sc, off) - c[k]))
          qq = alt;
      }
    }
    q[k] = static_cast<std::uint8_t>(qq);
  }
  *scale_bits = sb;
  *offset_bits = ob;
}

/// Index of the entry of t[0..K) nearest to x (ties: the lower index).
template <class V>
inline std::uint8_t glut_nearest(V x, const float* t, std::size_t K) {
  std::size_t best = 0;
  V bd = std::abs(x - static_cast<V>(t[0]));
  for (std::size_t k = 1; k < K; ++k) {
    const V d = std::abs(x - static_cast<V>(t[k]));
    if (d < bd) {
      bd = d;
      best = k;
    }
  }
  return static_cast<std::uint8_t>(best);
}

}  // namespace detail

/// Output of glut_quantize (caller-owned buffers sized by the shapes).
struct GlutOut {
  std::uint32_t* qweight = nullptr;  ///< out x packed_words(in, bits)
  std::uint8_t* tables = nullptr;    ///< out x G x K
  std::uint16_t* scales = nullptr;   ///< out x G
  std::uint16_t* offsets = nullptr;  ///< out x G
  double* sse = nullptr;             ///< out x G, nullable: weighted SSE with the compact tables
  double* sse_float = nullptr;       ///< out x G, nullable: weighted SSE of the float k-means
  std::uint8_t* codes = nullptr;     ///< out x in, nullable: the unpacked codes
};

/// Quantize W (out x in) with sensitivities S (same shape, nullable: equal
/// weights) into the glut format.
inline void glut_quantize(const float* W, const float* S, std::size_t out, std::size_t in,
                          const GlutParams& p, const GlutOut& o) {
  check_glut_params(p);
  SQLLM_CHECK(out > 0 && in > 0, "glut: weight must be non-empty, got shape (", out, ", ", in, ")");
  SQLLM_CHECK(o.qweight && o.tables && o.scales && o.offsets, "glut: null output buffer");
  for (std::size_t k = 0; k < out * in; ++k) {
    SQLLM_CHECK(std::isfinite(W[k]), "glut: weight has a non-finite value ", W[k], " at (", k / in,
                ", ", k % in, ")");
    if (S)
      SQLLM_CHECK(std::isfinite(S[k]) && S[k] >= 0.0f, "glut: sensitivity must be finite and >= 0, got ",
                  S[k], " at (", k / in, ", ", k % in, ")");
  }
  const std::size_t g = static_cast<std::size_t>(p.group_size);
  const std::size_t G = glut_num_groups(in, g), K = std::size_t{1} << p.bits;
  std::vector<std::uint8_t> codes_local;
  std::uint8_t* codes = o.codes;
  if (!codes) {
    codes_local.resize(out * in);
    codes = codes_local.data();
  }
  KMeans1DParams kp;
  kp.k = static_cast<int>(K);
  kp.method = p.method;
  kp.max_iter = p.max_iter;
  const auto ntab = static_cast<std::int64_t>(out * G);
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#ifdef _OPENMP
  const int nt = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
#endif
  {
    KMeans1D<float> km;
    std::vector<float> cent(K), dec(K);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
    for (std::int64_t t = 0; t < ntab; ++t) {
      if (failed.load(std::memory_order_relaxed)) continue;
      try {
        const std::size_t r = static_cast<std::size_t>(t) / G, j = static_cast<std::size_t>(t) % G;
        const std::size_t i0 = j * g, len = std::min(g, in - i0);
        const float* x = W + r * in + i0;
        const float* w = S ? S + r * in + i0 : nullptr;
        const double sf = km.fit_row(x, w, len, kp, cent.data(), static_cast<std::int32_t*>(nullptr),
                                     static_cast<std::int64_t>(r));
        if (o.sse_float) o.sse_float[t] = sf;
        std::uint8_t* q = o.tables + static_cast<std::size_t>(t) * K;
        detail::glut_compact(cent.data(), K, q, o.scales + t, o.offsets + t);
        const float sc = half_bits_to_float(o.scales[t]), off = half_bits_to_float(o.offsets[t]);
        for (std::size_t k = 0; k < K; ++k) dec[k] = glut_entry(q[k], sc, off);
        double e = 0.0;
        for (std::size_t i = 0; i < len; ++i) {
          const std::uint8_t c = detail::glut_nearest<float>(x[i], dec.data(), K);
          codes[r * in + i0 + i] = c;
          const double d = static_cast<double>(x[i]) - dec[c];
          e += (w ? static_cast<double>(w[i]) : 1.0) * d * d;
        }
        if (o.sse) o.sse[t] = e;
      } catch (...) {
#ifdef _OPENMP
#pragma omp critical(sqllm_glut_error)
#endif
        {
          if (!error) error = std::current_exception();
        }
        failed.store(true);
      }
    }
  }
  if (error) std::rethrow_exception(error);
  pack_codes(codes, out, in, p.bits, o.qweight);
}

/// Reference decode: a plain loop over get_code (the kernels are tested against it).
inline void glut_dequantize_ref(const GlutView& v, float* Wout) {
  const std::size_t G = v.groups(), K = v.K(), g = static_cast<std::size_t>(v.group_size);
  const std::size_t words = packed_words(v.in, v.bits);
  for (std::size_t o = 0; o < v.out; ++o) {
    for (std::size_t i = 0; i < v.in; ++i) {
      const std::size_t t = o * G + i / g;
      const std::uint32_t c = get_code(v.qweight + o * words, i, v.bits);
      Wout[o * v.in + i] = glut_entry(v.tables[t * K + c], half_bits_to_float(v.scales[t]),
                                      half_bits_to_float(v.offsets[t]));
    }
  }
}

/// Reference matmul: y[n, o] = sum_i x[n, i] Ŵ[o, i], accumulated in double.
inline void glut_matmul_ref(const GlutView& v, const float* x, std::size_t batch, float* y) {
  std::vector<float> Wd(v.out * v.in);
  glut_dequantize_ref(v, Wd.data());
  for (std::size_t n = 0; n < batch; ++n)
    for (std::size_t o = 0; o < v.out; ++o) {
      double acc = 0.0;
      for (std::size_t i = 0; i < v.in; ++i)
        acc += static_cast<double>(x[n * v.in + i]) * Wd[o * v.in + i];
      y[n * v.out + o] = static_cast<float>(acc);
    }
}

namespace detail {

/// Decode row o of a view into dst[0..in): 32 codes at a time (decode32)
/// where a run of 32 is whole, get_code for the tail.  tabs: the row's G x K
/// decoded tables.
template <int BITS>
inline void glut_decode_row_t(const GlutView& v, std::size_t o, const float* tabs, float* dst) {
  const std::size_t words = packed_words(v.in, BITS), K = std::size_t{1} << BITS;
  const std::size_t g = static_cast<std::size_t>(v.group_size);
  const std::uint32_t* row = v.qweight + o * words;
  std::uint8_t c32[32];
  const std::size_t full = v.in / 32;
  for (std::size_t c = 0; c < full; ++c) {
    decode32<BITS>(row, c, c32);
    const std::size_t i0 = c * 32;
    const std::size_t j0 = i0 / g, j1 = (i0 + 31) / g;
    if (j0 == j1) {
      const float* t = tabs + j0 * K;
      for (int k = 0; k < 32; ++k) dst[i0 + static_cast<std::size_t>(k)] = t[c32[k]];
    } else {
      for (std::size_t k = 0; k < 32; ++k) dst[i0 + k] = tabs[((i0 + k) / g) * K + c32[k]];
    }
  }
  for (std::size_t i = full * 32; i < v.in; ++i)
    dst[i] = tabs[(i / g) * K + get_code(row, i, BITS)];
}

inline void glut_decode_row(const GlutView& v, std::size_t o, const float* tabs, float* dst) {
  switch (v.bits) {
    case 1: return glut_decode_row_t<1>(v, o, tabs, dst);
    case 2: return glut_decode_row_t<2>(v, o, tabs, dst);
    case 3: return glut_decode_row_t<3>(v, o, tabs, dst);
    case 4: return glut_decode_row_t<4>(v, o, tabs, dst);
    case 5: return glut_decode_row_t<5>(v, o, tabs, dst);
    case 6: return glut_decode_row_t<6>(v, o, tabs, dst);
    case 7: return glut_decode_row_t<7>(v, o, tabs, dst);
    default: return glut_decode_row_t<8>(v, o, tabs, dst);
  }
}

inline void glut_row_tables(const GlutView& v, std::size_t o, float* tabs) {
  const std::size_t G = v.groups(), K = v.K();
  for (std::size_t j = 0; j < G; ++j) {
    const std::size_t t = o * G + j;
    const float s = half_bits_to_float(v.scales[t]), off = half_bits_to_float(v.offsets[t]);
    for (std::size_t k = 0; k < K; ++k) tabs[j * K + k] = glut_entry(v.tables[t * K + k], s, off);
  }
}

}  // namespace detail

/// Fast decode of the whole layer (rows in parallel); equals glut_dequantize_ref bit for bit.
inline void glut_dequantize(const GlutView& v, float* Wout, int num_threads = 0) {
  const auto out = static_cast<std::int64_t>(v.out);
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
#else
  (void)num_threads;
#endif
  {
    std::vector<float> tabs(v.groups() * v.K());
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (std::int64_t o = 0; o < out; ++o) {
      detail::glut_row_tables(v, static_cast<std::size_t>(o), tabs.data());
      detail::glut_decode_row(v, static_cast<std::size_t>(o), tabs.data(),
                              Wout + static_cast<std::size_t>(o) * v.in);
    }
  }
}

/// y[n, o] = sum_i x[n, i] Ŵ[o, i] (batch x out, fp32 accumulate) from the
/// packed codes: each row of Ŵ is decoded once into a scratch row and
/// multiplied with every input vector; rows run in parallel.
inline void glut_matmul(const GlutView& v, const float* x, std::size_t batch, float* y,
                        int num_threads = 0) {
  const auto out = static_cast<std::int64_t>(v.out);
  const std::size_t in = v.in;
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
#else
  (void)num_threads;
#endif
  {
    std::vector<float> tabs(v.groups() * v.K()), wrow(in);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (std::int64_t o = 0; o < out; ++o) {
      const auto uo = static_cast<std::size_t>(o);
      detail::glut_row_tables(v, uo, tabs.data());
      detail::glut_decode_row(v, uo, tabs.data(), wrow.data());
      const float* wr = wrow.data();
      for (std::size_t n = 0; n < batch; ++n) {
        const float* xn = x + n * in;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
        std::size_t i = 0;
        for (; i + 8 <= in; i += 8) {
          a0 += xn[i] * wr[i];
          a1 += xn[i + 1] * wr[i + 1];
          a2 += xn[i + 2] * wr[i + 2];
          a3 += xn[i + 3] * wr[i + 3];
          a4 += xn[i + 4] * wr[i + 4];
          a5 += xn[i + 5] * wr[i + 5];
          a6 += xn[i + 6] * wr[i + 6];
          a7 += xn[i + 7] * wr[i + 7];
        }
        for (; i < in; ++i) a0 += xn[i] * wr[i];
        y[n * v.out + uo] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
      }
    }
  }
}

// ---- error feedback ---------------------------------------------------------

/// GPTQ column quantizer on grouped tables: the table of (row, column) is the
/// decoded table of the column's group (by original column index, so
/// act-order leaves the tables where they are).
struct GlutColumnQuantizer {
  const float* tables = nullptr;  ///< rows x G x K (decoded)
  std::size_t K = 0, G = 0, group_size = 0, cols = 0;
  std::uint8_t* codes = nullptr;  ///< rows x cols, written

  std::size_t row_align() const { return 1; }
  void begin_group(std::size_t, std::size_t, const Eigen::Ref<const Eigen::MatrixXd>&) {}
  void quantize_column(std::size_t, std::size_t col, std::size_t r0, std::size_t n,
                       const double* w, double* q) {
    const std::size_t j = col / group_size;
    for (std::size_t r = 0; r < n; ++r) {
      const float* t = tables + ((r0 + r) * G + j) * K;
      const std::uint8_t c = detail::glut_nearest<double>(w[r], t, K);
      codes[(r0 + r) * cols + col] = c;
      q[r] = static_cast<double>(t[c]);
    }
  }
};

/// Result of glut_gptq.
struct GlutGptqResult {
  double proxy_error_gptq = 0.0;   ///< tr(dW H dW^T) after GPTQ, before the refit
  double proxy_error = 0.0;        ///< after the refit (final)
  std::size_t rows_refit = 0;      ///< rows whose refit tables were kept
};

/// Grouped tables with GPTQ error feedback and a least-squares refit.  The
/// output buffers must hold the tables from glut_quantize (W, S) on entry;
/// qweight and the tables are overwritten.  H: in x in (row-major fp64, any
/// positive multiple of X^T X).  refit=false skips the refit.
inline GlutGptqResult glut_gptq(const float* W, const double* H, std::size_t out, std::size_t in,
                                const GlutParams& p, const GptqParams& gp, bool refit,
                                const GlutOut& o) {
  check_glut_params(p);
  const std::size_t g = static_cast<std::size_t>(p.group_size);
  const std::size_t G = glut_num_groups(in, g), K = std::size_t{1} << p.bits;
  GlutView v0;
  v0.tables = o.tables;
  v0.scales = o.scales;
  v0.offsets = o.offsets;
  v0.out = out;
  v0.in = in;
  v0.bits = p.bits;
  v0.group_size = p.group_size;
  std::vector<float> dec(out * G * K);
  glut_decode_tables(v0, dec.data());
  std::vector<std::uint8_t> codes(out * in);
  GlutColumnQuantizer q{dec.data(), K, G, g, in, codes.data()};
  GptqParams gp2 = gp;
  gp2.group_size = -1;
  gp2.num_threads = p.num_threads;
  const GptqResult res = gptq(W, H, out, in, gp2, q, nullptr);
  GlutGptqResult r;
  r.proxy_error_gptq = res.proxy_error;
  r.proxy_error = res.proxy_error;

  if (refit) {
    using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
    using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const auto n = static_cast<Eigen::Index>(in);
    const Eigen::Map<const RowMatD> Hin(H, n, n);
    const MatD Hs = 0.5 * (Hin + Hin.transpose());
    const double lambda = std::max(gp.percdamp, 1e-6) * std::max(Hs.diagonal().mean(), 1e-30);
    const std::size_t T = G * K;
    std::vector<double> row_delta(out, 0.0);
    std::vector<char> kept(out, 0);
    std::exception_ptr error;
    const auto nout = static_cast<std::int64_t>(out);
#ifdef _OPENMP
    const int nt = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
#endif
    {
      MatD B(static_cast<Eigen::Index>(T), n), M(static_cast<Eigen::Index>(T), static_cast<Eigen::Index>(T));
      Eigen::VectorXd w(n), rhs(static_cast<Eigen::Index>(T)), t0(static_cast<Eigen::Index>(T)),
          d(n), Hd(n);
      std::vector<Eigen::Index> idx(in);
      std::vector<float> newt(T);
      std::vector<std::uint8_t> nq(T);
      std::vector<std::uint16_t> nsc(G), noff(G);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 8)
#endif
      for (std::int64_t rr = 0; rr < nout; ++rr) {
        try {
          const auto r = static_cast<std::size_t>(rr);
          for (std::size_t i = 0; i < in; ++i) {
            w[static_cast<Eigen::Index>(i)] = W[r * in + i];
            idx[i] = static_cast<Eigen::Index>((i / g) * K + codes[r * in + i]);
          }
          for (std::size_t k = 0; k < T; ++k) t0[static_cast<Eigen::Index>(k)] = dec[r * T + k];
          // B = A^T H (scatter rows of H), M = B A (scatter columns of B)
          B.setZero();
          for (Eigen::Index i = 0; i < n; ++i) B.row(idx[static_cast<std::size_t>(i)]) += Hs.row(i);
          M.setZero();
          for (Eigen::Index i = 0; i < n; ++i) M.col(idx[static_cast<std::size_t>(i)]) += B.col(i);
          rhs = B * w + lambda * t0;
          M.diagonal().array() += lambda;
          const Eigen::VectorXd t = M.ldlt().solve(rhs);
          if (!t.allFinite()) continue;
          for (std::size_t k = 0; k < T; ++k) newt[k] = static_cast<float>(t[static_cast<Eigen::Index>(k)]);
          // compact again
          bool ok = true;
          for (std::size_t k = 0; k < T; ++k) ok = ok && std::abs(newt[k]) <= 65504.0f;
          if (!ok) continue;
          for (std::size_t j = 0; j < G; ++j)
            detail::glut_compact(newt.data() + j * K, K, nq.data() + j * K, &nsc[j], &noff[j]);
          // proxy errors of the row, old and new tables
          auto row_err = [&](auto entry) {
            for (std::size_t i = 0; i < in; ++i)
              d[static_cast<Eigen::Index>(i)] = w[static_cast<Eigen::Index>(i)] - entry(i);
            Hd.noalias() = Hs * d;
            return d.dot(Hd);
          };
          const double e_old = row_err([&](std::size_t i) {
            return static_cast<double>(dec[r * T + static_cast<std::size_t>(idx[i])]);
          });
          const double e_new = row_err([&](std::size_t i) {
            const std::size_t j = i / g, k = static_cast<std::size_t>(idx[i]) - j * K;
            return static_cast<double>(glut_entry(nq[j * K + k], half_bits_to_float(nsc[j]),
                                                  half_bits_to_float(noff[j])));
          });
          if (e_new < e_old) {
            std::copy(nq.begin(), nq.end(), o.tables + r * T);
            std::copy(nsc.begin(), nsc.end(), o.scales + r * G);
            std::copy(noff.begin(), noff.end(), o.offsets + r * G);
            row_delta[r] = e_new - e_old;
            kept[r] = 1;
          }
        } catch (...) {
#ifdef _OPENMP
#pragma omp critical(sqllm_glut_refit_error)
#endif
          {
            if (!error) error = std::current_exception();
          }
        }
      }
    }
    if (error) std::rethrow_exception(error);
    for (std::size_t rr = 0; rr < out; ++rr) {
      r.proxy_error += row_delta[rr];
      r.rows_refit += kept[rr] ? 1 : 0;
    }
    r.proxy_error = std::max(r.proxy_error, 0.0);
  }
  if (o.codes) std::copy(codes.begin(), codes.end(), o.codes);
  pack_codes(codes.data(), out, in, p.bits, o.qweight);
  return r;
}

}  // namespace sqllm
