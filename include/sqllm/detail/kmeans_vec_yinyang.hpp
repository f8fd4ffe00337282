// sqllm/detail/kmeans_vec_yinyang.hpp -- exact nearest-centroid assignment of
// a Lloyd iteration with Yinyang group bounds carried across iterations (not
// public API; VecKmeansAssign::Yinyang).
//
// Ding et al., "Yinyang K-Means" (ICML 2015), with the arithmetic of the
// brute-force kernel.  The centroids are split once, at the first assignment,
// into G <= kYyMaxGroups groups of S centroids (S a multiple of 16: whole
// SIMD tiles) by a k-d split of the initial centroids (compact groups; the
// grouping only affects speed, never the result).  Each point keeps one lower
// bound per group: of its distance to every centroid of the group but its own.
// After an update every bound drops by the largest move of a centroid of its
// group; a point then evaluates only the groups whose bound does not clear
// its distance to its own (moved) centroid, every centroid of such a group,
// and refreshes their bounds.  Points whose centroid provably stays nearest
// cost one distance and G subtractions: O(n G) instead of O(n k) per step.
// The first assignment (no bounds yet) searches the k-d split that made the
// groups, near side first: a subtree whose box lies farther than the best
// value found is skipped, and its groups get the box distance as their bound
// (v <= 8; above, every group is evaluated, blocks of points sharing tiles).
// Group minima are found without indices; the exact winner and the second
// value come from re-evaluating the groups that reach the minimum.
//
// Exactness.  The values compared are the brute-force kernel's, bit for bit:
// K(x, c) = fl(||c||^2) + sum_d fma(-2 c_d, x_d, .) in fp32 (the same tiles,
// reordered by group, ids in a lane row), and the winner is the
// lexicographic minimum of (K, index).  Bounds are on true distances, from a
// value K by sqrt(K + ||x||^2 - E) with E twice the kernel's rounding bound
// (detail/kmeans_vec_pruned.hpp: |K - (||x-c||^2 - ||x||^2)| <= E / 2); a group is
// skipped only when its bound exceeds sqrt(K_best + ||x||^2 + 2E), so every
// centroid in it has K strictly above K_best and can neither win nor tie.
// Bounds are stored in fp32 rounded down; a decayed bound is (l - d)(1 - 2^-20),
// clamped at 0, below the exact l - d whatever the rounding.  Each point's
// result depends only on its own arithmetic: any thread count gives the same
// assignment (tests/python/test_vptq_kmeans_yinyang.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "sqllm/detail/kmeans_vec_kernel.hpp"
#include "sqllm/detail/kmeans_vec_pruned.hpp"
#include "sqllm/error.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sqllm {
namespace detail {

/// At most this many groups (per-point bounds: n * G floats).
constexpr std::size_t kYyMaxGroups = 64;
/// The first assignment searches the k-d split of the groups up to this vector
/// length (above: every group, blocks of points sharing the tiles).
constexpr int kYyTreeMaxDim = 8;

struct YinyangState {
  std::size_t k = 0, n = 0, G = 0, S = 0;  ///< centroids, points, groups, group size
  std::vector<std::int32_t> perm;          ///< position -> centroid id (groups contiguous)
  std::vector<std::int32_t> group_of;      ///< centroid id -> group
  std::vector<float> lower;                ///< n x G bounds (true distances, fp32 rounded down)
  std::vector<float> tiles;                ///< centroid tiles in perm order
  std::vector<std::int32_t> ids;           ///< centroid id of each tile lane (padding: INT32_MAX)
  std::vector<float> norms;                ///< fl(||c_j||^2) by id, as the tiles hold them
  std::vector<float> gdrift;               ///< per group: largest drift of a member
  /// The k-d split that made the groups: node i splits coordinate dim at `split`
  /// (members of left <= split <= members of right, for the centroids the groups
  /// were made from); a child < 0 is the leaf of group -1 - child.  Groups
  /// [glo, ghi) lie below the node.
  struct Node {
    int dim;
    float split;
    int left, right;
    std::uint32_t glo, ghi;
  };
  std::vector<Node> nodes;
  int root = -1;
  bool have = false;                       ///< bounds valid for the last assignment
  std::size_t tile_begin(std::size_t g) const { return g * S / kVecLanes; }
  std::size_t tile_end(std::size_t g) const {
    return (std::min(k, (g + 1) * S) + kVecLanes - 1) / kVecLanes;
  }
};

/// Groups of S centroids (the last one possibly smaller) by recursive median
/// splits along the widest coordinate; ids sorted within a group.  Deterministic.
inline int yy_split(const float* C, std::size_t V, YinyangState& s, std::size_t lo, std::size_t hi) {
  const std::size_t S = s.S;
  if (hi - lo <= S) {
    std::sort(s.perm.begin() + static_cast<std::ptrdiff_t>(lo), s.perm.begin() + static_cast<std::ptrdiff_t>(hi));
    return -1 - static_cast<int>(lo / S);
  }
  std::size_t dim = 0;
  float widest = -1.0f;
  for (std::size_t d = 0; d < V; ++d) {
    float mn = std::numeric_limits<float>::infinity(), mx = -mn;
    for (std::size_t q = lo; q < hi; ++q) {
      const float c = C[static_cast<std::size_t>(s.perm[q]) * V + d];
      mn = std::min(mn, c);
      mx = std::max(mx, c);
    }
    if (mx - mn > widest) {
      widest = mx - mn;
      dim = d;
    }
  }
  const std::size_t m = (hi - lo + S - 1) / S;  // groups in the range (>= 2)
  const std::size_t mid = lo + (m / 2) * S;
  std::nth_element(s.perm.begin() + static_cast<std::ptrdiff_t>(lo),
                   s.perm.begin() + static_cast<std::ptrdiff_t>(mid),
                   s.perm.begin() + static_cast<std::ptrdiff_t>(hi), [&](std::int32_t a, std::int32_t b) {
                     const float ca = C[static_cast<std::size_t>(a) * V + dim];
                     const float cb = C[static_cast<std::size_t>(b) * V + dim];
                     return ca < cb || (ca == cb && a < b);
                   });
  const auto node = static_cast<int>(s.nodes.size());
  s.nodes.push_back({static_cast<int>(dim), C[static_cast<std::size_t>(s.perm[mid]) * V + dim], 0, 0,
                     static_cast<std::uint32_t>(lo / S), static_cast<std::uint32_t>((hi + S - 1) / S)});
  const int left = yy_split(C, V, s, lo, mid);
  const int right = yy_split(C, V, s, mid, hi);
  s.nodes[static_cast<std::size_t>(node)].left = left;
  s.nodes[static_cast<std::size_t>(node)].right = right;
  return node;
}

inline void yy_make_groups(const float* C, std::size_t k, int v, YinyangState& s) {
  const std::size_t tiles = (k + 15) / 16;
  s.k = k;
  s.S = 16 * ((tiles + kYyMaxGroups - 1) / kYyMaxGroups);
  s.G = (k + s.S - 1) / s.S;
  s.perm.resize(k);
  std::iota(s.perm.begin(), s.perm.end(), 0);
  s.nodes.clear();
  s.root = yy_split(C, static_cast<std::size_t>(v), s, 0, k);
  s.group_of.resize(k);
  for (std::size_t q = 0; q < k; ++q) s.group_of[static_cast<std::size_t>(s.perm[q])] = static_cast<std::int32_t>(q / s.S);
}

/// Tiles of the current centroids in group order (the brute-force kernel's entries).
inline void yy_build_tiles(const float* C, int v, YinyangState& s, double& c2max) {
  const std::size_t V = static_cast<std::size_t>(v), L = kVecLanes, k = s.k;
  const std::size_t nt = (k + L - 1) / L, stride = (V + 1) * L;
  s.tiles.assign(nt * stride, 0.0f);
  s.ids.assign(nt * L, std::numeric_limits<std::int32_t>::max());
  s.norms.resize(k);
  c2max = 0.0;
  for (std::size_t t = 0; t < nt; ++t)
    for (std::size_t lane = 0; lane < L; ++lane) s.tiles[t * stride + V * L + lane] = kVecPad;
  for (std::size_t q = 0; q < k; ++q) {
    const std::size_t j = static_cast<std::size_t>(s.perm[q]), t = q / L, lane = q % L;
    double nrm = 0.0;
    for (std::size_t d = 0; d < V; ++d) {
      const float c = C[j * V + d];
      s.tiles[t * stride + d * L + lane] = -2.0f * c;
      nrm += static_cast<double>(c) * static_cast<double>(c);
    }
    s.norms[j] = static_cast<float>(nrm);
    s.tiles[t * stride + V * L + lane] = s.norms[j];
    s.ids[q] = static_cast<std::int32_t>(j);
    c2max = std::max(c2max, nrm);
  }
}

/// drift[j] >= ||C[j] - C_old[j]|| (float64, rounded up to fp32): how far each centroid moved.
inline void vec_centroid_drift(const float* C, const float* C_old, std::size_t k, int v, float* drift) {
  const std::size_t V = static_cast<std::size_t>(v);
  for (std::size_t j = 0; j < k; ++j) {
    double d2 = 0.0;
    for (std::size_t t = 0; t < V; ++t) {
      const double e = static_cast<double>(C[j * V + t]) - static_cast<double>(C_old[j * V + t]);
      d2 += e * e;
    }
    const double up = std::sqrt(d2) * (1.0 + 1e-12);
    float f = static_cast<float>(up);
    if (static_cast<double>(f) < up) f = std::nextafter(f, std::numeric_limits<float>::infinity());
    drift[j] = f;
  }
}

/// fp32 lower bound of a true distance whose kernel value is K: sqrt(K + ||x||^2 - E),
/// shrunk by 2^-22 before the conversion so the rounding to fp32 stays below it.
inline float yy_bound(float K, double x2, double E) {
  const double b = std::sqrt(std::max(0.0, static_cast<double>(K) + x2 - E)) * (1.0 - 0x1.0p-22);
  return static_cast<float>(b);
}

/// fp32 threshold (rounded up): a group whose bound exceeds it holds no centroid
/// with K <= Kbest.
inline float yy_threshold(float Kbest, double x2, double E) {
  const double t = std::sqrt(std::max(0.0, static_cast<double>(Kbest) + x2 + 2.0 * E)) * (1.0 + 0x1.0p-22);
  return static_cast<float>(t);
}

/// Smallest kernel value of each of P points over tiles [t0, t1) (the brute-force
/// kernel's arithmetic, no indices): gmin[p * gstride].
template <int V, int P>
inline void yy_group_min(const float (&x)[P][V], const float* tiles, std::size_t t0, std::size_t t1,
                         float* gmin, std::size_t gstride) {
  constexpr std::size_t stride = static_cast<std::size_t>(V + 1) * kVecLanes;
#if defined(__AVX512F__)
  __m512 vg[P], acc[P];
  for (int p = 0; p < P; ++p) vg[p] = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (std::size_t t = t0; t < t1; ++t) {
    const float* c = tiles + t * stride;
    const __m512 nrm = _mm512_loadu_ps(c + V * kVecLanes);
    for (int p = 0; p < P; ++p) acc[p] = nrm;
    for (int d = 0; d < V; ++d) {
      const __m512 cd = _mm512_loadu_ps(c + d * kVecLanes);
      for (int p = 0; p < P; ++p) acc[p] = _mm512_fmadd_ps(cd, _mm512_set1_ps(x[p][d]), acc[p]);
    }
    for (int p = 0; p < P; ++p) vg[p] = _mm512_min_ps(vg[p], acc[p]);
  }
  for (int p = 0; p < P; ++p) gmin[static_cast<std::size_t>(p) * gstride] = _mm512_reduce_min_ps(vg[p]);
#else
  for (int p = 0; p < P; ++p) {
    float vg = std::numeric_limits<float>::infinity();
    for (std::size_t t = t0; t < t1; ++t) {
      const float* c = tiles + t * stride;
      for (int l = 0; l < kVecLanes; ++l) {
        float a = c[V * kVecLanes + l];
        for (int d = 0; d < V; ++d) a = std::fma(c[d * kVecLanes + l], x[p][d], a);
        vg = std::min(vg, a);
      }
    }
    gmin[static_cast<std::size_t>(p) * gstride] = vg;
  }
#endif
}

/// Running (K, id) minimum and second value of P points over the tiles they
/// evaluate (ids compared on ties: the tiles are in group order, not index order).
template <int V, int P>
struct YyRun {
#if defined(__AVX512F__)
  __m512 best[P], sec[P];
  __m512i idx[P];
#else
  float best[P][kVecLanes], sec[P][kVecLanes];
  std::int32_t idx[P][kVecLanes];
#endif

