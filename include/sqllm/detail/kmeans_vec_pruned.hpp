// sqllm/detail/kmeans_vec_pruned.hpp -- exact nearest-centroid assignment that
// skips centroids by the triangle inequality (not public API).
//
// The brute-force kernel (kmeans_vec_kernel.hpp) compares every point with
// every centroid.  Here each point x comes with a guess a (any centroid: in a
// Lloyd iteration its previous one) and only the centroids c with
//
//     ||c - c_a|| < ||x - c_a|| + ||x - c_best||                       (1)
//
// can be nearer than the best found so far (||x - c|| >= ||c - c_a|| - ||x - c_a||):
// Elkan's lemma in the annular form of Newling and Fleuret's "Exponion".
// Points are grouped by guess and gathered contiguously; for each guess a, the
// centroids within 2 max ||x - c_a|| of c_a (a superset of (1) for every member)
// are bucketed by their distance to c_a (64 buckets, a first) and laid out in
// SIMD tiles with their ids, lazily, as far as some block needs them.  A block
// of P points walks the tiles and stops as soon as no point can gain from the
// tiles left (the bucket's lower edge bounds every later entry).
//
// Hamerly's filter (optional): each search also returns a lower bound of the
// distance from x to every centroid but its winner.  In the next iteration, a
// point whose bound, less the largest move of any centroid within 2 max Da of
// c_a, still exceeds its distance to its (moved) centroid keeps it unsearched.
//
// Exactness.  The distances compared are the brute-force kernel's, bit for
// bit: K(x, c) = fl(||c||^2) + sum_d fma(-2 c_d, x_d, .) in fp32, the same
// sequence of operations whatever tile or lane holds c, and the winner is the
// lexicographic minimum of (K, index) exactly as the brute-force kernel's.  The
// pruning tests work on true distances with the rounding of K bounded:
// |K(x, c) - (||x - c||^2 - ||x||^2)| <= (V + 1) u (2 ||c||^2 + ||x||^2), u = 2^-24
// (the rounding of the stored norm plus one rounding per fused multiply-add, each
// at most u times an accumulator bounded by ||c||^2 + 2 |c||x|).  A centroid is
// skipped only when its true squared distance exceeds K_best + ||x||^2 + 2E, E
// twice that bound, so its K is strictly above K_best: the result, ties included,
// is the brute-force result (tests/python/test_vptq_kmeans_pruned.py checks it,
// also on integer data built to tie).  Centroid-to-centroid distances are
// computed in fp32 and shrunk by a relative 1e-5 (their rounding is below 1e-6)
// so they stay lower bounds; the rest of the bound arithmetic is in double with
// outward rounding margins.
//
// Determinism.  Each point's result depends only on its own arithmetic, never
// on the grouping, the block it shares or the thread, so any thread count gives
// the same assignment.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "sqllm/detail/kmeans_vec_kernel.hpp"
#include "sqllm/error.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sqllm {
namespace detail {

/// Twice the bound above on |K - (||x-c||^2 - ||x||^2)|, per unit of (2 max||c||^2 + ||x||^2).
template <int V>
constexpr double vec_err_coef() {
  return 2.0 * (V + 1) * 0x1.0p-24;
}

/// Centroid tiles of a guided search: rows as vec_tile_centroids (V rows of -2c,
/// one of norms), then kVecLanes int32 ids; padding lanes never win.
template <int V>
struct GuidedTiles {
  static constexpr std::size_t kFloats = static_cast<std::size_t>(V + 1) * kVecLanes;
  std::vector<float> vals;
  std::vector<std::int32_t> ids;
  std::vector<double> lb;  ///< per tile: lower bound of ||c - c_a|| over this tile and all later ones
};

/// Best (K, index) of P points over `ntiles` guided tiles, stopping early.
/// best/bidx come in as the running minimum (K of the guess and the guess) and
/// go out as the final one.  Da[p]: upper bound of ||x_p - c_a||; slack[p]:
/// ||x_p||^2 + 2E_p.
template <int V, int P>
inline std::size_t vec_guided_block(const float (&x)[P][V], const GuidedTiles<V>& T,
                                    std::size_t t_begin, std::size_t ntiles, const double* Da,
                                    const double* slack, float* best, std::int32_t* bidx,
                                    float* second) {
  std::size_t t_stop = ntiles;
  constexpr float inf = std::numeric_limits<float>::infinity();
  constexpr std::int32_t none = std::numeric_limits<std::int32_t>::max();
  // Points done when lb > Da_p and (lb - Da_p)^2 - slack_p > K_best(p): nothing left can win.
  auto threshold = [&](std::size_t t, int p) -> float {
    const double diff = T.lb[t] - Da[p];
    if (!(diff > 0.0)) return -std::numeric_limits<float>::infinity();
    const double thr = diff * diff - slack[p];
    float f = static_cast<float>(thr);
    if (static_cast<double>(f) > thr) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
    return f;
  };
#if defined(__AVX512F__)
  __m512 vbest[P], vacc[P], vsec[P];
  __m512i vidx[P];
  for (int p = 0; p < P; ++p) {  // the carried state in lane 0
    vbest[p] = _mm512_mask_mov_ps(_mm512_set1_ps(inf), 1, _mm512_set1_ps(best[p]));
    vsec[p] = _mm512_mask_mov_ps(_mm512_set1_ps(inf), 1, _mm512_set1_ps(second[p]));
    vidx[p] = _mm512_mask_mov_epi32(_mm512_set1_epi32(none), 1, _mm512_set1_epi32(bidx[p]));
  }
  for (std::size_t t = t_begin; t < ntiles; ++t) {
    if (t > 0) {
      bool all_done = true;
      for (int p = P - 1; p >= 0 && all_done; --p) {
        const float thr = threshold(t, p);
        all_done = _mm512_cmp_ps_mask(vbest[p], _mm512_set1_ps(thr), _CMP_LT_OQ) != 0;
      }
      if (all_done) {
        t_stop = t;
        break;
      }
    }
    const float* c = T.vals.data() + t * GuidedTiles<V>::kFloats;
    const __m512 nrm = _mm512_loadu_ps(c + V * kVecLanes);
    for (int p = 0; p < P; ++p) vacc[p] = nrm;
    for (int d = 0; d < V; ++d) {
      const __m512 cd = _mm512_loadu_ps(c + d * kVecLanes);
      for (int p = 0; p < P; ++p) vacc[p] = _mm512_fmadd_ps(cd, _mm512_set1_ps(x[p][d]), vacc[p]);
    }
    const __m512i id = _mm512_loadu_si512(T.ids.data() + t * kVecLanes);
    for (int p = 0; p < P; ++p) {
      const __mmask16 lt = _mm512_cmp_ps_mask(vacc[p], vbest[p], _CMP_LT_OQ);
      const __mmask16 eq = _mm512_cmp_ps_mask(vacc[p], vbest[p], _CMP_EQ_OQ);
      const __mmask16 win = lt | _mm512_mask_cmplt_epi32_mask(eq, id, vidx[p]);
      vsec[p] = _mm512_min_ps(vsec[p], _mm512_max_ps(vacc[p], vbest[p]));
      vbest[p] = _mm512_mask_mov_ps(vbest[p], win, vacc[p]);
      vidx[p] = _mm512_mask_mov_epi32(vidx[p], win, id);
    }
  }
  for (int p = 0; p < P; ++p) {
    // Winner: the smallest value, then the smallest index among its lanes; second:
    // the smallest over every lane's second and the other lanes' bests.
    const float bv = _mm512_reduce_min_ps(vbest[p]);
    const __mmask16 at = _mm512_cmp_ps_mask(vbest[p], _mm512_set1_ps(bv), _CMP_EQ_OQ);
    const std::int32_t bi = _mm512_mask_reduce_min_epi32(at, vidx[p]);
    const __mmask16 wl = _mm512_mask_cmpeq_epi32_mask(at, vidx[p], _mm512_set1_epi32(bi));
    const __mmask16 one = static_cast<__mmask16>(wl & (~wl + 1));  // lowest such lane
    best[p] = bv;
    bidx[p] = bi;
    second[p] = _mm512_reduce_min_ps(_mm512_min_ps(vsec[p], _mm512_mask_mov_ps(vbest[p], one, _mm512_set1_ps(inf))));
  }
  return t_stop;
#endif
#if !defined(__AVX512F__)
#if defined(__AVX2__) && defined(__FMA__)
  __m256 vbest[P], vacc[P], vsec[P];
  __m256i vidx[P];
  for (int p = 0; p < P; ++p) {  // the carried state in lane 0
    vbest[p] = _mm256_setr_ps(best[p], inf, inf, inf, inf, inf, inf, inf);
    vsec[p] = _mm256_setr_ps(second[p], inf, inf, inf, inf, inf, inf, inf);
    vidx[p] = _mm256_setr_epi32(bidx[p], none, none, none, none, none, none, none);
  }
  for (std::size_t t = t_begin; t < ntiles; ++t) {
    if (t > 0) {
      bool all_done = true;
      for (int p = P - 1; p >= 0 && all_done; --p) {
        const float thr = threshold(t, p);
        all_done = _mm256_movemask_ps(_mm256_cmp_ps(vbest[p], _mm256_set1_ps(thr), _CMP_LT_OQ)) != 0;
      }
      if (all_done) {
        t_stop = t;
        break;
      }
    }
    const float* c = T.vals.data() + t * GuidedTiles<V>::kFloats;
    const __m256 nrm = _mm256_loadu_ps(c + V * kVecLanes);
    for (int p = 0; p < P; ++p) vacc[p] = nrm;
    for (int d = 0; d < V; ++d) {
      const __m256 cd = _mm256_loadu_ps(c + d * kVecLanes);
      for (int p = 0; p < P; ++p) vacc[p] = _mm256_fmadd_ps(cd, _mm256_broadcast_ss(&x[p][d]), vacc[p]);
    }
    const __m256i id = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(T.ids.data() + t * kVecLanes));
    for (int p = 0; p < P; ++p) {
      const __m256 lt = _mm256_cmp_ps(vacc[p], vbest[p], _CMP_LT_OQ);
      const __m256 eq = _mm256_cmp_ps(vacc[p], vbest[p], _CMP_EQ_OQ);
      const __m256 ilt = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vidx[p], id));
      const __m256 win = _mm256_or_ps(lt, _mm256_and_ps(eq, ilt));
      vsec[p] = _mm256_min_ps(vsec[p], _mm256_max_ps(vacc[p], vbest[p]));
      vbest[p] = _mm256_blendv_ps(vbest[p], vacc[p], win);
      vidx[p] = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(vidx[p]), _mm256_castsi256_ps(id), win));
    }
  }
  float lb_[P][kVecLanes], ls_[P][kVecLanes];
  std::int32_t li_[P][kVecLanes];
  for (int p = 0; p < P; ++p) {
    _mm256_storeu_ps(lb_[p], vbest[p]);
    _mm256_storeu_ps(ls_[p], vsec[p]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(li_[p]), vidx[p]);
  }
