// sqllm/reference/kmeans1d_brute.hpp -- plain oracles for weighted 1-D k-means.
//
// Test-only scalar references for sqllm/kmeans1d.hpp, written for clarity, not
// speed.  Both use the weights the library uses (all zero or nullptr -> equal
// weights) and compute every cluster cost directly by a two-pass weighted mean
// (no prefix sums), so they share no arithmetic shortcut with the optimised
// code.
//  * kmeans1d_brute_sse: enumerates every partition of the sorted distinct
//    values into min(k, m) contiguous non-empty groups -- exponential, n <= ~16.
//    An optimal 1-D clustering is contiguous in sorted order, so this is the
//    global optimum.
//  * kmeans1d_dp_quadratic_sse: the textbook O(k m^2) dynamic program without
//    any split-index optimisation over a table of two-pass cluster costs
//    (O(m^3) to fill), for medium sizes (m up to a few hundred).
#pragma once

#include <algorithm>
#include <cstddef>
#include <limits>
#include <utility>
#include <vector>

namespace sqllm {
namespace reference {

namespace detail {

/// Sorted distinct values and their summed weights (weights as the library uses them).
template <class T>
void kmeans1d_distinct(const T* x, const T* w, std::size_t n, std::vector<double>* v,
                       std::vector<double>* wt) {
  double sw = 0;
  if (w != nullptr) {
    for (std::size_t i = 0; i < n; ++i) sw += static_cast<double>(w[i]);
  }
  const bool use_w = w != nullptr && sw > 0;
  std::vector<std::pair<double, double>> p(n);
  for (std::size_t i = 0; i < n; ++i) {
    p[i] = {static_cast<double>(x[i]), use_w ? static_cast<double>(w[i]) : 1.0};
  }
  std::sort(p.begin(), p.end());
  v->clear();
  wt->clear();
  for (const auto& e : p) {
    if (v->empty() || e.first != v->back()) {
      v->push_back(e.first);
      wt->push_back(0.0);
    }
    wt->back() += e.second;
  }
}

/// Weighted SSE of the distinct points [a, b) around their weighted mean
/// (0 when their weight is 0).
inline double kmeans1d_group_sse(const std::vector<double>& v, const std::vector<double>& wt,
                                 std::size_t a, std::size_t b) {
  double sw = 0, swx = 0;
  for (std::size_t g = a; g < b; ++g) {
    sw += wt[g];
    swx += wt[g] * v[g];
  }
  if (!(sw > 0)) return 0.0;
  const double mean = swx / sw;
  double e = 0;
  for (std::size_t g = a; g < b; ++g) e += wt[g] * (v[g] - mean) * (v[g] - mean);
  return e;
}

inline void kmeans1d_enumerate(const std::vector<double>& v, const std::vector<double>& wt,
                               std::size_t start, std::size_t groups_left, double acc,
                               double* best) {
  const std::size_t m = v.size();
  if (groups_left == 1) {
    *best = std::min(*best, acc + kmeans1d_group_sse(v, wt, start, m));
    return;
  }
  // the current group is [start, end); leave at least one value per later group
  for (std::size_t end = start + 1; end + groups_left - 1 <= m; ++end) {
    kmeans1d_enumerate(v, wt, end, groups_left - 1, acc + kmeans1d_group_sse(v, wt, start, end),
                       best);
  }
}

}  // namespace detail

/// Globally optimal weighted SSE with k clusters by exhaustive enumeration.
template <class T>
double kmeans1d_brute_sse(const T* x, const T* w, std::size_t n, int k) {
  std::vector<double> v, wt;
  detail::kmeans1d_distinct(x, w, n, &v, &wt);
  const std::size_t groups = std::min<std::size_t>(static_cast<std::size_t>(k), v.size());
  double best = std::numeric_limits<double>::infinity();
  detail::kmeans1d_enumerate(v, wt, 0, groups, 0.0, &best);
  return best;
}

/// Globally optimal weighted SSE with k clusters by the plain O(k m^2) DP.
template <class T>
double kmeans1d_dp_quadratic_sse(const T* x, const T* w, std::size_t n, int k) {
  std::vector<double> v, wt;
  detail::kmeans1d_distinct(x, w, n, &v, &wt);
  const std::size_t m = v.size();
  const std::size_t groups = std::min<std::size_t>(static_cast<std::size_t>(k), m);
  const double inf = std::numeric_limits<double>::infinity();
  // D[j]: best cost of the first j distinct values in q groups
  std::vector<double> cost((m + 1) * (m + 1), 0.0);  // cost[i*(m+1)+j]: group [i, j)
  for (std::size_t i = 0; i < m; ++i) {
    for (std::size_t j = i + 1; j <= m; ++j) cost[i * (m + 1) + j] = detail::kmeans1d_group_sse(v, wt, i, j);
  }
  std::vector<double> D(m + 1, inf), E(m + 1, inf);
  D[0] = 0;
  for (std::size_t q = 1; q <= groups; ++q) {
    std::fill(E.begin(), E.end(), inf);
    for (std::size_t j = q; j <= m; ++j) {
      for (std::size_t i = q - 1; i < j; ++i) {
        if (D[i] == inf) continue;
        E[j] = std::min(E[j], D[i] + cost[i * (m + 1) + j]);
      }
    }
    std::swap(D, E);
  }
  return D[m];
}

}  // namespace reference
}  // namespace sqllm