  void init() {
    constexpr float inf = std::numeric_limits<float>::infinity();
    constexpr std::int32_t none = std::numeric_limits<std::int32_t>::max();
#if defined(__AVX512F__)
    for (int p = 0; p < P; ++p) {
      best[p] = sec[p] = _mm512_set1_ps(inf);
      idx[p] = _mm512_set1_epi32(none);
    }
#else
    for (int p = 0; p < P; ++p)
      for (int l = 0; l < kVecLanes; ++l) {
        best[p][l] = sec[p][l] = inf;
        idx[p][l] = none;
      }
#endif
  }

  /// Tiles [t0, t1): updates the running state; gmin[p * gstride] = min K over them.
  void group(const float (&x)[P][V], const float* tiles, const std::int32_t* ids, std::size_t t0,
             std::size_t t1, float* gmin, std::size_t gstride) {
    constexpr std::size_t stride = static_cast<std::size_t>(V + 1) * kVecLanes;
#if defined(__AVX512F__)
    __m512 vg[P], acc[P];
    for (int p = 0; p < P; ++p) vg[p] = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    for (std::size_t t = t0; t < t1; ++t) {
      const float* c = tiles + t * stride;
      const __m512 nrm = _mm512_loadu_ps(c + V * kVecLanes);
      for (int p = 0; p < P; ++p) acc[p] = nrm;
      for (int d = 0; d < V; ++d) {
        const __m512 cd = _mm512_loadu_ps(c + d * kVecLanes);
        for (int p = 0; p < P; ++p) acc[p] = _mm512_fmadd_ps(cd, _mm512_set1_ps(x[p][d]), acc[p]);
      }
      const __m512i id = _mm512_loadu_si512(ids + t * kVecLanes);
      for (int p = 0; p < P; ++p) {
        const __mmask16 lt = _mm512_cmp_ps_mask(acc[p], best[p], _CMP_LT_OQ);
        const __mmask16 eq = _mm512_cmp_ps_mask(acc[p], best[p], _CMP_EQ_OQ);
        const __mmask16 win = lt | _mm512_mask_cmplt_epi32_mask(eq, id, idx[p]);
        sec[p] = _mm512_min_ps(sec[p], _mm512_max_ps(acc[p], best[p]));
        best[p] = _mm512_mask_mov_ps(best[p], win, acc[p]);
        idx[p] = _mm512_mask_mov_epi32(idx[p], win, id);
        vg[p] = _mm512_min_ps(vg[p], acc[p]);
      }
    }
    for (int p = 0; p < P; ++p) gmin[static_cast<std::size_t>(p) * gstride] = _mm512_reduce_min_ps(vg[p]);
#else
    float vg[P];
    for (int p = 0; p < P; ++p) vg[p] = std::numeric_limits<float>::infinity();
    for (std::size_t t = t0; t < t1; ++t) {
      const float* c = tiles + t * stride;
      const std::int32_t* id = ids + t * kVecLanes;
      for (int p = 0; p < P; ++p)
        for (int l = 0; l < kVecLanes; ++l) {
          float a = c[V * kVecLanes + l];
          for (int d = 0; d < V; ++d) a = std::fma(c[d * kVecLanes + l], x[p][d], a);
          sec[p][l] = std::min(sec[p][l], std::max(a, best[p][l]));
          if (a < best[p][l] || (a == best[p][l] && id[l] < idx[p][l])) {
            best[p][l] = a;
            idx[p][l] = id[l];
          }
          vg[p] = std::min(vg[p], a);
        }
    }
    for (int p = 0; p < P; ++p) gmin[static_cast<std::size_t>(p) * gstride] = vg[p];
#endif
  }

