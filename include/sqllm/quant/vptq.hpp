// sqllm/quant/vptq.hpp -- VPTQ (Liu et al., 2024): vector quantization with
// second-order error feedback, on the GPTQ engine (quant/gptq.hpp).
//
// The weight W (out x in) is cut into vectors of v consecutive *output* rows
// inside one input column (rows r*v .. r*v+v-1 of column c; out is padded
// with zero rows to a multiple of v).  Steps (upstream's `algorithm` branch,
// ../shared/upstream-formats.md; the deviations are marked):
//   1. enable_norm: per input column c, bias_c = min W[:, c], scale_c =
//      max - min (1 when the column is constant), both rounded to fp16 (the
//      stored values), Wn = (W - bias) / scale.  Deviation: the Hessian of the
//      normalised problem is Hn = S H S (S = diag(scale)), so the proxy error
//      tr(dWn Hn dWn^T) equals the original-units tr(dW H dW^T); upstream
//      keeps H.
//   2. enable_perm: columns ordered by decreasing Hn_cc (stable sort).  The
//      first `outlier_cols` columns in that order get their own codebook (v_out,
//      k_out, no residual); the rest split into group_num groups of
//      group_size = ceil((in - outlier_cols) / group_num) columns (the last may
//      be shorter), one codebook per group.
//   3. codebooks: weighted k-means (cluster/kmeans_vec.hpp) on all vectors of
//      a group, sample weight Hn_cc of the vector's column (hessian_weights;
//      else 1); centroids rounded to fp16 and fixed from here on.
//   4. GPTQ pass: each column's vectors take the nearest centroid (plain L2),
//      the error spreads over the later columns (blocksize, percdamp as GPTQ).
//   5. residual (k_res > 0): k-means on the per-vector errors of pass 4 (the
//      values GPTQ actually rounded minus their centroid) gives the residual
//      codebook; a second GPTQ pass from the original weight picks, per
//      vector, the nearest main centroid and then the residual centroid
//      nearest to what is left.
// Proxy errors tr(dW H dW^T) (H as given, undamped, real rows only) are
// reported for plain nearest-centroid assignment (no feedback), after the
// GPTQ pass and after the residual pass; proxy_weight = tr(W H W^T).
//
// Determinism: k-means and the engine give the same result for any thread
// count, so the whole quantizer does.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include <Eigen/Core>

#include "sqllm/cluster/kmeans_vec.hpp"
#include "sqllm/error.hpp"
#include "sqllm/half.hpp"
#include "sqllm/quant/gptq.hpp"

