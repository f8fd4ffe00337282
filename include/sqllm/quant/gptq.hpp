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
  /// Use H's own memory as the engine's n x n working matrix: no second n x n
  /// matrix (0.97 GB for an 11008-wide down_proj), H's contents are destroyed.
  /// Only for a caller that owns H and passes it as writable memory (the
  /// pointer is const only so that one signature serves both modes).  Done
  /// only when H is aligned as Eigen aligns its own matrices (torch's CPU
  /// allocations are): Eigen's vectorised reductions split sums by the
  /// address, so the result would otherwise depend on where H lies.  Else the
  /// engine copies; either way the result is bit-identical to not asking.
  bool overwrite_hessian = false;
};

/// What the engine reports besides the quantizer's own state.
struct GptqResult {
  std::vector<std::int32_t> perm;   ///< perm[j]: the original column quantized j-th
  std::vector<std::int32_t> g_idx;  ///< group of every original column
  std::size_t num_groups = 1;
  double proxy_error = 0.0;         ///< tr((W - Q) H (W - Q)^T), H as given
  std::size_t dead_columns = 0;     ///< columns with H_ii == 0
  double damp = 0.0;                ///< the absolute damping added to the diagonal
  bool hessian_overwritten = false; ///< H's memory was used (GptqParams::overwrite_hessian)
};

namespace detail {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;  // column-major

/// In place: A holds the reversed, damped Hessian J H J (J the exchange
/// matrix; only its lower triangle is read).  On return A's upper triangle
/// holds U with H^-1 = U^T U, U upper triangular; its strict lower triangle
/// is scratch.  One n x n matrix in all (the 11008-wide down_proj of a 7B
/// model: 0.97 GB instead of five times that).  Throws sqllm::Error when H is
/// not positive definite.
///
/// H = V V^T with V upper  <=>  J H J = (J V J)(J V J)^T with J V J lower, so
/// U = V^-1 = J L^-1 J for the Cholesky factor L of J H J.  L^-1 is formed in
/// place by column blocks from the bottom right: with the trailing block
/// already inverted, [[L11, 0], [L21, L22]]^-1 has the blocks L11^-1 and
/// -L22^-1 L21 L11^-1.  The products are split into row blocks of a fixed
/// size, so the result does not depend on the number of threads.
inline void gptq_inverse_factor_inplace(Eigen::Ref<MatD> A, double percdamp, int num_threads) {
  const Eigen::Index n = A.rows();
  Eigen::LLT<Eigen::Ref<MatD>> llt(A);
  const bool ok = llt.info() == Eigen::Success && A.diagonal().minCoeff() > 0.0 &&
                  A.diagonal().allFinite();
  SQLLM_CHECK(ok, "GPTQ: the Hessian is not positive definite even after damping (percdamp=",
              percdamp, "); it must be a positive multiple of X^T X -- check for NaN/Inf inputs, "
              "a negative diagonal, or raise percdamp");
  constexpr Eigen::Index NB = 64;   // columns per block
  constexpr Eigen::Index RB = 256;  // rows per unit of parallel work
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#endif
  (void)num_threads;
  MatD X, Y;
  for (Eigen::Index c0 = ((n - 1) / NB) * NB; c0 >= 0; c0 -= NB) {
    const Eigen::Index nb = std::min(NB, n - c0), c1 = c0 + nb, m = n - c1;
    const MatD inv11 = A.block(c0, c0, nb, nb).triangularView<Eigen::Lower>().solve(MatD::Identity(nb, nb));
    if (m > 0) {
      X = A.block(c1, c0, m, nb);  // L21
      Y.resize(m, nb);
      const Eigen::Index nrb = (m + RB - 1) / RB;
      std::exception_ptr error;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
      for (Eigen::Index rb = 0; rb < nrb; ++rb) {
        try {
          // Rows [r0, r1) of L22^-1 L21: a rectangle left of the diagonal
          // block plus that lower-triangular block.
          const Eigen::Index r0 = rb * RB, r1 = std::min(m, r0 + RB), h = r1 - r0;
          auto y = Y.middleRows(r0, h);
          y.noalias() = A.block(c1 + r0, c1 + r0, h, h).triangularView<Eigen::Lower>() * X.middleRows(r0, h);
          if (r0 > 0) y.noalias() += A.block(c1 + r0, c1, h, r0) * X.topRows(r0);
        } catch (...) {
#ifdef _OPENMP
#pragma omp critical
#endif
          error = std::current_exception();
        }
      }
      if (error) std::rethrow_exception(error);
      A.block(c1, c0, m, nb).noalias() = -Y * inv11.triangularView<Eigen::Lower>();
    }
    A.block(c0, c0, nb, nb).triangularView<Eigen::Lower>() = inv11;
  }
  A.reverseInPlace();  // U = J L^-1 J: the lower triangle of L^-1 becomes the upper one
  bool finite = true;  // the upper triangle, without a dense copy of it
  for (Eigen::Index j = 0; j < n && finite; ++j) finite = A.col(j).head(j + 1).allFinite();
  SQLLM_CHECK(finite,
              "GPTQ: the inverse Hessian factor is not finite (the Hessian is too "
              "ill-conditioned); raise percdamp (got ", percdamp, ")");
}

/// In place on a symmetric-in-intent n x n matrix H (row-major; only the
/// average of H and H^T matters): H becomes S with S(i, j) =
/// (H(s_i, s_j) + H(s_j, s_i)) / 2, s_i = perm[n - 1 - i] -- the symmetrised
/// Hessian with act-order's permutation and the reversal of
/// gptq_inverse_factor_inplace applied, the same values the copying path
/// builds.  Permutes rows by cycles, transposes, permutes rows again: O(n)
/// extra memory.
inline void symmetric_permute_inplace(double* H, std::size_t n, const std::vector<std::int32_t>& perm,
                                      int num_threads) {
  Eigen::Map<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> A(
      H, static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(n));
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 64) num_threads(nt)
#endif
  for (Eigen::Index a = 0; a < A.rows(); ++a)
    for (Eigen::Index b = a + 1; b < A.cols(); ++b) {
      const double v = 0.5 * (A(a, b) + A(b, a));
      A(a, b) = v;
      A(b, a) = v;
    }
  (void)num_threads;
  std::vector<std::size_t> src(n);  // new row i = old row src[i]
  for (std::size_t i = 0; i < n; ++i) src[i] = static_cast<std::size_t>(perm[n - 1 - i]);
  Eigen::RowVectorXd tmp(static_cast<Eigen::Index>(n));
  auto permute_rows = [&]() {
    std::vector<char> done(n, 0);
    for (std::size_t start = 0; start < n; ++start) {
      if (done[start]) continue;
      tmp = A.row(static_cast<Eigen::Index>(start));
      std::size_t j = start;
      while (src[j] != start) {
        A.row(static_cast<Eigen::Index>(j)) = A.row(static_cast<Eigen::Index>(src[j]));
        done[j] = 1;
        j = src[j];
      }
      A.row(static_cast<Eigen::Index>(j)) = tmp;
      done[j] = 1;
    }
  };
  permute_rows();       // P H
  A.transposeInPlace();  // (P H)^T = H P^T  (H symmetric)
  permute_rows();       // P H P^T
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
  // H is read in place (never copied): its diagonal here, the symmetrised,
  // permuted, damped and reversed copy A below is the engine's one n x n
  // working matrix.
  auto h_at = [&](std::size_t a, std::size_t b) { return 0.5 * (H[a * cols + b] + H[b * cols + a]); };