  /// Winner (lexicographic (K, id) minimum) and the smallest K of every other
  /// evaluated candidate.
  void finish(float* bv, std::int32_t* bi, float* second) const {
    for (int p = 0; p < P; ++p) {
      float b[kVecLanes], s[kVecLanes];
      std::int32_t i[kVecLanes];
#if defined(__AVX512F__)
      _mm512_storeu_ps(b, best[p]);
      _mm512_storeu_ps(s, sec[p]);
      _mm512_storeu_si512(i, idx[p]);
#else
      std::copy(best[p], best[p] + kVecLanes, b);
      std::copy(sec[p], sec[p] + kVecLanes, s);
      std::copy(idx[p], idx[p] + kVecLanes, i);
#endif
      int bl = 0;
      for (int l = 1; l < kVecLanes; ++l)
        if (b[l] < b[bl] || (b[l] == b[bl] && i[l] < i[bl])) bl = l;
      float sc = std::numeric_limits<float>::infinity();
      for (int l = 0; l < kVecLanes; ++l) {
        sc = std::min(sc, s[l]);
        if (l != bl) sc = std::min(sc, b[l]);
      }
      bv[p] = b[bl];
      bi[p] = i[bl];
      second[p] = sc;
    }
  }
};

template <int V>
struct YyPoint {
  double x2, E;
};

template <int V>
inline YyPoint<V> yy_point(const float* x, double c2max) {
  YyPoint<V> q;
  q.x2 = 0.0;
  for (int d = 0; d < V; ++d) q.x2 += static_cast<double>(x[d]) * static_cast<double>(x[d]);
  q.E = vec_err_coef<V>() * (2.0 * c2max + q.x2) + 1e-300;
  return q;
}

/// The exact winner (lexicographic (K, id) minimum) among the groups of one point
/// whose smallest value is Kmin (gmin[g] == Kmin: every centroid with K == Kmin is in
/// one of them), and the smallest K of the other centroids of those groups.
template <int V>
inline void yy_resolve(const float (&x)[1][V], const YinyangState& s, const float* gmin,
                       const std::uint32_t* groups, std::size_t ng, float Kmin, std::int32_t& w,
                       float& second) {
  YyRun<V, 1> r;
  r.init();
  float unused;
  for (std::size_t e = 0; e < ng; ++e) {
    const std::size_t g = groups[e];
    if (gmin[g] == Kmin) r.group(x, s.tiles.data(), s.ids.data(), s.tile_begin(g), s.tile_end(g), &unused, 1);
  }
  float bv;
  r.finish(&bv, &w, &second);
}

/// First assignment: every group of every point (blocks of P points sharing the
/// tiles, smallest value per group only), then the winner among the groups that
/// reach the minimum.
template <int V>
void yy_first_v(const float* X, std::size_t n, YinyangState& s, double c2max, std::int32_t* out, int nt) {
#if defined(__AVX512F__)
  constexpr int P = 8;  // 8 accumulators + 8 group minima in zmm registers
#else
  constexpr int P = 4;
#endif
  const std::size_t G = s.G, nblk = (n + P - 1) / P;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    std::vector<float> gmin(P * G);
    std::vector<std::uint32_t> all(G);
    std::iota(all.begin(), all.end(), 0u);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 64)
#endif
    for (std::ptrdiff_t bb = 0; bb < static_cast<std::ptrdiff_t>(nblk); ++bb) {
      const std::size_t i0 = static_cast<std::size_t>(bb) * P, m = std::min<std::size_t>(P, n - i0);
      float x[P][V];
      for (int p = 0; p < P; ++p) {
        const std::size_t i = i0 + std::min<std::size_t>(static_cast<std::size_t>(p), m - 1);
        for (int d = 0; d < V; ++d) x[p][d] = X[i * V + static_cast<std::size_t>(d)];
      }
      for (std::size_t g = 0; g < G; ++g)
        yy_group_min<V, P>(x, s.tiles.data(), s.tile_begin(g), s.tile_end(g), gmin.data() + g, G);
      for (std::size_t p = 0; p < m; ++p) {
        const std::size_t i = i0 + p;
        const float* gm = gmin.data() + p * G;
        float Kmin = gm[0];
        for (std::size_t g = 1; g < G; ++g) Kmin = std::min(Kmin, gm[g]);
        float xp[1][V];
        for (int d = 0; d < V; ++d) xp[0][d] = x[p][d];
        std::int32_t w;
        float second;
        yy_resolve<V>(xp, s, gm, all.data(), G, Kmin, w, second);
        const YyPoint<V> q = yy_point<V>(x[p], c2max);
        const std::size_t gw = static_cast<std::size_t>(s.group_of[static_cast<std::size_t>(w)]);
        float* l = s.lower.data() + i * G;
        for (std::size_t g = 0; g < G; ++g) l[g] = yy_bound(gm[g], q.x2, q.E);
        l[gw] = yy_bound(second, q.x2, q.E);
        out[i] = w;
      }
    }
  }
  (void)nt;
}