namespace sqllm {

constexpr std::size_t kVqMaxCentroids = 65536;

/// Options of vptq_quantize (documented defaults).
struct VptqParams {
  int v = 8;                     ///< vector length of the group codebooks (2..16)
  std::size_t k = 4096;          ///< centroids per group codebook (power of two, 2..65536)
  std::size_t k_res = 0;         ///< residual centroids (0: none; else a power of two, 2..65536)
  std::size_t outlier_cols = 0;  ///< leading (permuted) columns with their own codebook
  int v_out = 0;                 ///< outlier vector length (2..16) when outlier_cols > 0
  std::size_t k_out = 0;         ///< outlier centroids (1..65536) when outlier_cols > 0
  int group_num = 1;             ///< codebook groups of the non-outlier columns
  bool enable_perm = true;       ///< order columns by decreasing Hessian diagonal
  bool enable_norm = false;      ///< per-input-column min/max normalisation
  bool hessian_weights = true;   ///< k-means sample weight = the column's Hessian diagonal
  int blocksize = 128;           ///< GPTQ lazy-update block
  double percdamp = 0.01;        ///< GPTQ damping (fraction of the mean diagonal)
  int kiter = 100;               ///< k-means iterations
  double ktol = 1e-5;            ///< k-means relative objective tolerance
  VecKmeansInit init = VecKmeansInit::Random;
  std::uint64_t seed = 0;
  int num_threads = 0;
};

struct VptqResult {
  std::size_t out = 0, in = 0;
  std::size_t group_size = 0;     ///< columns per group (the last group may be shorter)
  std::size_t rows_main = 0;      ///< ceil(out / v)
  std::size_t rows_out = 0;       ///< ceil(out / v_out) (0 without outliers)
  std::vector<std::int32_t> perm;         ///< perm[j]: original column at position j
  std::vector<float> scale, bias;         ///< per original column (fp16 values); empty without norm
  std::vector<float> centroids;           ///< group_num x (k * v), fp16 values
  std::vector<float> res_centroids;       ///< group_num x (k_res * v), fp16 values
  std::vector<float> outlier_centroids;   ///< k_out * v_out, fp16 values
  std::vector<std::uint32_t> main_idx;    ///< group_num x rows_main x group_size
  std::vector<std::uint32_t> res_idx;     ///< same shape (empty without residual)
  std::vector<std::uint32_t> outlier_idx; ///< rows_out x outlier_cols
  double proxy_weight = 0.0;              ///< tr(W H W^T)
  double proxy_nearest = 0.0;             ///< plain nearest-centroid assignment
  double proxy_gptq = 0.0;                ///< after the GPTQ pass
  double proxy_residual = -1.0;           ///< after the residual pass (-1: not run)
  std::vector<double> kmeans_objective;   ///< final objective of each k-means run
};

namespace detail {

inline bool is_pow2(std::size_t k) { return k >= 1 && (k & (k - 1)) == 0; }

inline int log2_exact(std::size_t k) {
  int b = 0;
  while ((std::size_t{1} << b) < k) ++b;
  return b;
}

inline float round_half(double x) { return half_bits_to_float(float_to_half_bits(static_cast<float>(x))); }

/// One codebook as the column quantizer sees it.
struct VqBook {
  int v = 0;
  std::size_t k = 0;
  const float* C = nullptr;  ///< k x v
  std::vector<float> tiles;
  std::size_t kr = 0;
  const float* R = nullptr;  ///< kr x v (residual), or nullptr
  std::vector<float> rtiles;
};

/// The column quantizer for the GPTQ engine: a column's rows come in chunks
/// that are multiples of row_align() = lcm of the vector lengths; vector i of
/// a chunk is rows r0 + i*v .. r0 + i*v + v - 1.
struct VqColumnQuantizer {
  std::vector<VqBook>* books = nullptr;  ///< [0]: outliers (if any), then the groups
  std::size_t outlier_cols = 0, group_size = 1, align = 1, cols = 0;
  bool has_outliers = false;
  std::size_t rows_main = 0, rows_out = 0;
  bool residual = false;                   ///< pick residual indices too
  std::uint32_t* main_idx = nullptr;       ///< G x rows_main x group_size
  std::uint32_t* res_idx = nullptr;
  std::uint32_t* outlier_idx = nullptr;    ///< rows_out x outlier_cols
  float* err_out = nullptr;                ///< rows_pad x cols: w - q (pass 1)

  std::size_t row_align() const { return align; }
  void begin_group(std::size_t, std::size_t, const Eigen::Ref<const Eigen::MatrixXd>&) {}