#else
  float lb_[P][kVecLanes], ls_[P][kVecLanes];
  std::int32_t li_[P][kVecLanes];
  for (int p = 0; p < P; ++p)
    for (int l = 0; l < kVecLanes; ++l) {  // the carried state in lane 0
      lb_[p][l] = l == 0 ? best[p] : inf;
      ls_[p][l] = l == 0 ? second[p] : inf;
      li_[p][l] = l == 0 ? bidx[p] : none;
    }
  for (std::size_t t = t_begin; t < ntiles; ++t) {
    if (t > 0) {
      bool all_done = true;
      for (int p = P - 1; p >= 0 && all_done; --p) {
        const float thr = threshold(t, p);
        bool any = false;
        for (int l = 0; l < kVecLanes; ++l) any = any || lb_[p][l] < thr;
        all_done = any;
      }
      if (all_done) {
        t_stop = t;
        break;
      }
    }
    const float* c = T.vals.data() + t * GuidedTiles<V>::kFloats;
    const std::int32_t* id = T.ids.data() + t * kVecLanes;
    for (int p = 0; p < P; ++p)
      for (int l = 0; l < kVecLanes; ++l) {
        float acc = c[V * kVecLanes + l];
        for (int d = 0; d < V; ++d) acc = std::fma(c[d * kVecLanes + l], x[p][d], acc);
        ls_[p][l] = std::min(ls_[p][l], std::max(acc, lb_[p][l]));
        if (acc < lb_[p][l] || (acc == lb_[p][l] && id[l] < li_[p][l])) {
          lb_[p][l] = acc;
          li_[p][l] = id[l];
        }
      }
  }