/// Depth-first search of the k-d split for one point (first assignment): the near
/// side first, the far side only when its box distance does not clear the best
/// value so far; a skipped subtree's groups get the box distance as their bound.
template <int V>
struct YyTreeSearch {
  const YinyangState& s;
  const float (&x)[1][V];
  double x2, E;
  float* gmin;          // per group: smallest K (visited groups)
  float* l;             // per group: the point's bounds
  std::uint32_t* visit;  // visited groups
  std::size_t nv = 0;
  float Kbest = std::numeric_limits<float>::infinity();
  float thr = std::numeric_limits<float>::infinity();
  double off[V] = {};

  void run(int node, double rd) {
    if (node < 0) {
      const std::size_t g = static_cast<std::size_t>(-1 - node);
      yy_group_min<V, 1>(x, s.tiles.data(), s.tile_begin(g), s.tile_end(g), gmin + g, 1);
      visit[nv++] = static_cast<std::uint32_t>(g);
      if (gmin[g] < Kbest) {
        Kbest = gmin[g];
        thr = yy_threshold(Kbest, x2, E);
      }
      return;
    }
    const YinyangState::Node& nd = s.nodes[static_cast<std::size_t>(node)];
    const double diff = static_cast<double>(x[0][nd.dim]) - static_cast<double>(nd.split);
    run(diff <= 0.0 ? nd.left : nd.right, rd);
    const int far = diff <= 0.0 ? nd.right : nd.left;
    const double old = off[nd.dim];
    const double rf = rd - old * old + diff * diff;  // squared distance to the far box
    const double lb = std::sqrt(std::max(0.0, rf)) * (1.0 - 1e-12);
    if (lb > static_cast<double>(thr)) {  // every centroid there has K > Kbest
      const float lf = static_cast<float>(lb * (1.0 - 0x1.0p-22));
      const YinyangState::Node* fn = far >= 0 ? &s.nodes[static_cast<std::size_t>(far)] : nullptr;
      const std::size_t g0 = fn ? fn->glo : static_cast<std::size_t>(-1 - far);
      const std::size_t g1 = fn ? fn->ghi : g0 + 1;
      for (std::size_t g = g0; g < g1; ++g) l[g] = lf;
      return;
    }
    off[nd.dim] = std::fabs(diff);
    run(far, rf);
    off[nd.dim] = old;
  }
};

