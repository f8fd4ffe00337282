// sqllm/quant/gptq.hpp -- the GPTQ engine (Frantar et al., 2022), templated on
// a column quantizer.
//
// GPTQ quantizes W (out x in) one input column at a time and, after each
// column, spreads that column's rounding error over the columns not yet
// quantized so as to minimise the layer's output error ||(W - Q) X^T||^2 =
// tr((W - Q) H (W - Q)^T) with H = X^T X.  Rows are independent given H, so
// the same engine serves every quantizer whose parameters are per row (or per
// a few rows): uniform grids (GPTQ), SqueezeLLM's per-row lookup tables
// (SqueezeLLM with GPTQ error feedback), VPTQ's codebooks.
//
// The Hessian.  The engine takes any positive multiple of X^T X (sqllm's
// methods pass 2 X^T X / count, upstream GPTQ's normalisation); the codes do
// not depend on the multiple because damping is relative to the mean
// diagonal.  proxy_error is tr((W - Q) H (W - Q)^T) for the H given.
//
// Steps (as upstream GPTQ; the deviations are marked):
//   1. dead columns (H_ii == 0: the input is always zero): H_ii = 1, W[:, i] = 0;
//   2. static groups: the quantizer fits every group on W before the permutation;
//   3. act-order: columns sorted by decreasing H_ii (a *stable* sort, so ties
//      keep their order -- upstream's argsort leaves ties unspecified);
//   4. damping: H += percdamp * mean(diag H) * I;
//   5. U = the upper Cholesky factor of H^-1 (H^-1 = U^T U).  Computed as the
//      inverse of the "upper-lower" Cholesky factor of H (H = V V^T, V upper,
//      from the lower Cholesky factor of H with rows and columns reversed):
//      one factorisation and one triangular inverse instead of upstream's
//      factorise / invert / factorise; the same U up to rounding;
//   6. columns in blocks of `blocksize`: inside a block, column j is quantized,
//      err = (w_j - q_j) / U_jj, and the block's later columns get
//      w_k -= err * U_jk; after the block, all later columns get the block's
//      errors at once (one GEMM, the "lazy batch update");
//   7. dynamic groups (group_size > 0, not static): a group's parameters are
//      fitted when its first column comes up, from the group's columns as
//      they are then -- with every earlier column's error already applied.
//      Blocks are widened to a whole number of groups to make that true.
//      (Deviation: upstream fits from the matrix before the current block's
//      in-block updates, which only differs for groups that start mid-block,
//      i.e. group_size < blocksize.)  The result equals the unbatched
//      algorithm (every update applied at once) up to rounding.
//
// Threads and determinism.  Rows are processed in chunks of a fixed number
// of rows (a multiple of the quantizer's row_align()), chunks in parallel
// with OpenMP, each chunk's algebra single-threaded: the arithmetic done for
// a row never depends on the thread count, so the result is the same for any
// number of threads.  The factorisation runs once, before.
//
// The column-quantizer concept (UniformColumnQuantizer in
// quant/gptq_uniform.hpp, LutColumnQuantizer below):
//
//   std::size_t row_align() const;
//       chunks of rows are multiples of this (1 for per-row quantizers);
//   void begin_group(std::size_t group, std::size_t r0, const Eigen::Ref<const Eigen::MatrixXd>& w);
//       fit the parameters of `group` for rows [r0, r0 + w.rows()) from the
//       current values w of the group's columns (one call per row chunk);
//   void quantize_column(std::size_t group, std::size_t col, std::size_t r0,
//                        std::size_t n, const double* w, double* q);
//       quantize original column `col` (in `group`) for rows [r0, r0 + n):
//       w (current values) -> q (the values the codes stand for), and record
//       the codes.
//
// Both are called concurrently for disjoint row ranges; a quantizer stores its
// per-(row, group) state in arrays indexed by row, so that is safe.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <numeric>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "sqllm/error.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sqllm {

/// Options of the GPTQ engine (documented defaults, no globals).
struct GptqParams {
  int blocksize = 128;         ///< columns per lazy-update block (>= 1)
  double percdamp = 0.01;      ///< damping, a fraction of the mean Hessian diagonal (>= 0)
  bool act_order = false;      ///< quantize columns by decreasing H_ii
  bool static_groups = false;  ///< fit group parameters before the permutation
  int group_size = -1;         ///< columns per quantizer group; -1: one group per row
  int num_threads = 0;         ///< OpenMP threads; <= 0: the OpenMP default
  std::size_t row_chunk = 128; ///< rows per unit of work (rounded up to row_align())
};