#endif
  for (int p = 0; p < P; ++p) {
    int bl = 0;
    for (int l = 1; l < kVecLanes; ++l)
      if (lb_[p][l] < lb_[p][bl] || (lb_[p][l] == lb_[p][bl] && li_[p][l] < li_[p][bl])) bl = l;
    // Second smallest value over every evaluated candidate but the winner.
    float sec = ls_[p][0];
    for (int l = 0; l < kVecLanes; ++l) {
      sec = std::min(sec, ls_[p][l]);
      if (l != bl) sec = std::min(sec, lb_[p][l]);
    }
    best[p] = lb_[p][bl];
    bidx[p] = li_[p][bl];
    second[p] = sec;
  }
  return t_stop;
#endif
}

/// Centroids prepared for guided searches: fp32 norms as the tiles hold them, a
/// coordinate-major copy for the centroid-to-centroid distances.
struct GuidedCentroids {
  const float* C = nullptr;
  std::size_t k = 0;
  int v = 0;
  std::vector<float> norms;  ///< fl(||c_j||^2), as in vec_tile_centroids
  std::vector<float> soa;    ///< soa[d * k + j] = C[j][d]
  double c2max = 0.0;        ///< max_j ||c_j||^2 (double)
};

inline void vec_prepare_guided(const float* C, std::size_t k, int v, GuidedCentroids& g) {
  const std::size_t V = static_cast<std::size_t>(v);
  g.C = C;
  g.k = k;
  g.v = v;
  g.norms.resize(k);
  g.soa.resize(k * V);
  g.c2max = 0.0;
  for (std::size_t j = 0; j < k; ++j) {
    double nrm = 0.0;
    for (std::size_t d = 0; d < V; ++d) {
      const float c = C[j * V + d];
      nrm += static_cast<double>(c) * static_cast<double>(c);
      g.soa[d * k + j] = c;
    }
    g.norms[j] = static_cast<float>(nrm);
    g.c2max = std::max(g.c2max, nrm);
  }
}