/// First assignment by the k-d split (valid for the centroids the groups were made from).
template <int V>
void yy_first_tree_v(const float* X, std::size_t n, YinyangState& s, double c2max, std::int32_t* out,
                     int nt) {
  const std::size_t G = s.G;
  const auto nn = static_cast<std::ptrdiff_t>(n);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    std::vector<float> gmin(G);
    std::vector<std::uint32_t> visit(G);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 256)
#endif
    for (std::ptrdiff_t ii = 0; ii < nn; ++ii) {
      const std::size_t i = static_cast<std::size_t>(ii);
      float x[1][V];
      for (int d = 0; d < V; ++d) x[0][d] = X[i * V + static_cast<std::size_t>(d)];
      const YyPoint<V> q = yy_point<V>(x[0], c2max);
      float* l = s.lower.data() + i * G;
      YyTreeSearch<V> ts{s, x, q.x2, q.E, gmin.data(), l, visit.data()};
      ts.run(s.root, 0.0);
      for (std::size_t e = 0; e < ts.nv; ++e) {
        const std::size_t g = visit[e];
        l[g] = yy_bound(gmin[g], q.x2, q.E);
      }
      std::int32_t w;
      float second;
      yy_resolve<V>(x, s, gmin.data(), visit.data(), ts.nv, ts.Kbest, w, second);
      l[static_cast<std::size_t>(s.group_of[static_cast<std::size_t>(w)])] = yy_bound(second, q.x2, q.E);
      out[i] = w;
    }
  }
  (void)nt;
}

