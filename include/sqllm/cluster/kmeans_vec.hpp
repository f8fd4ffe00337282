// sqllm/cluster/kmeans_vec.hpp -- weighted k-means on short vectors (v = 2..16).
//
// The codebooks of vector quantization (VPTQ): n points of dimension v, each
// with a non-negative sample weight w_i, k centroids (k up to 65536 and more),
// minimising J = sum_i w_i * ||x_i - c_{a(i)}||^2 by Lloyd iterations.
//
// Distances.  The inner dimension is tiny, so a GEMM would spend its time
// writing and re-reading an n x k distance matrix; instead a register-blocked
// kernel (detail/kmeans_vec_kernel.hpp) keeps a block of 4 (AVX-512: 8)
// points against 8 (16) centroids in registers, accumulates ||c||^2 - 2 x.c
// and keeps a running arg-min per lane.  Nearest-centroid assignment for
// quantization is the same kernel (vec_nearest).  The objective is recomputed
// exactly in double from the assignment.  After the first assignment the
// search can skip centroids by the triangle inequality around each point's
// previous centroid (VecKmeansAssign::Pruned, detail/kmeans_vec_pruned.hpp):
// the same assignment bit for bit, faster for k >= 1024 at v <= 6.
//
// Determinism.  Assignment is per point; centroid sums visit each cluster's
// points in index order (a counting sort by cluster, then one cluster per
// task) and the objective is summed over fixed chunks in order, so the result
// is identical for any number of threads.  Ties go to the lower centroid index.
//
// Empty clusters (no point, or only zero-weight points) are repaired after
// each update: the point with the largest weighted distance to its centroid
// (ties: lower index) becomes the empty centroid, the next largest the next
// empty one, and so on.  This never raises J (no point is assigned to the
// new centroid until the next assignment step, which can only lower J).
//
// Convergence: stop after `iters` iterations, when no assignment changed, or
// when the relative decrease (J_prev - J) / J_prev falls to `tol` or below.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "sqllm/detail/kmeans_vec_kernel.hpp"
#include "sqllm/detail/kmeans_vec_pruned.hpp"
#include "sqllm/detail/kmeans_vec_yinyang.hpp"
#include "sqllm/error.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sqllm {

constexpr int kVecMinDim = 2;
constexpr int kVecMaxDim = 16;
/// Auto assignment uses the pruned search from this many centroids on, for vector
/// lengths up to kVecPrunedMaxDim (elsewhere it measured no faster than brute
/// force: docs/benchmarks.md, "#9 Vector k-means").
constexpr std::size_t kVecPrunedMinK = 1024;
constexpr int kVecPrunedMaxDim = 6;

enum class VecKmeansInit { Random, KMeansPlusPlus };

/// How each assignment step finds the nearest centroids.  Both give the same
/// assignment bit for bit (ties included); Pruned skips centroids by the
/// triangle inequality (detail/kmeans_vec_pruned.hpp) after the first assignment,
/// Auto picks it for k >= kVecPrunedMinK and v <= kVecPrunedMaxDim.  Yinyang carries
/// per-point group bounds across iterations (detail/kmeans_vec_yinyang.hpp): the same
/// assignment again, points whose centroid provably stays nearest cost O(groups).
enum class VecKmeansAssign { Auto, Brute, Pruned, Yinyang };

/// Options of vec_kmeans (documented defaults; no global state).
struct VecKmeansParams {
  std::size_t k = 256;                    ///< number of centroids (>= 1)
  int iters = 100;                        ///< maximum Lloyd iterations (>= 0): upstream's kiter
  double tol = 1e-5;                      ///< relative objective decrease that stops (>= 0): ktol
  VecKmeansInit init = VecKmeansInit::Random;
  std::uint64_t seed = 0;                 ///< seeds the initialisation
  int num_threads = 0;                    ///< OpenMP threads; <= 0: the OpenMP default
  const float* init_centroids = nullptr;  ///< optional k x v start (overrides `init`)
  VecKmeansAssign assign = VecKmeansAssign::Auto;  ///< search strategy (same result either way)
};

struct VecKmeansResult {
  std::vector<float> centroids;   ///< k x v, row-major
  std::vector<std::int32_t> assign;  ///< n: index of each point's centroid
  std::vector<double> objective;  ///< J after the initial assignment, then after each iteration
  int iterations = 0;             ///< Lloyd iterations run
  std::size_t repaired = 0;       ///< empty clusters repaired (all iterations)
  std::vector<double> assign_seconds;  ///< wall time of each assignment step (first: initial)
  double seconds = 0.0;           ///< wall time of the whole run (initialisation included)
};