/// Buckets of the neighbour lists (by squared distance to c_a, as a fraction of the list's radius).
constexpr int kGuidedBuckets = 64;

/// Largest drift[j] over the centroids with r2[j] * shrink < lim2 (0 if none).
inline float vec_near_max(const float* r2, const float* drift, std::size_t k, float shrink, float lim2) {
  std::size_t j = 0;
  float mx = 0.0f;
#if defined(__AVX512F__)
  __m512 vm = _mm512_setzero_ps();
  const __m512 vs = _mm512_set1_ps(shrink), vl = _mm512_set1_ps(lim2);
  for (; j + 16 <= k; j += 16) {
    const __mmask16 in = _mm512_cmp_ps_mask(_mm512_mul_ps(_mm512_loadu_ps(r2 + j), vs), vl, _CMP_LT_OQ);
    vm = _mm512_mask_max_ps(vm, in, vm, _mm512_loadu_ps(drift + j));
  }
  mx = _mm512_reduce_max_ps(vm);
#endif
  for (; j < k; ++j)
    if (r2[j] * shrink < lim2) mx = std::max(mx, drift[j]);
  return mx;
}

/// The centroids j != a with lb2 = r2[j] * shrink < lim2: their ids and lb2, in index
/// order.  ids and lb2 must hold k + 16 entries.
inline std::size_t vec_near_select(const float* r2, std::size_t k, std::int32_t a, float shrink,
                                   float lim2, std::int32_t* ids, float* lb2) {
  std::size_t j = 0, cnt = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(shrink), vl = _mm512_set1_ps(lim2);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i va = _mm512_set1_epi32(a);
  for (; j + 16 <= k; j += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(r2 + j), vs);
    const __m512i id = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(j)));
    const __mmask16 in = _mm512_cmp_ps_mask(v, vl, _CMP_LT_OQ) & _mm512_cmpneq_epi32_mask(id, va);
    // Compress in registers and store all 16 lanes (a compressing store to memory is
    // microcoded on some CPUs); the buffers have 16 entries of slack.
    _mm512_storeu_si512(ids + cnt, _mm512_maskz_compress_epi32(in, id));
    _mm512_storeu_ps(lb2 + cnt, _mm512_maskz_compress_ps(in, v));
    cnt += static_cast<std::size_t>(__builtin_popcount(in));
  }