/// Later assignments: bounds decayed by the groups' drift, only the groups whose
/// bound does not clear the point's own centroid evaluated.
template <int V>
void yy_next_v(const float* X, std::size_t n, const float* C, YinyangState& s, double c2max,
               const float* drift, const std::int32_t* prev, std::int32_t* out, int nt) {
  const std::size_t G = s.G, k = s.k;
  s.gdrift.assign(G, 0.0f);
  for (std::size_t j = 0; j < k; ++j) {
    float& gd = s.gdrift[static_cast<std::size_t>(s.group_of[j])];
    gd = std::max(gd, drift[j]);
  }
  const float* gdrift = s.gdrift.data();
  // fl(fl(l - d) * shrink) < l - d when positive: (1 + 2^-24)^2 (1 - 2^-20) < 1.
  constexpr float shrink = 1.0f - 0x1.0p-20f;
  const auto nn = static_cast<std::ptrdiff_t>(n);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    std::vector<float> gmin(G);
    std::vector<std::uint32_t> visit(G + 16);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 512)
#endif
    for (std::ptrdiff_t ii = 0; ii < nn; ++ii) {
      const std::size_t i = static_cast<std::size_t>(ii);
      float x[1][V];
      for (int d = 0; d < V; ++d) x[0][d] = X[i * V + static_cast<std::size_t>(d)];
      const std::int32_t a = prev[i];
      const float* ca = C + static_cast<std::size_t>(a) * V;
      float Ka = s.norms[static_cast<std::size_t>(a)];
      for (int d = 0; d < V; ++d) Ka = std::fma(-2.0f * ca[d], x[0][d], Ka);
      const YyPoint<V> q = yy_point<V>(x[0], c2max);
      float* l = s.lower.data() + i * G;
      float thr = yy_threshold(Ka, q.x2, q.E);
      std::size_t nv = 0, g0 = 0;
#if defined(__AVX512F__)
      // Decay 16 bounds at a time and list the groups not cleared (compressed in
      // registers, stored whole: visit has 16 entries of slack).
      const __m512 vthr = _mm512_set1_ps(thr), vshrink = _mm512_set1_ps(shrink);
      const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      for (; g0 + 16 <= G; g0 += 16) {
        const __m512 dec = _mm512_max_ps(
            _mm512_setzero_ps(),
            _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(l + g0), _mm512_loadu_ps(gdrift + g0)), vshrink));
        _mm512_storeu_ps(l + g0, dec);
        const __mmask16 open = _mm512_cmp_ps_mask(dec, vthr, _CMP_LE_OQ);
        const __m512i gid = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(g0)));
        _mm512_storeu_si512(visit.data() + nv, _mm512_maskz_compress_epi32(open, gid));
        nv += static_cast<std::size_t>(__builtin_popcount(open));
      }