  GptqResult res;
  // 1. dead columns
  std::vector<char> dead(cols, 0);
  std::vector<double> diag(cols);
  for (std::size_t i = 0; i < cols; ++i) {
    diag[i] = H[i * cols + i];
    SQLLM_CHECK(diag[i] >= 0.0, "GPTQ: the Hessian is not positive semi-definite: H[", i, ", ", i,
                "] = ", diag[i], " < 0");
    if (diag[i] == 0.0) {
      dead[i] = 1;
      diag[i] = 1.0;
      ++res.dead_columns;
    }
  }
  // 3. order
  res.perm.resize(cols);
  std::iota(res.perm.begin(), res.perm.end(), 0);
  if (p.act_order) {
    std::stable_sort(res.perm.begin(), res.perm.end(),
                     [&](std::int32_t a, std::int32_t b) { return diag[a] > diag[b]; });
  }
  // 4. damping, 5. factor of the permuted inverse
  res.damp = p.percdamp * Eigen::Map<const Eigen::VectorXd>(diag.data(), n).mean();
  // U: first J P^T H P J + damp I (lower triangle), then the factor in place.
  // A copy of H's entries, or, with overwrite_hessian, H's own memory.
  MatD U_own;
  double* u_mem;
  constexpr std::uintptr_t kAlign = EIGEN_MAX_ALIGN_BYTES > 0 ? EIGEN_MAX_ALIGN_BYTES : 1;
  res.hessian_overwritten =
      p.overwrite_hessian && reinterpret_cast<std::uintptr_t>(H) % kAlign == 0;
  if (res.hessian_overwritten) {
    u_mem = const_cast<double*>(H);  // the caller owns H and gave it up (GptqParams)
    detail::symmetric_permute_inplace(u_mem, cols, res.perm, p.num_threads);
    for (Eigen::Index a = 0; a < n; ++a)
      u_mem[static_cast<std::size_t>(a) * (cols + 1)] =
          diag[static_cast<std::size_t>(res.perm[static_cast<std::size_t>(n - 1 - a)])] + res.damp;
  } else {
    U_own.resize(n, n);
#ifdef _OPENMP
    const int nt = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
    for (Eigen::Index a = 0; a < n; ++a) {
      const auto pa = static_cast<std::size_t>(res.perm[static_cast<std::size_t>(a)]);
      for (Eigen::Index b = a; b < n; ++b) {
        const auto pb = static_cast<std::size_t>(res.perm[static_cast<std::size_t>(b)]);
        const double v = a == b ? diag[pa] + res.damp : h_at(pb, pa);
        U_own(n - 1 - a, n - 1 - b) = v;  // (b, a) with b >= a lands in the lower triangle
      }
    }
    u_mem = U_own.data();
  }
  Eigen::Map<MatD> U(u_mem, n, n);
  detail::gptq_inverse_factor_inplace(U, p.percdamp, p.num_threads);

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