namespace detail {

inline int vec_threads(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

inline void check_vec_input(const float* X, std::size_t n, int v, const float* weights) {
  SQLLM_CHECK(v >= kVecMinDim && v <= kVecMaxDim, "vector length must be in 2..16, got ", v);
  SQLLM_CHECK(n >= 1, "k-means needs at least one point");
  for (std::size_t i = 0; i < n * static_cast<std::size_t>(v); ++i)
    SQLLM_CHECK(std::isfinite(X[i]) && std::fabs(X[i]) < kVecMaxAbs,
                "k-means: point ", i / static_cast<std::size_t>(v), " is not finite or exceeds ",
                kVecMaxAbs, " in magnitude (value ", X[i], ")");
  if (weights != nullptr)
    for (std::size_t i = 0; i < n; ++i)
      SQLLM_CHECK(std::isfinite(weights[i]) && weights[i] >= 0.0f,
                  "k-means: sample weights must be finite and >= 0, got ", weights[i],
                  " at point ", i);
}

/// Exact weighted squared distance of every point to its assigned centroid
/// (double), summed over fixed chunks in order: deterministic.
inline double vec_objective(const float* X, std::size_t n, int v, const float* w, const float* C,
                            const std::int32_t* assign, std::vector<double>& per_point, int nt) {
  constexpr std::size_t CH = 4096;
  const std::size_t nch = (n + CH - 1) / CH;
  std::vector<double> part(nch, 0.0);
  per_point.resize(n);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
  for (std::ptrdiff_t c = 0; c < static_cast<std::ptrdiff_t>(nch); ++c) {
    double s = 0.0;
    const std::size_t i0 = static_cast<std::size_t>(c) * CH, i1 = std::min(n, i0 + CH);
    for (std::size_t i = i0; i < i1; ++i) {
      const float* x = X + i * static_cast<std::size_t>(v);
      const float* cc = C + static_cast<std::size_t>(assign[i]) * static_cast<std::size_t>(v);
      double d = 0.0;
      for (int t = 0; t < v; ++t) {
        const double e = static_cast<double>(x[t]) - static_cast<double>(cc[t]);
        d += e * e;
      }
      d *= (w != nullptr ? static_cast<double>(w[i]) : 1.0);
      per_point[i] = d;
      s += d;
    }
    part[static_cast<std::size_t>(c)] = s;
  }
  (void)nt;
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

/// Weighted k-means++ seeding: the first centre with probability
/// proportional to w, each next one proportional to w * D^2.
inline void vec_kmeanspp(const float* X, std::size_t n, int v, const float* w, std::size_t k,
                         std::mt19937_64& rng, float* C, int nt) {
  const std::size_t V = static_cast<std::size_t>(v);
  std::vector<double> d2(n, std::numeric_limits<double>::infinity());
  constexpr std::size_t CH = 4096;
  const std::size_t nch = (n + CH - 1) / CH;
  std::vector<double> part(nch);
  auto uniform = [&rng]() { return static_cast<double>(rng() >> 11) * 0x1.0p-53; };
  auto weight = [w](std::size_t i) { return w != nullptr ? static_cast<double>(w[i]) : 1.0; };
  // Sample an index with probability proportional to p(i); p all zero -> uniform.
  auto sample = [&](auto p) -> std::size_t {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
    for (std::ptrdiff_t c = 0; c < static_cast<std::ptrdiff_t>(nch); ++c) {
      double s = 0.0;
      const std::size_t i0 = static_cast<std::size_t>(c) * CH, i1 = std::min(n, i0 + CH);
      for (std::size_t i = i0; i < i1; ++i) s += p(i);
      part[static_cast<std::size_t>(c)] = s;
    }
    double total = 0.0;
    for (double s : part) total += s;
    const double u = uniform();
    if (!(total > 0.0)) return std::min(n - 1, static_cast<std::size_t>(u * static_cast<double>(n)));
    double target = u * total;
    std::size_t c = 0;
    for (; c + 1 < nch && target >= part[c]; ++c) target -= part[c];
    const std::size_t i0 = c * CH, i1 = std::min(n, i0 + CH);
    std::size_t last = i0;
    for (std::size_t i = i0; i < i1; ++i) {
      const double pi = p(i);
      if (pi > 0.0) {
        last = i;
        if (target < pi) return i;
        target -= pi;
      }
    }
    return last;  // rounding ran past the end: the last point with mass
  };
  std::size_t pick = sample([&](std::size_t i) { return weight(i); });
  for (std::size_t j = 0; j < k; ++j) {
    std::copy(X + pick * V, X + pick * V + V, C + j * V);
    if (j + 1 == k) break;
    const float* c = C + j * V;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
    for (std::ptrdiff_t i = 0; i < static_cast<std::ptrdiff_t>(n); ++i) {
      const float* x = X + static_cast<std::size_t>(i) * V;
      double d = 0.0;
      for (std::size_t t = 0; t < V; ++t) {
        const double e = static_cast<double>(x[t]) - static_cast<double>(c[t]);
        d += e * e;
      }
      if (d < d2[static_cast<std::size_t>(i)]) d2[static_cast<std::size_t>(i)] = d;
    }
    pick = sample([&](std::size_t i) { return weight(i) * d2[i]; });
  }
}

}  // namespace detail

/// Nearest centroid (squared L2; ties: the lower index) of each of n points.
/// X n x v, C k x v (row-major); writes idx[n] and, when not nullptr, the
/// squared distances dist[n] (float).  Runs on `num_threads` OpenMP threads
/// (1: no parallel region, for callers that are already parallel).
inline void vec_nearest(const float* X, std::size_t n, int v, const float* C, std::size_t k,
                        std::int32_t* idx, float* dist = nullptr, int num_threads = 0) {
  SQLLM_CHECK(v >= kVecMinDim && v <= kVecMaxDim, "vector length must be in 2..16, got ", v);
  SQLLM_CHECK(k >= 1, "nearest centroid: k must be >= 1");
  SQLLM_CHECK(k <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
              "nearest centroid: k too large (", k, ")");
  std::vector<float> tiles;
  detail::vec_tile_centroids(C, k, v, tiles);
  detail::vec_nearest_tiled(X, n, v, tiles.data(), k, idx, dist, detail::vec_threads(num_threads));
}

/// Weighted k-means of n points of dimension v (X n x v row-major; weights
/// n values >= 0, or nullptr for all ones).  See the file comment.
inline VecKmeansResult vec_kmeans(const float* X, std::size_t n, int v, const float* weights,
                                  const VecKmeansParams& p) {
  detail::check_vec_input(X, n, v, weights);
  SQLLM_CHECK(p.k >= 1, "k-means: k must be >= 1, got ", p.k);
  SQLLM_CHECK(p.k <= (std::size_t{1} << 24), "k-means: k must be <= 2^24, got ", p.k);
  SQLLM_CHECK(p.iters >= 0, "k-means: iters must be >= 0, got ", p.iters);
  SQLLM_CHECK(std::isfinite(p.tol) && p.tol >= 0.0, "k-means: tol must be finite and >= 0, got ",
              p.tol);
  const std::size_t V = static_cast<std::size_t>(v), k = p.k;
  const int nt = detail::vec_threads(p.num_threads);
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  auto since = [](clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); };
  VecKmeansResult res;
  res.centroids.assign(k * V, 0.0f);
  res.assign.assign(n, 0);
  float* C = res.centroids.data();

  // Initialisation.
  std::mt19937_64 rng(p.seed);
  if (p.init_centroids != nullptr) {
    for (std::size_t i = 0; i < k * V; ++i)
      SQLLM_CHECK(std::isfinite(p.init_centroids[i]), "k-means: init_centroids are not finite");
    std::copy(p.init_centroids, p.init_centroids + k * V, C);
  } else if (n <= k) {
    // Every point is a centroid (objective 0); the rest repeat the points cyclically.
    for (std::size_t j = 0; j < k; ++j) std::copy(X + (j % n) * V, X + (j % n) * V + V, C + j * V);
  } else if (p.init == VecKmeansInit::Random) {
    // k distinct points, uniformly (a partial Fisher-Yates shuffle).
    std::vector<std::size_t> ids(n);
    std::iota(ids.begin(), ids.end(), std::size_t{0});
    for (std::size_t j = 0; j < k; ++j) {
      const std::size_t r = j + static_cast<std::size_t>(rng() % (n - j));
      std::swap(ids[j], ids[r]);
      std::copy(X + ids[j] * V, X + ids[j] * V + V, C + j * V);
    }
  } else {
    detail::vec_kmeanspp(X, n, v, weights, k, rng, C, nt);
  }

  std::vector<float> tiles, dist(n);
  std::vector<double> per_point;
  std::vector<std::int32_t> prev(n);
  std::vector<std::size_t> count(k + 1), order(n);
  std::vector<char> empty(k);
  const bool pruned = p.assign == VecKmeansAssign::Pruned ||
                      (p.assign == VecKmeansAssign::Auto && k >= kVecPrunedMinK &&
                       v <= kVecPrunedMaxDim);
  const bool yinyang = p.assign == VecKmeansAssign::Yinyang;
  const bool bounded = pruned || yinyang;  // bounds carried across iterations
  detail::GuidedCentroids guided;
  detail::YinyangState yy;
  std::vector<double> lower(pruned ? n : 0);  // Hamerly bounds of the pruned search
  std::vector<float> C_old(bounded ? k * V : 0);
  // guess: nullptr for the first assignment (no previous one), else the previous
  // assignment; centroid j moved by at most drift[j] since `lower` was written.
  std::vector<float> drift(bounded ? k : 0);
  bool have_lower = false;
  auto assign_step = [&](const std::int32_t* guess) {
    const auto t0 = clock::now();
    if (yinyang) {
      detail::vec_assign_yinyang(X, n, v, C, k, yy, have_lower ? drift.data() : nullptr, guess,
                                 res.assign.data(), nt);
      have_lower = true;
      std::copy(C, C + k * V, C_old.begin());
    } else if (pruned && guess != nullptr) {
      // The first assignment has no guess: brute force (a guess from pivots measured slower).
      detail::vec_prepare_guided(C, k, v, guided);
      detail::vec_assign_guided(X, n, v, guided, guess, res.assign.data(), dist.data(), nt,
                                lower.data(), have_lower ? drift.data() : nullptr);
      have_lower = true;
      std::copy(C, C + k * V, C_old.begin());
    } else {
      detail::vec_tile_centroids(C, k, v, tiles);
      detail::vec_nearest_tiled(X, n, v, tiles.data(), k, res.assign.data(), dist.data(), nt);
    }
    res.assign_seconds.push_back(since(t0));
    return detail::vec_objective(X, n, v, weights, C, res.assign.data(), per_point, nt);
  };
  res.objective.push_back(assign_step(nullptr));
  if (n <= k && p.init_centroids == nullptr) {
    res.seconds = since(t_start);
    return res;
  }

  for (int it = 0; it < p.iters; ++it) {
    // Update: counting sort by cluster, then each cluster's weighted mean in index order.
    std::fill(count.begin(), count.end(), 0);
    for (std::size_t i = 0; i < n; ++i) ++count[static_cast<std::size_t>(res.assign[i]) + 1];
    for (std::size_t j = 0; j < k; ++j) count[j + 1] += count[j];
    {
      std::vector<std::size_t> pos(count.begin(), count.end() - 1);
      for (std::size_t i = 0; i < n; ++i) order[pos[static_cast<std::size_t>(res.assign[i])]++] = i;
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 256) num_threads(nt)
#endif
    for (std::ptrdiff_t jj = 0; jj < static_cast<std::ptrdiff_t>(k); ++jj) {
      const std::size_t j = static_cast<std::size_t>(jj);
      double s[kVecMaxDim] = {0.0};
      double ws = 0.0;
      for (std::size_t q = count[j]; q < count[j + 1]; ++q) {
        const std::size_t i = order[q];
        const double wi = weights != nullptr ? static_cast<double>(weights[i]) : 1.0;
        const float* x = X + i * V;
        for (std::size_t t = 0; t < V; ++t) s[t] += wi * static_cast<double>(x[t]);
        ws += wi;
      }
      empty[j] = !(ws > 0.0);
      if (ws > 0.0)
        for (std::size_t t = 0; t < V; ++t) C[j * V + t] = static_cast<float>(s[t] / ws);
    }
    // Repair empty clusters with the points farthest (weighted) from their centroids.
    std::vector<std::size_t> empties;
    for (std::size_t j = 0; j < k; ++j)
      if (empty[j]) empties.push_back(j);
    if (!empties.empty()) {
      std::vector<std::size_t> ids(n);
      std::iota(ids.begin(), ids.end(), std::size_t{0});
      const std::size_t m = std::min(empties.size(), n);
      std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(m), ids.end(),
                        [&](std::size_t a, std::size_t b) {
                          return per_point[a] > per_point[b] || (per_point[a] == per_point[b] && a < b);
                        });
      for (std::size_t e = 0; e < m; ++e)
        std::copy(X + ids[e] * V, X + ids[e] * V + V, C + empties[e] * V);
      res.repaired += m;
    }
    if (bounded && have_lower)  // how far each centroid moved (upper bounds), for the bound filters
      detail::vec_centroid_drift(C, C_old.data(), k, v, drift.data());
    std::copy(res.assign.begin(), res.assign.end(), prev.begin());
    const double before = res.objective.back();
    const double J = assign_step(prev.data());
    res.objective.push_back(J);
    res.iterations = it + 1;
    const bool same = std::equal(prev.begin(), prev.end(), res.assign.begin());
    if (same && empties.empty()) break;
    if (before > 0.0 && (before - J) <= p.tol * before) break;
    if (!(J > 0.0)) break;
  }
  res.seconds = since(t_start);
  return res;
}

}  // namespace sqllm