/// What the engine reports besides the quantizer's own state.
struct GptqResult {
  std::vector<std::int32_t> perm;   ///< perm[j]: the original column quantized j-th
  std::vector<std::int32_t> g_idx;  ///< group of every original column
  std::size_t num_groups = 1;
  double proxy_error = 0.0;         ///< tr((W - Q) H (W - Q)^T), H as given
  std::size_t dead_columns = 0;     ///< columns with H_ii == 0
  double damp = 0.0;                ///< the absolute damping added to the diagonal
};

namespace detail {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;  // column-major

/// U with H^-1 = U^T U, U upper triangular, for a symmetric positive definite
/// H.  Throws sqllm::Error when H is not positive definite.
inline MatD gptq_inverse_factor(const MatD& H, double percdamp, int num_threads) {
  const Eigen::Index n = H.rows();
  // H = V V^T with V upper  <=>  J H J = (J V J)(J V J)^T with J V J lower.
  const MatD Hrev = H.reverse();
  Eigen::LLT<MatD> llt(Hrev);
  const bool ok = llt.info() == Eigen::Success && llt.matrixLLT().diagonal().minCoeff() > 0.0 &&
                  llt.matrixLLT().diagonal().allFinite();
  SQLLM_CHECK(ok, "GPTQ: the Hessian is not positive definite even after damping (percdamp=",
              percdamp, "); it must be a positive multiple of X^T X -- check for NaN/Inf inputs, "
              "a negative diagonal, or raise percdamp");
  MatD L = llt.matrixL();
  // U = V^-1 = J L^-1 J.  L^-1 by blocks of columns: column block [c0, c1) of
  // L^-1 is zero above row c0 and solves L[c0:, c0:] X = I[c0:, c0:c1].  Blocks
  // are independent and each is solved single-threaded: deterministic.
  MatD Linv = MatD::Zero(n, n);
  constexpr Eigen::Index NB = 64;
  const Eigen::Index nblk = (n + NB - 1) / NB;
  std::exception_ptr error;
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
  for (Eigen::Index b = 0; b < nblk; ++b) {
    try {
      const Eigen::Index c0 = b * NB, nb = std::min(NB, n - c0), m = n - c0;
      MatD X = MatD::Identity(m, nb);
      L.bottomRightCorner(m, m).triangularView<Eigen::Lower>().solveInPlace(X);
      Linv.block(c0, c0, m, nb) = X;
    } catch (...) {
#ifdef _OPENMP
#pragma omp critical
#endif
      error = std::current_exception();
    }
  }
  (void)num_threads;
  if (error) std::rethrow_exception(error);
  MatD U = Linv.reverse();
  SQLLM_CHECK(U.allFinite(), "GPTQ: the inverse Hessian factor is not finite (the Hessian is too "
              "ill-conditioned); raise percdamp (got ", percdamp, ")");
  return U;
}

}  // namespace detail