  void quantize_column(std::size_t, std::size_t col, std::size_t r0, std::size_t n,
                       const double* w, double* q) {
    const bool outl = has_outliers && col < outlier_cols;
    const std::size_t gi = outl ? 0 : (col - outlier_cols) / group_size;
    const VqBook& b = (*books)[outl ? 0 : gi + (has_outliers ? 1 : 0)];
    const std::size_t v = static_cast<std::size_t>(b.v), nv = n / v;
    std::vector<float> X(n), Y(n);
    for (std::size_t i = 0; i < n; ++i) X[i] = static_cast<float>(w[i]);
    std::vector<std::int32_t> idx(nv), ridx(nv, 0);
    vec_nearest_tiled(X.data(), nv, b.v, b.tiles.data(), b.k, idx.data(), nullptr, 1);
    const bool use_res = residual && b.R != nullptr;
    if (use_res) {
      for (std::size_t i = 0; i < nv; ++i)
        for (std::size_t t = 0; t < v; ++t)
          Y[i * v + t] = X[i * v + t] - b.C[static_cast<std::size_t>(idx[i]) * v + t];
      vec_nearest_tiled(Y.data(), nv, b.v, b.rtiles.data(), b.kr, ridx.data(), nullptr, 1);
    }
    const std::size_t row0 = r0 / v;
    for (std::size_t i = 0; i < nv; ++i) {
      const float* c = b.C + static_cast<std::size_t>(idx[i]) * v;
      const float* rr = use_res ? b.R + static_cast<std::size_t>(ridx[i]) * v : nullptr;
      for (std::size_t t = 0; t < v; ++t) {
        const float val = rr != nullptr ? c[t] + rr[t] : c[t];
        q[i * v + t] = static_cast<double>(val);
        if (err_out != nullptr) err_out[(r0 + i * v + t) * cols + col] = X[i * v + t] - c[t];
      }
      const std::size_t row = row0 + i;
      if (outl) {
        if (row < rows_out) outlier_idx[row * outlier_cols + col] = static_cast<std::uint32_t>(idx[i]);
      } else if (row < rows_main) {
        const std::size_t slot = (col - outlier_cols) % group_size;
        const std::size_t at = (gi * rows_main + row) * group_size + slot;
        main_idx[at] = static_cast<std::uint32_t>(idx[i]);
        if (res_idx != nullptr) res_idx[at] = static_cast<std::uint32_t>(ridx[i]);
      }
    }
  }
};

/// Weighted k-means on the vectors of columns [c0, c1) (rows < nrows*v of a
/// row-major rows_pad x cols matrix M); weights = diag[c] or 1.
inline std::vector<float> vq_fit_codebook(const float* M, std::size_t cols, std::size_t c0,
                                          std::size_t c1, std::size_t nrows, int v, std::size_t k,
                                          const double* diag, const VptqParams& p,
                                          std::vector<double>& objectives) {
  const std::size_t V = static_cast<std::size_t>(v), npts = (c1 - c0) * nrows;
  std::vector<float> X(npts * V), wts(npts);
  for (std::size_t c = c0; c < c1; ++c)
    for (std::size_t r = 0; r < nrows; ++r) {
      const std::size_t i = (c - c0) * nrows + r;
      for (std::size_t t = 0; t < V; ++t) X[i * V + t] = M[(r * V + t) * cols + c];
      wts[i] = diag != nullptr ? static_cast<float>(diag[c]) : 1.0f;
    }
  VecKmeansParams kp;
  kp.k = k;
  kp.iters = p.kiter;
  kp.tol = p.ktol;
  kp.init = p.init;
  kp.seed = p.seed;
  kp.num_threads = p.num_threads;
  VecKmeansResult km = vec_kmeans(X.data(), npts, v, wts.data(), kp);
  objectives.push_back(km.objective.back());
  for (float& c : km.centroids) c = round_half(c);
  return km.centroids;
}

inline void vq_make_tiles(VqBook& b) {
  vec_tile_centroids(b.C, b.k, b.v, b.tiles);
  if (b.R != nullptr) vec_tile_centroids(b.R, b.kr, b.v, b.rtiles);
}

}  // namespace detail

/// Quantize W (out x in, row-major fp32) with Hessian H (in x in, row-major
/// fp64, a positive multiple of X^T X).  See the file comment.
inline VptqResult vptq_quantize(const float* W, const double* H, std::size_t out, std::size_t in,
                                const VptqParams& p) {
  using detail::MatD;
  SQLLM_CHECK(out > 0 && in > 0, "VPTQ: the weight must be non-empty, got (", out, ", ", in, ")");
  SQLLM_CHECK(p.v >= kVecMinDim && p.v <= kVecMaxDim, "VPTQ: vector length must be in 2..16, got ", p.v);
  SQLLM_CHECK(detail::is_pow2(p.k) && p.k >= 2 && p.k <= kVqMaxCentroids,
              "VPTQ: num_centroids must be a power of two in 2..65536 (indices are packed in "
              "log2(k) bits), got ", p.k);
  SQLLM_CHECK(p.k_res == 0 || (detail::is_pow2(p.k_res) && p.k_res >= 2 && p.k_res <= kVqMaxCentroids),
              "VPTQ: num_res_centroids must be 0 (none) or a power of two in 2..65536, got ", p.k_res);
  SQLLM_CHECK(p.outlier_cols < in, "VPTQ: outlier columns (", p.outlier_cols,
              ") must leave at least one column of ", in);
  if (p.outlier_cols > 0) {
    SQLLM_CHECK(p.v_out >= kVecMinDim && p.v_out <= kVecMaxDim,
                "VPTQ: outlier vector length must be in 2..16, got ", p.v_out);
    SQLLM_CHECK(p.k_out >= 1 && p.k_out <= kVqMaxCentroids,
                "VPTQ: outlier centroids must be in 1..65536 (int16 indices), got ", p.k_out);
  }
  SQLLM_CHECK(p.group_num >= 1, "VPTQ: group_num must be >= 1, got ", p.group_num);
  const std::size_t ncols = in - p.outlier_cols, G = static_cast<std::size_t>(p.group_num);
  SQLLM_CHECK(G <= ncols, "VPTQ: group_num (", G, ") exceeds the ", ncols, " non-outlier columns");
  const std::size_t gs = (ncols + G - 1) / G;
  SQLLM_CHECK((G - 1) * gs < ncols, "VPTQ: group_num=", G, " leaves an empty group for ", ncols,
              " columns (groups of ceil(", ncols, "/", G, ") = ", gs, ")");
  for (std::size_t i = 0; i < out * in; ++i)
    SQLLM_CHECK(std::isfinite(W[i]), "VPTQ: the weight contains NaN or Inf at row ", i / in,
                ", column ", i % in);
  for (std::size_t i = 0; i < in * in; ++i)
    SQLLM_CHECK(std::isfinite(H[i]), "VPTQ: the Hessian contains NaN or Inf at (", i / in, ", ",
                i % in, ")");

  VptqResult res;
  res.out = out;
  res.in = in;
  res.group_size = gs;
  const std::size_t V = static_cast<std::size_t>(p.v);
  const std::size_t VO = p.outlier_cols > 0 ? static_cast<std::size_t>(p.v_out) : V;
  res.rows_main = (out + V - 1) / V;
  res.rows_out = p.outlier_cols > 0 ? (out + VO - 1) / VO : 0;
  const std::size_t align = V / std::gcd(V, VO) * VO;
  const std::size_t rows_pad = (out + align - 1) / align * align;

  // 1. symmetrised Hessian and normalisation.
  MatD Hs(static_cast<Eigen::Index>(in), static_cast<Eigen::Index>(in));
  for (std::size_t a = 0; a < in; ++a)
    for (std::size_t b = 0; b < in; ++b)
      Hs(static_cast<Eigen::Index>(a), static_cast<Eigen::Index>(b)) = 0.5 * (H[a * in + b] + H[b * in + a]);
  for (std::size_t a = 0; a < in; ++a)
    SQLLM_CHECK(Hs(static_cast<Eigen::Index>(a), static_cast<Eigen::Index>(a)) >= 0.0,
                "VPTQ: the Hessian has a negative diagonal entry at ", a);
  std::vector<double> sc(in, 1.0), bi(in, 0.0);
  if (p.enable_norm) {
    res.scale.resize(in);
    res.bias.resize(in);
    for (std::size_t c = 0; c < in; ++c) {
      float lo = W[c], hi = W[c];
      for (std::size_t r = 1; r < out; ++r) {
        lo = std::min(lo, W[r * in + c]);
        hi = std::max(hi, W[r * in + c]);
      }
      float s = detail::round_half(static_cast<double>(hi) - static_cast<double>(lo));
      const float b = detail::round_half(lo);
      SQLLM_CHECK(std::isfinite(s) && std::isfinite(b), "VPTQ: enable_norm: column ", c,
                  " exceeds the fp16 range (min ", lo, ", max ", hi, ")");
      if (!(s > 0.0f)) s = 1.0f;
      res.scale[c] = s;
      res.bias[c] = b;
      sc[c] = s;
      bi[c] = b;
    }
  }
  // 2. permutation.
  res.perm.resize(in);
  std::iota(res.perm.begin(), res.perm.end(), 0);
  auto hn = [&](std::size_t c) {
    return sc[c] * sc[c] * Hs(static_cast<Eigen::Index>(c), static_cast<Eigen::Index>(c));
  };
  if (p.enable_perm)
    std::stable_sort(res.perm.begin(), res.perm.end(), [&](std::int32_t a, std::int32_t b) {
      return hn(static_cast<std::size_t>(a)) > hn(static_cast<std::size_t>(b));
    });
  std::vector<float> Wp(rows_pad * in, 0.0f);
  std::vector<double> Hp(in * in), diag(in);
  for (std::size_t j = 0; j < in; ++j) {
    const std::size_t c = static_cast<std::size_t>(res.perm[j]);
    for (std::size_t r = 0; r < out; ++r)
      Wp[r * in + j] = static_cast<float>((static_cast<double>(W[r * in + c]) - bi[c]) / sc[c]);
    for (std::size_t i = 0; i < in; ++i) {
      const std::size_t ci = static_cast<std::size_t>(res.perm[i]);
      Hp[j * in + i] = sc[c] * sc[ci] * Hs(static_cast<Eigen::Index>(c), static_cast<Eigen::Index>(ci));
    }
    diag[j] = Hp[j * in + j];
  }
  const double* wdiag = p.hessian_weights ? diag.data() : nullptr;

  // Proxy error over the real rows: sum_r dW_r Hp dW_r^T.
  const Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> HpM(
      Hp.data(), static_cast<Eigen::Index>(in), static_cast<Eigen::Index>(in));
  auto proxy = [&](const std::vector<float>& Q) {
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> dW(
        static_cast<Eigen::Index>(out), static_cast<Eigen::Index>(in));
    for (std::size_t r = 0; r < out; ++r)
      for (std::size_t j = 0; j < in; ++j)
        dW(static_cast<Eigen::Index>(r), static_cast<Eigen::Index>(j)) =
            static_cast<double>(Wp[r * in + j]) - static_cast<double>(Q[r * in + j]);
    return std::max(0.0, ((dW * HpM).array() * dW.array()).sum());
  };
  {
    std::vector<float> zero(rows_pad * in, 0.0f);
    // tr(W H W^T) in original units: with norm, W = Wn*s + b, so measure from W itself.
    Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> Wm(
        W, static_cast<Eigen::Index>(out), static_cast<Eigen::Index>(in));
    const MatD Wd = Wm.cast<double>();
    res.proxy_weight = ((Wd * Hs).array() * Wd.array()).sum();
  }

  // 3. codebooks.
  const bool has_out = p.outlier_cols > 0;
  std::vector<detail::VqBook> books;
  if (has_out) {
    res.outlier_centroids = detail::vq_fit_codebook(Wp.data(), in, 0, p.outlier_cols, res.rows_out,
                                                    p.v_out, p.k_out, wdiag, p, res.kmeans_objective);
  }
  res.centroids.resize(G * p.k * V);
  for (std::size_t g = 0; g < G; ++g) {
    const std::size_t c0 = p.outlier_cols + g * gs, c1 = std::min(in, c0 + gs);
    std::vector<float> C = detail::vq_fit_codebook(Wp.data(), in, c0, c1, res.rows_main, p.v, p.k,
                                                   wdiag, p, res.kmeans_objective);
    std::copy(C.begin(), C.end(), res.centroids.begin() + static_cast<std::ptrdiff_t>(g * p.k * V));
  }
  auto make_books = [&](bool with_res) {
    books.clear();
    if (has_out) {
      detail::VqBook b;
      b.v = p.v_out;
      b.k = p.k_out;
      b.C = res.outlier_centroids.data();
      books.push_back(std::move(b));
    }
    for (std::size_t g = 0; g < G; ++g) {
      detail::VqBook b;
      b.v = p.v;
      b.k = p.k;
      b.C = res.centroids.data() + g * p.k * V;
      if (with_res) {
        b.kr = p.k_res;
        b.R = res.res_centroids.data() + g * p.k_res * V;
      }
      books.push_back(std::move(b));
    }
    for (auto& b : books) detail::vq_make_tiles(b);
  };
  make_books(false);

  res.main_idx.assign(G * res.rows_main * gs, 0);
  res.outlier_idx.assign(res.rows_out * p.outlier_cols, 0);
  detail::VqColumnQuantizer quant;
  quant.books = &books;
  quant.outlier_cols = p.outlier_cols;
  quant.has_outliers = has_out;
  quant.group_size = gs;
  quant.align = align;
  quant.cols = in;
  quant.rows_main = res.rows_main;
  quant.rows_out = res.rows_out;
  quant.main_idx = res.main_idx.data();
  quant.outlier_idx = res.outlier_idx.data();

  // Plain nearest-centroid assignment (no feedback), for the log and the tests.
  {
    std::vector<float> Q(rows_pad * in);
    std::vector<double> col(rows_pad), qc(rows_pad);
    for (std::size_t j = 0; j < in; ++j) {
      for (std::size_t r = 0; r < rows_pad; ++r) col[r] = Wp[r * in + j];
      quant.quantize_column(0, j, 0, rows_pad, col.data(), qc.data());
      for (std::size_t r = 0; r < rows_pad; ++r) Q[r * in + j] = static_cast<float>(qc[r]);
    }
    res.proxy_nearest = proxy(Q);
  }

  GptqParams gp;
  gp.blocksize = p.blocksize;
  gp.percdamp = p.percdamp;
  gp.act_order = false;  // the permutation is ours (step 2)
  gp.group_size = -1;
  gp.num_threads = p.num_threads;
  std::vector<float> Q(rows_pad * in), err(p.k_res > 0 ? rows_pad * in : 0);
  quant.err_out = p.k_res > 0 ? err.data() : nullptr;
  gptq(Wp.data(), Hp.data(), rows_pad, in, gp, quant, Q.data());
  res.proxy_gptq = proxy(Q);

  if (p.k_res > 0) {
    res.res_centroids.resize(G * p.k_res * V);
    for (std::size_t g = 0; g < G; ++g) {
      const std::size_t c0 = p.outlier_cols + g * gs, c1 = std::min(in, c0 + gs);
      std::vector<float> R = detail::vq_fit_codebook(err.data(), in, c0, c1, res.rows_main, p.v,
                                                     p.k_res, wdiag, p, res.kmeans_objective);
      std::copy(R.begin(), R.end(), res.res_centroids.begin() + static_cast<std::ptrdiff_t>(g * p.k_res * V));
    }
    err.clear();
    err.shrink_to_fit();
    make_books(true);
    res.res_idx.assign(G * res.rows_main * gs, 0);
    quant.err_out = nullptr;
    quant.residual = true;
    quant.res_idx = res.res_idx.data();
    gptq(Wp.data(), Hp.data(), rows_pad, in, gp, quant, Q.data());
    res.proxy_residual = proxy(Q);
  }
  return res;
}

}  // namespace sqllm
