// sqllm/sparse.hpp -- Dense-and-Sparse decomposition (SqueezeLLM, seed 001).
//
// A small fraction of a weight matrix is kept exactly in a sparse fp16 CSR
// matrix (csr.hpp) and the rest is quantized.  Two kinds of values are kept:
//
//  * magnitude outliers: the values outside a per-layer range [t_lo, t_hi]
//    chosen so that `outlier_count` values fall outside it, half from each
//    tail (the smallest and the largest values);
//  * sensitive values: among the rest, the `sensitive_count` values with the
//    largest sensitivity (Fisher diagonal).
//
// Selection is deterministic: ties are broken by the flat index (lower first).
// The kept values get zero weight in the k-means (nuq.hpp `keep` mask), so
// they do not pull the lookup tables, and still receive the nearest code.
// The sparse part stores, for each kept position, the residual W - Ŵ_dense
// rounded to fp16, so that dense + sparse reproduces W up to that rounding
// (sqllm's own format; upstream SqueezeLLM stores W minus the centroid
// nearest 0 -- see docs/formats.md for the conversion).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include "sqllm/csr.hpp"
#include "sqllm/error.hpp"
#include "sqllm/half.hpp"
#include "sqllm/nuq.hpp"
#include "sqllm/packing.hpp"

namespace sqllm {

/// Budgets of the sparse part for a matrix of n values.
struct SparseBudget {
  std::size_t outliers = 0;
  std::size_t sensitive = 0;
};

/// Split `fraction` of n values into outlier and sensitive budgets.
/// `sensitive_share` in [0, 1] is the share of the budget given to sensitive
/// values (SqueezeLLM's 0.45% = 0.40% outliers + 0.05% sensitive: share 1/9).
inline SparseBudget sparse_budget(std::size_t n, double fraction, double sensitive_share,
                                  bool have_sensitivity) {
  SQLLM_CHECK(fraction >= 0.0 && fraction < 1.0, "sparsity must be in [0, 1), got ", fraction);
  SQLLM_CHECK(sensitive_share >= 0.0 && sensitive_share <= 1.0,
              "sensitive_fraction must be in [0, 1], got ", sensitive_share);
  const auto total = static_cast<std::size_t>(std::llround(fraction * static_cast<double>(n)));
  SparseBudget b;
  b.sensitive = have_sensitivity
                    ? static_cast<std::size_t>(std::llround(sensitive_share * static_cast<double>(total)))
                    : 0;
  b.outliers = total - b.sensitive;
  return b;
}

/// Mark the kept positions of W (n values, any shape, row-major) in keep[n].
/// S may be nullptr (then the whole budget goes to outliers).
inline void sparse_select(const float* W, const float* S, std::size_t n, const SparseBudget& b,
                          std::uint8_t* keep) {
  SQLLM_CHECK(b.outliers + b.sensitive <= n, "sparse budget ", b.outliers + b.sensitive,
              " exceeds the number of weights ", n);
  for (std::size_t i = 0; i < n; ++i) {
    SQLLM_CHECK(std::isfinite(W[i]), "weight has a non-finite value (NaN or Inf) at flat index ", i);
    if (S) SQLLM_CHECK(std::isfinite(S[i]) && S[i] >= 0.0f, "sensitivity must be finite and >= 0, got ", S[i], " at flat index ", i);
    keep[i] = 0;
  }
  std::vector<std::uint32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0u);
  // Outliers: the lo smallest and hi largest values (by value, index tie-break).
  const std::size_t lo = b.outliers / 2, hi = b.outliers - b.outliers / 2;
  auto by_value = [W](std::uint32_t a, std::uint32_t c) {
    return W[a] < W[c] || (W[a] == W[c] && a < c);
  };
  if (lo > 0) {
    std::nth_element(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(lo - 1), idx.end(), by_value);
    for (std::size_t k = 0; k < lo; ++k) keep[idx[k]] = 1;
  }
  if (hi > 0) {
    // The exact reverse of by_value, so the two tails are disjoint whenever
    // lo + hi <= n (checked above), ties included.
    auto by_value_desc = [W](std::uint32_t a, std::uint32_t c) {
      return W[a] > W[c] || (W[a] == W[c] && a > c);
    };
    std::iota(idx.begin(), idx.end(), 0u);
    std::nth_element(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(hi - 1), idx.end(),
                     by_value_desc);
    for (std::size_t k = 0; k < hi; ++k) keep[idx[k]] = 1;
  }
  // Sensitive values among the rest.
  if (b.sensitive > 0 && S != nullptr) {
    std::vector<std::uint32_t> rest;
    rest.reserve(n);
    for (std::uint32_t i = 0; i < n; ++i)
      if (!keep[i]) rest.push_back(i);
    const std::size_t m = std::min(b.sensitive, rest.size());
    auto by_sens = [S](std::uint32_t a, std::uint32_t c) {
      return S[a] > S[c] || (S[a] == S[c] && a < c);
    };
    std::nth_element(rest.begin(), rest.begin() + static_cast<std::ptrdiff_t>(m - 1), rest.end(), by_sens);
    for (std::size_t k = 0; k < m; ++k) keep[rest[k]] = 1;
  }
}

/// The sparse part for a quantized matrix: for every kept (o, i) the residual
/// W[o,i] - Ŵ_dense[o,i] in fp16, as CSR.  Outputs are resized.
inline void sparse_residual(const float* W, const std::uint32_t* packed, const float* tables,
                            const std::uint8_t* keep, std::size_t out, std::size_t in, int bits,
                            GroupAxis axis, std::vector<std::int32_t>& row_ptr,
                            std::vector<std::int32_t>& col_idx,
                            std::vector<std::uint16_t>& values) {
  check_bits(bits);
  SQLLM_CHECK(in <= static_cast<std::size_t>(INT32_MAX), "in_features too large for int32 CSR");
  const std::size_t K = std::size_t{1} << bits;
  const std::size_t words = packed_words(in, bits);
  row_ptr.assign(out + 1, 0);
  col_idx.clear();
  values.clear();
  for (std::size_t o = 0; o < out; ++o) {
    for (std::size_t i = 0; i < in; ++i) {
      if (!keep[o * in + i]) continue;
      const std::uint32_t c = get_code(packed + o * words, i, bits);
      const float dense = axis == GroupAxis::Row ? tables[o * K + c] : tables[i * K + c];
      col_idx.push_back(static_cast<std::int32_t>(i));
      values.push_back(float_to_half_bits(W[o * in + i] - dense));
    }
    SQLLM_CHECK(col_idx.size() <= static_cast<std::size_t>(INT32_MAX), "too many sparse values");
    row_ptr[o + 1] = static_cast<std::int32_t>(col_idx.size());
  }
}

}  // namespace sqllm