#endif
      for (std::size_t g = g0; g < G; ++g) {
        l[g] = std::max(0.0f, (l[g] - gdrift[g]) * shrink);
        if (!(l[g] > thr)) visit[nv++] = static_cast<std::uint32_t>(g);
      }
      if (nv == 0) {
        out[i] = a;
        continue;
      }
      // Smallest value of each group that the best value so far does not clear.
      float m = std::numeric_limits<float>::infinity();
      std::size_t done = 0;
      for (std::size_t e = 0; e < nv; ++e) {
        const std::size_t g = visit[e];
        if (e > 0 && l[g] > thr) continue;  // cleared by a better candidate found meanwhile
        yy_group_min<V, 1>(x, s.tiles.data(), s.tile_begin(g), s.tile_end(g), gmin.data() + g, 1);
        visit[done++] = static_cast<std::uint32_t>(g);
        if (gmin[g] < m) {
          m = gmin[g];
          if (m < Ka) thr = std::min(thr, yy_threshold(m, q.x2, q.E));
        }
      }
      const std::size_t ga = static_cast<std::size_t>(s.group_of[static_cast<std::size_t>(a)]);
      bool ga_visited = false;
      for (std::size_t e = 0; e < done; ++e) {
        const std::size_t g = visit[e];
        ga_visited = ga_visited || g == ga;
        l[g] = yy_bound(gmin[g], q.x2, q.E);
      }
      // a's group visited: m <= Ka and a is among the candidates resolved below.
      std::int32_t w = a;
      if (m <= Ka) {
        std::int32_t bi;
        float second;
        yy_resolve<V>(x, s, gmin.data(), visit.data(), done, m, bi, second);
        if (m < Ka || bi < a || ga_visited) {
          w = bi;
          l[static_cast<std::size_t>(s.group_of[static_cast<std::size_t>(w)])] = yy_bound(second, q.x2, q.E);
        }
      }
      if (w != a && !ga_visited) l[ga] = std::min(l[ga], yy_bound(Ka, q.x2, q.E));
      out[i] = w;
    }
  }
  (void)nt;
}