#endif
  for (; j < k; ++j) {
    const float v = r2[j] * shrink;
    if (v < lim2 && static_cast<std::int32_t>(j) != a) {
      ids[cnt] = static_cast<std::int32_t>(j);
      lb2[cnt++] = v;
    }
  }
  return cnt;
}

/// Per-thread scratch of the guided assignment.
template <int V>
struct GuidedScratch {
  std::vector<float> r2;           // k: ||c_j - c_a||^2 (fp32)
  std::vector<std::int32_t> sel;   // centroids within the radius
  std::vector<float> sel_lb2;      // their squared distances to c_a (lower bounds)
  std::vector<int> sel_bucket;     // their buckets
  std::vector<std::int32_t> ord;   // the list: a, then sel by bucket
  std::vector<int> ord_bucket;
  std::vector<std::pair<double, std::size_t>> pts;  // (Da, point) of the points searched
  GuidedTiles<V> tiles;
};

/// One point's quantities against centroid a: K(x, c_a) by the kernel's
/// arithmetic, ||x||^2 (double) and the bound Da >= ||x - c_a|| (see the file comment).
template <int V>
struct GuidedPoint {
  float K;
  double x2, E, Da;
};

template <int V>
inline GuidedPoint<V> vec_guided_point(const float* x, const float* ta, float na, double c2max) {
  GuidedPoint<V> q;
  q.K = na;
  q.x2 = 0.0;
  for (int d = 0; d < V; ++d) {
    q.K = std::fma(ta[d], x[d], q.K);
    q.x2 += static_cast<double>(x[d]) * static_cast<double>(x[d]);
  }
  q.E = vec_err_coef<V>() * (2.0 * c2max + q.x2) + 1e-300;
  q.Da = std::sqrt(std::max(0.0, static_cast<double>(q.K) + q.x2 + 2.0 * q.E)) * (1.0 + 1e-12);
  return q;
}

template <int V>
inline float vec_guided_dist(const float* x, float K) {
  float xx = 0.0f;
  for (int d = 0; d < V; ++d) xx = std::fma(x[d], x[d], xx);
  return std::max(0.0f, K + xx);
}