/// Run GPTQ on W (rows x cols, row-major fp32) with Hessian H (cols x cols,
/// row-major fp64, symmetrised as (H + H^T)/2).  The quantizer receives the
/// columns and records the codes; Q (the dequantized weight, rows x cols,
/// row-major) is written to `q_out` when it is not nullptr.
template <class Quantizer>
GptqResult gptq(const float* W, const double* H, std::size_t rows, std::size_t cols,
                const GptqParams& p, Quantizer& quantizer, float* q_out = nullptr) {
  using detail::MatD;
  SQLLM_CHECK(rows > 0 && cols > 0, "GPTQ: the weight must be non-empty, got (", rows, ", ", cols, ")");
  SQLLM_CHECK(p.blocksize >= 1, "GPTQ: blocksize must be >= 1, got ", p.blocksize);
  SQLLM_CHECK(std::isfinite(p.percdamp) && p.percdamp >= 0.0,
              "GPTQ: percdamp must be finite and >= 0, got ", p.percdamp);
  SQLLM_CHECK(p.group_size == -1 || p.group_size >= 1,
              "GPTQ: group_size must be -1 or >= 1, got ", p.group_size);
  for (std::size_t k = 0; k < rows * cols; ++k)
    SQLLM_CHECK(std::isfinite(W[k]), "GPTQ: the weight contains NaN or Inf at row ", k / cols,
                ", column ", k % cols);
  for (std::size_t k = 0; k < cols * cols; ++k)
    SQLLM_CHECK(std::isfinite(H[k]), "GPTQ: the Hessian contains NaN or Inf at (", k / cols, ", ",
                k % cols, ")");

  const auto n = static_cast<Eigen::Index>(cols);
  using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const RowMatD> Hin(H, n, n);
  MatD Hs = 0.5 * (Hin + Hin.transpose());

  GptqResult res;
  // 1. dead columns
  std::vector<char> dead(cols, 0);
  for (Eigen::Index i = 0; i < n; ++i) {
    SQLLM_CHECK(Hs(i, i) >= 0.0, "GPTQ: the Hessian is not positive semi-definite: H[", i, ", ", i,
                "] = ", Hs(i, i), " < 0");
    if (Hs(i, i) == 0.0) {
      dead[static_cast<std::size_t>(i)] = 1;
      Hs(i, i) = 1.0;
      ++res.dead_columns;
    }
  }
  // 3. order
  res.perm.resize(cols);
  std::iota(res.perm.begin(), res.perm.end(), 0);
  if (p.act_order) {
    std::stable_sort(res.perm.begin(), res.perm.end(),
                     [&](std::int32_t a, std::int32_t b) { return Hs(a, a) > Hs(b, b); });
  }
  // 4. damping, 5. factor of the permuted inverse
  res.damp = p.percdamp * Hs.diagonal().mean();
  MatD Hp(n, n);
  for (Eigen::Index a = 0; a < n; ++a)
    for (Eigen::Index b = 0; b < n; ++b) Hp(b, a) = Hs(res.perm[b], res.perm[a]);
  Hp.diagonal().array() += res.damp;
  const MatD U = detail::gptq_inverse_factor(Hp, p.percdamp, p.num_threads);
  Hp.resize(0, 0);

  // Groups.
  const bool grouped = p.group_size > 0;
  const std::size_t gs = grouped ? static_cast<std::size_t>(p.group_size) : cols;
  res.num_groups = grouped ? (cols + gs - 1) / gs : 1;
  res.g_idx.resize(cols);
  const bool dynamic_groups = grouped && !p.static_groups;
  for (std::size_t j = 0; j < cols; ++j) {
    const std::size_t c = static_cast<std::size_t>(res.perm[j]);
    res.g_idx[c] = static_cast<std::int32_t>(!grouped ? 0 : (dynamic_groups ? j / gs : c / gs));
  }
  std::size_t bs = static_cast<std::size_t>(p.blocksize);
  if (dynamic_groups) bs = (bs + gs - 1) / gs * gs;  // whole groups per block (step 7)

  const std::size_t align = std::max<std::size_t>(1, quantizer.row_align());
  SQLLM_CHECK(rows % align == 0, "GPTQ: rows (", rows, ") must be a multiple of the quantizer's ",
              "row alignment ", align);
  const std::size_t chunk = std::max<std::size_t>(align, (p.row_chunk + align - 1) / align * align);
  const auto nchunks = static_cast<std::ptrdiff_t>((rows + chunk - 1) / chunk);
  std::vector<double> err_sq(rows, 0.0), dw_pen(rows, 0.0);
  std::exception_ptr error;

#ifdef _OPENMP
  const int nt = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
  for (std::ptrdiff_t c = 0; c < nchunks; ++c) {
    try {
      const std::size_t r0 = static_cast<std::size_t>(c) * chunk;
      const auto m = static_cast<Eigen::Index>(std::min(chunk, rows - r0));
      // This chunk's rows, original column order, dead columns zeroed.
      MatD W0(m, n);
      for (Eigen::Index r = 0; r < m; ++r)
        for (Eigen::Index i = 0; i < n; ++i)
          W0(r, i) = dead[static_cast<std::size_t>(i)]
                         ? 0.0
                         : static_cast<double>(W[(r0 + static_cast<std::size_t>(r)) * cols +
                                                 static_cast<std::size_t>(i)]);
      // 2. static groups: fitted on the unpermuted weight.
      if (grouped && p.static_groups) {
        for (std::size_t g = 0; g < res.num_groups; ++g) {
          const std::size_t i0 = g * gs, len = std::min(gs, cols - i0);
          quantizer.begin_group(g, r0, W0.middleCols(static_cast<Eigen::Index>(i0),
                                                      static_cast<Eigen::Index>(len)));
        }
      }
      MatD Wc(m, n), Q(m, n);
      for (Eigen::Index j = 0; j < n; ++j) Wc.col(j) = W0.col(res.perm[j]);
      if (!grouped) quantizer.begin_group(0, r0, Wc);
      std::vector<double> qcol(static_cast<std::size_t>(m));
      MatD Err(m, static_cast<Eigen::Index>(std::min(bs, cols)));
      double* errsq = &err_sq[r0];
      for (std::size_t i1 = 0; i1 < cols; i1 += bs) {
        const std::size_t i2 = std::min(cols, i1 + bs);
        for (std::size_t j = i1; j < i2; ++j) {
          const auto jj = static_cast<Eigen::Index>(j);
          if (dynamic_groups && j % gs == 0)
            quantizer.begin_group(j / gs, r0, Wc.middleCols(jj, static_cast<Eigen::Index>(std::min(gs, cols - j))));
          const std::size_t col = static_cast<std::size_t>(res.perm[j]);
          const std::size_t g = static_cast<std::size_t>(res.g_idx[col]);
          double* w = Wc.col(jj).data();
          quantizer.quantize_column(g, col, r0, static_cast<std::size_t>(m), w, qcol.data());
          const double d = U(jj, jj);
          double* e = Err.col(static_cast<Eigen::Index>(j - i1)).data();
          for (Eigen::Index r = 0; r < m; ++r) {
            Q(r, jj) = qcol[static_cast<std::size_t>(r)];
            e[r] = (w[r] - qcol[static_cast<std::size_t>(r)]) / d;
            errsq[r] += e[r] * e[r];
          }
          for (std::size_t k = j + 1; k < i2; ++k) {
            const double u = U(jj, static_cast<Eigen::Index>(k));
            double* wk = Wc.col(static_cast<Eigen::Index>(k)).data();
            for (Eigen::Index r = 0; r < m; ++r) wk[r] -= e[r] * u;
          }
        }
        if (i2 < cols) {
          const auto b0 = static_cast<Eigen::Index>(i1), nb = static_cast<Eigen::Index>(i2 - i1);
          const auto rest = n - static_cast<Eigen::Index>(i2);
          Wc.rightCols(rest).noalias() -= Err.leftCols(nb) * U.block(b0, b0 + nb, nb, rest);
        }
      }
      // proxy error: sum err^2 = tr(dW Hd dW^T) for the damped, dead-fixed H;
      // remove the damping and the dead columns' unit diagonal.
      for (Eigen::Index j = 0; j < n; ++j) {
        const std::size_t col = static_cast<std::size_t>(res.perm[j]);
        const double extra = res.damp + (dead[col] ? 1.0 : 0.0);
        for (Eigen::Index r = 0; r < m; ++r) {
          const double dw = W0(r, res.perm[j]) - Q(r, j);
          dw_pen[r0 + static_cast<std::size_t>(r)] += extra * dw * dw;
        }
      }
      if (q_out != nullptr) {
        for (Eigen::Index r = 0; r < m; ++r)
          for (Eigen::Index j = 0; j < n; ++j)
            q_out[(r0 + static_cast<std::size_t>(r)) * cols + static_cast<std::size_t>(res.perm[j])] =
                static_cast<float>(Q(r, j));
      }
    } catch (...) {
#ifdef _OPENMP
#pragma omp critical
#endif
      error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  double total = 0.0;
  for (std::size_t r = 0; r < rows; ++r) total += err_sq[r] - dw_pen[r];
  // For a dead column the engine's dW is (0 - q); W's own values there do not
  // matter since H's row and column are zero.  Clamp the tiny negative values
  // rounding can leave when the error is ~0.
  res.proxy_error = std::max(total, 0.0);
  return res;
}

/// Column quantizer for per-row lookup tables (SqueezeLLM's format): the
/// code of a weight is the index of the nearest entry of its row's table
/// (ties: the lower index).  Tables are given (rows x K, row-major).
struct LutColumnQuantizer {
  const float* tables = nullptr;  ///< rows x K
  std::size_t K = 0;
  std::size_t cols = 0;
  std::uint8_t* codes = nullptr;  ///< rows x cols, written

  std::size_t row_align() const { return 1; }
  void begin_group(std::size_t, std::size_t, const Eigen::Ref<const Eigen::MatrixXd>&) {}
  void quantize_column(std::size_t, std::size_t col, std::size_t r0, std::size_t n,
                       const double* w, double* q) {
    for (std::size_t r = 0; r < n; ++r) {
      const float* t = tables + (r0 + r) * K;
      std::size_t best = 0;
      double bd = std::abs(w[r] - static_cast<double>(t[0]));
      for (std::size_t k = 1; k < K; ++k) {
        const double dd = std::abs(w[r] - static_cast<double>(t[k]));
        if (dd < bd) {
          bd = dd;
          best = k;
        }
      }
      codes[(r0 + r) * cols + col] = static_cast<std::uint8_t>(best);
      q[r] = static_cast<double>(t[best]);
    }
  }
};

}  // namespace sqllm