template <int V>
void yy_assign_v(const float* X, std::size_t n, const float* C, YinyangState& s, const float* drift,
                 const std::int32_t* prev, std::int32_t* out, int nt) {
  double c2max = 0.0;
  yy_build_tiles(C, V, s, c2max);
  if (drift == nullptr || !s.have) {
    s.n = n;
    s.lower.assign(n * s.G, 0.0f);
    if (V <= kYyTreeMaxDim)
      yy_first_tree_v<V>(X, n, s, c2max, out, nt);
    else
      yy_first_v<V>(X, n, s, c2max, out, nt);
  } else {
    yy_next_v<V>(X, n, C, s, c2max, drift, prev, out, nt);
  }
  s.have = true;
}

/// Exact nearest centroid (the brute-force kernel's result, ties included) of
/// each of n points.  First call (s.have false, or drift nullptr): groups are
/// made from C when s.k != k, every centroid evaluated, bounds written.  Later
/// calls: prev = the previous assignment, drift (k) = upper bounds of how far
/// each centroid moved since the previous call.
inline void vec_assign_yinyang(const float* X, std::size_t n, int v, const float* C, std::size_t k,
                               YinyangState& s, const float* drift, const std::int32_t* prev,
                               std::int32_t* out, int nt) {
  SQLLM_CHECK(v >= 2 && v <= 16, "vector length must be in 2..16, got ", v);
  SQLLM_CHECK(k >= 1 && k <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
              "yinyang assignment: bad k ", k);
  if (s.have && (s.n != n || prev == nullptr || drift == nullptr || s.k != k)) s.have = false;
  if (!s.have) yy_make_groups(C, k, v, s);  // a first assignment: groups (and split) from C
#define SQLLM_VEC_CASE(N) \
  case N:                 \
    return yy_assign_v<N>(X, n, C, s, drift, prev, out, nt);
  switch (v) {
    SQLLM_VEC_CASE(2) SQLLM_VEC_CASE(3) SQLLM_VEC_CASE(4) SQLLM_VEC_CASE(5) SQLLM_VEC_CASE(6)
    SQLLM_VEC_CASE(7) SQLLM_VEC_CASE(8) SQLLM_VEC_CASE(9) SQLLM_VEC_CASE(10) SQLLM_VEC_CASE(11)
    SQLLM_VEC_CASE(12) SQLLM_VEC_CASE(13) SQLLM_VEC_CASE(14) SQLLM_VEC_CASE(15) SQLLM_VEC_CASE(16)
    default:
      throw Error(detail::concat("unsupported vector length v=", v, " (supported: 2..16)"));
  }
#undef SQLLM_VEC_CASE
}

}  // namespace detail
}  // namespace sqllm