/// Exact nearest centroid of the m points X (m x V, contiguous), all guessed to
/// centroid a; idx, dist and lower are indexed like X.
/// lower (optional): receives a lower bound of ||x_i - c|| over every centroid c
/// but the winner (Hamerly's bound, for the next iteration's filter); drift
/// (optional, k): with lower, how far each centroid moved (an upper bound) since
/// lower was written -- points whose bound, less the largest move of a centroid
/// near enough to matter, still exceeds Da keep their guess without a search.
template <int V>
void vec_guided_cluster(const float* X, const GuidedCentroids& g, std::int32_t a,
                        std::size_t m, std::int32_t* idx, float* dist,
                        double* lower, const float* drift, GuidedScratch<V>& s) {
  constexpr int P = kVecPoints;
  constexpr std::size_t L = kVecLanes;
  constexpr int NB = kGuidedBuckets;
  const std::size_t k = g.k;
  const float* ca = g.C + static_cast<std::size_t>(a) * V;
  float ta[V];  // the tile entries of a: -2 c_a
  for (int d = 0; d < V; ++d) ta[d] = -2.0f * ca[d];
  const float na = g.norms[static_cast<std::size_t>(a)];
  constexpr float shrink = 1.0f - 1e-5f;  // fp32 squared distances -> lower bounds
  // Float threshold >= lim^2: an entry at or beyond it has true distance >= lim.
  auto lim2_of = [](double lim) { return static_cast<float>(lim * lim) * 1.00001f; };

  s.pts.clear();
  double da_all = 0.0;
  for (std::size_t q = 0; q < m; ++q) {
    const std::size_t i = q;
    const GuidedPoint<V> gp = vec_guided_point<V>(X + i * V, ta, na, g.c2max);
    s.pts.emplace_back(gp.Da, i);
    da_all = std::max(da_all, gp.Da);
  }

  s.r2.resize(k);
  std::fill(s.r2.begin(), s.r2.end(), 0.0f);
  for (int d = 0; d < V; ++d) {
    const float* col = g.soa.data() + static_cast<std::size_t>(d) * k;
    const float cd = ca[d];
    float* r2 = s.r2.data();
    for (std::size_t j = 0; j < k; ++j) {
      const float e = col[j] - cd;
      r2[j] = std::fma(e, e, r2[j]);
    }
  }

  if (lower != nullptr && drift != nullptr) {
    // Centroids beyond lim_all = 2 max Da cannot beat a (||x - c|| >= lim_all - Da >= Da);
    // those within moved by at most dloc.
    const double lim_all = 2.0 * da_all;
    const float lim2 = lim2_of(lim_all);
    const double dloc = vec_near_max(s.r2.data(), drift, k, shrink, lim2);
    std::size_t w = 0;
    for (std::size_t q = 0; q < m; ++q) {
      const std::size_t i = s.pts[q].second;
      const double Da = s.pts[q].first;
      const double l = (lower[i] - dloc) * (1.0 - 1e-12);
      if (l > Da) {
        idx[i] = a;
        if (dist != nullptr) {
          const GuidedPoint<V> gp = vec_guided_point<V>(X + i * V, ta, na, g.c2max);
          dist[i] = vec_guided_dist<V>(X + i * V, gp.K);
        }
        lower[i] = std::min(l, (lim_all - Da) * (1.0 - 1e-12));
      } else {
        s.pts[w++] = s.pts[q];
      }
    }
    s.pts.resize(w);
    if (w == 0) return;
  }
  std::sort(s.pts.begin(), s.pts.end());
  const std::size_t ms = s.pts.size();

  // Every centroid that can satisfy (1) for a searched point lies within lim = 2 max Da.
  const double lim = 2.0 * s.pts.back().first;
  const float lim2 = lim2_of(lim);
  // fp32 bucket index: at most one too high by rounding, covered by the edge's margin below.
  const float to_bucket = static_cast<float>(NB) / lim2;
  int count[NB + 1] = {0};
  s.sel.resize(k + 16);
  s.sel_lb2.resize(k + 16);
  const std::size_t nsel = vec_near_select(s.r2.data(), k, a, shrink, lim2, s.sel.data(), s.sel_lb2.data());
  s.sel_bucket.resize(nsel);
  for (std::size_t e = 0; e < nsel; ++e)
    s.sel_bucket[e] = std::min(NB - 1, static_cast<int>(s.sel_lb2[e] * to_bucket));
  for (std::size_t e = 0; e < nsel; ++e) ++count[s.sel_bucket[e] + 1];
  for (int b = 0; b < NB; ++b) count[b + 1] += count[b];
  const std::size_t len = nsel + 1;
  s.ord.resize(len);
  s.ord_bucket.resize(len);
  s.ord[0] = a;
  s.ord_bucket[0] = 0;
  for (std::size_t e = 0; e < nsel; ++e) {
    const std::size_t pos = 1 + static_cast<std::size_t>(count[s.sel_bucket[e]]++);
    s.ord[pos] = s.sel[e];
    s.ord_bucket[pos] = s.sel_bucket[e];
  }

  // Tiles are built lazily, as far as some block needs them.
  const std::size_t nt = (len + L - 1) / L;
  GuidedTiles<V>& T = s.tiles;
  T.vals.resize(nt * GuidedTiles<V>::kFloats);
  T.ids.resize(nt * L);
  T.lb.resize(nt + 1);
  T.lb[0] = 0.0;
  T.lb[nt] = lim;  // beyond the list
  std::size_t built = 0;
  auto build = [&](std::size_t upto) {
    for (std::size_t t = built; t < upto; ++t) {
      float* tv = T.vals.data() + t * GuidedTiles<V>::kFloats;
      for (std::size_t lane = 0; lane < L; ++lane) {
        const std::size_t e = t * L + lane;
        if (e >= len) {
          for (int d = 0; d < V; ++d) tv[d * L + lane] = 0.0f;
          tv[V * L + lane] = kVecPad;
          T.ids[e] = std::numeric_limits<std::int32_t>::max();
          continue;
        }
        const std::int32_t j = s.ord[e];
        const float* cj = g.C + static_cast<std::size_t>(j) * V;
        for (int d = 0; d < V; ++d) tv[d * L + lane] = -2.0f * cj[d];
        tv[V * L + lane] = g.norms[static_cast<std::size_t>(j)];
        T.ids[e] = j;
      }
      if (t > 0) {
        // Entries from here on are in buckets >= this one: r^2 >= b lim2 / NB.
        const double edge = s.ord_bucket[t * L] * (static_cast<double>(lim2) / NB) * (1.0 - 1e-5);
        T.lb[t] = std::min(lim, std::sqrt(edge));
      }
    }
    built = std::max(built, upto);
  };

  // Blocks of P points (sorted by Da, so a block's needs are alike).
  for (std::size_t q0 = 0; q0 < ms; q0 += P) {
    const std::size_t cnt = std::min<std::size_t>(P, ms - q0);
    float x[P][V];
    double Da[P], slack[P], E[P], x2[P];
    float best[P], second[P];
    std::int32_t bidx[P];
    for (int p = 0; p < P; ++p) {
      const std::size_t q = q0 + std::min<std::size_t>(static_cast<std::size_t>(p), cnt - 1);
      const std::size_t i = s.pts[q].second;
      for (int d = 0; d < V; ++d) x[p][d] = X[i * V + static_cast<std::size_t>(d)];
      const GuidedPoint<V> gp = vec_guided_point<V>(x[p], ta, na, g.c2max);
      Da[p] = gp.Da;
      E[p] = gp.E;
      x2[p] = gp.x2;
      slack[p] = gp.x2 + 2.0 * gp.E;
      best[p] = second[p] = std::numeric_limits<float>::infinity();
      bidx[p] = std::numeric_limits<std::int32_t>::max();
    }
    std::size_t t = 0, t_stop = nt;
    for (;;) {
      if (built <= t) build(std::min(nt, std::max<std::size_t>(t + 4, 2 * built)));
      t_stop = vec_guided_block<V, P>(x, T, t, built, Da, slack, best, bidx, second);
      if (t_stop < built || built == nt) break;
      t = built;
    }
    for (std::size_t p = 0; p < cnt; ++p) {
      const std::size_t i = s.pts[q0 + p].second;
      idx[i] = bidx[p];
      if (dist != nullptr) dist[i] = vec_guided_dist<V>(x[p], best[p]);
      if (lower != nullptr) {
        // Centroids not evaluated: ||x - c|| >= ||c - c_a|| - Da >= lb[t_stop] - Da.
        const double unseen = T.lb[t_stop] - Da[p];
        // Evaluated ones but the winner: ||x - c||^2 >= K + ||x||^2 - E.
        const double seen = std::sqrt(std::max(0.0, static_cast<double>(second[p]) + x2[p] - E[p]));
        lower[i] = std::max(0.0, std::min(unseen, seen) * (1.0 - 1e-12));
      }
    }
  }
}

template <int V>
void vec_assign_guided_v(const float* X, std::size_t n, const GuidedCentroids& g,
                         const std::int32_t* guess, std::int32_t* idx, float* dist, double* lower,
                         const float* drift, int nt) {
  const std::size_t k = g.k;
  std::vector<std::size_t> start(k + 1, 0), order(n);
  for (std::size_t i = 0; i < n; ++i) ++start[static_cast<std::size_t>(guess[i]) + 1];
  for (std::size_t j = 0; j < k; ++j) start[j + 1] += start[j];
  {
    std::vector<std::size_t> pos(start.begin(), start.end() - 1);
    for (std::size_t i = 0; i < n; ++i) order[pos[static_cast<std::size_t>(guess[i])]++] = i;
  }
  // Points (and bounds) gathered by guess, so each group is contiguous: the searches
  // then read memory in order instead of waiting on scattered points.
  std::vector<float> Xs(n * V), ds(dist != nullptr ? n : 0);
  std::vector<double> ls(lower != nullptr ? n : 0);
  std::vector<std::int32_t> is(n);
  const auto nn = static_cast<std::ptrdiff_t>(n);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
  for (std::ptrdiff_t q = 0; q < nn; ++q) {
    if (q + 16 < nn) __builtin_prefetch(X + order[static_cast<std::size_t>(q + 16)] * V);
    const std::size_t i = order[static_cast<std::size_t>(q)];
    std::copy(X + i * V, X + i * V + V, Xs.data() + static_cast<std::size_t>(q) * V);
    if (lower != nullptr) ls[static_cast<std::size_t>(q)] = lower[i];
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    GuidedScratch<V> s;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 8)
#endif
    for (std::ptrdiff_t aa = 0; aa < static_cast<std::ptrdiff_t>(k); ++aa) {
      const std::size_t a = static_cast<std::size_t>(aa);
      const std::size_t m = start[a + 1] - start[a], o = start[a];
      if (m == 0) continue;
      vec_guided_cluster<V>(Xs.data() + o * V, g, static_cast<std::int32_t>(a), m, is.data() + o,
                            dist != nullptr ? ds.data() + o : nullptr,
                            lower != nullptr ? ls.data() + o : nullptr, drift, s);
    }
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
  for (std::ptrdiff_t q = 0; q < nn; ++q) {
    const std::size_t i = order[static_cast<std::size_t>(q)];
    idx[i] = is[static_cast<std::size_t>(q)];
    if (dist != nullptr) dist[i] = ds[static_cast<std::size_t>(q)];
    if (lower != nullptr) lower[i] = ls[static_cast<std::size_t>(q)];
  }
  (void)nt;
}

/// Exact nearest centroid (the brute-force kernel's result, ties included) of
/// each of n points, searched around guess[i] (any valid centroid index).
/// lower (optional, n): on output a lower bound of the distance from x_i to every
/// centroid but its nearest; on input, with drift (k upper bounds of how far each
/// centroid moved since lower was written), it lets points whose guess is
/// provably still nearest skip the search.  drift nullptr: lower is output only.
inline void vec_assign_guided(const float* X, std::size_t n, int v, const GuidedCentroids& g,
                              const std::int32_t* guess, std::int32_t* idx, float* dist, int nt,
                              double* lower = nullptr, const float* drift = nullptr) {
#define SQLLM_VEC_CASE(N) \
  case N:                 \
    return vec_assign_guided_v<N>(X, n, g, guess, idx, dist, lower, drift, nt);
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
