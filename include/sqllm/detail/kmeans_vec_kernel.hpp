// sqllm/detail/kmeans_vec_kernel.hpp -- the register-blocked nearest-centroid
// kernel behind vec_kmeans and vec_nearest (not public API).
//
// Distances are compared as ||c||^2 - 2 x.c (||x||^2 is the same for every
// centroid and added back for the reported distance): one FMA per coordinate
// and pair.  The fp32 rounding of that form is ~1e-7 of ||c||^2, far below
// the gaps between neighbouring centroids of weight data; on small-integer
// data it is exact.  Centroids are re-laid out in tiles of 8: tile t holds
// -2 * dimension d of centroids 8t..8t+7 contiguously (tile[d * 8 + lane])
// and their squared norms in a last row, so one tile row is one 8-float SIMD
// register.  A block of 4 points is held in registers (as broadcast scalars)
// while the kernel walks all tiles, accumulating 4 x 8 (point, centroid)
// pairs and keeping a running minimum and its index per lane; the final
// reduction over the 8 lanes breaks ties towards the lower index.  V is a compile-time
// constant (2..16), so the loops unroll fully and the compiler keeps the
// accumulators in registers.  Padding lanes of the last tile hold a large
// finite squared norm (kVecPad) that no real centroid can reach.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "sqllm/error.hpp"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace sqllm {

/// Largest |coordinate| the k-means accepts (keeps padded distances finite).
constexpr float kVecMaxAbs = 1e12f;

namespace detail {

#if defined(__AVX512F__)
constexpr int kVecLanes = 16;  // one zmm register of centroids
constexpr int kVecPoints = 8;  // 8 accumulators + 8 minima + 8 indices of 32 registers
#else
constexpr int kVecLanes = 8;   // one ymm register
constexpr int kVecPoints = 4;
#endif
constexpr float kVecPad = 1e30f;

inline void vec_tile_centroids(const float* C, std::size_t k, int v, std::vector<float>& tiles) {
  const std::size_t nt = (k + kVecLanes - 1) / kVecLanes, V = static_cast<std::size_t>(v);
  const std::size_t stride = (V + 1) * kVecLanes;
  tiles.assign(nt * stride, 0.0f);
  for (std::size_t t = 0; t < nt; ++t)
    for (std::size_t lane = 0; lane < kVecLanes; ++lane) tiles[t * stride + V * kVecLanes + lane] = kVecPad;
  for (std::size_t j = 0; j < k; ++j) {
    const std::size_t t = j / kVecLanes, lane = j % kVecLanes;
    double nrm = 0.0;
    for (std::size_t d = 0; d < V; ++d) {
      const float c = C[j * V + d];
      tiles[t * stride + d * kVecLanes + lane] = -2.0f * c;
      nrm += static_cast<double>(c) * static_cast<double>(c);
    }
    tiles[t * stride + V * kVecLanes + lane] = static_cast<float>(nrm);
  }
}

/// Nearest centroid of P points x[P][V] against all tiles.
template <int V, int P>
inline void vec_nearest_block(const float (&x)[P][V], const float* tiles, std::size_t ntiles,
                              std::int32_t* idx, float* dist) {
  float best[P][kVecLanes];
  std::int32_t bidx[P][kVecLanes];
#if defined(__AVX512F__)
  __m512 vbest[P], vacc[P];
  __m512i vidx[P];
  for (int p = 0; p < P; ++p) {
    vbest[p] = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    vidx[p] = _mm512_setzero_si512();
  }
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (std::size_t t = 0; t < ntiles; ++t) {
    const float* c = tiles + t * static_cast<std::size_t>(V + 1) * kVecLanes;
    const __m512 nrm = _mm512_loadu_ps(c + V * kVecLanes);
    for (int p = 0; p < P; ++p) vacc[p] = nrm;
    for (int d = 0; d < V; ++d) {
      const __m512 cd = _mm512_loadu_ps(c + d * kVecLanes);
      for (int p = 0; p < P; ++p) vacc[p] = _mm512_fmadd_ps(cd, _mm512_set1_ps(x[p][d]), vacc[p]);
    }
    const __m512i id = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(t * kVecLanes)));
    for (int p = 0; p < P; ++p) {
      const __mmask16 lt = _mm512_cmp_ps_mask(vacc[p], vbest[p], _CMP_LT_OQ);
      vbest[p] = _mm512_mask_mov_ps(vbest[p], lt, vacc[p]);
      vidx[p] = _mm512_mask_mov_epi32(vidx[p], lt, id);
    }
  }
  for (int p = 0; p < P; ++p) {
    _mm512_storeu_ps(best[p], vbest[p]);
    _mm512_storeu_si512(bidx[p], vidx[p]);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  // The same arithmetic as the portable loop below (e = c - x; acc = fma(e, e, acc)),
  // with the 4 x 8 accumulators, minima and indices held in AVX registers.
  __m256 vbest[P], vacc[P];
  __m256i vidx[P];
  for (int p = 0; p < P; ++p) {
    vbest[p] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    vidx[p] = _mm256_setzero_si256();
  }
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (std::size_t t = 0; t < ntiles; ++t) {
    const float* c = tiles + t * static_cast<std::size_t>(V + 1) * kVecLanes;
    const __m256 nrm = _mm256_loadu_ps(c + V * kVecLanes);
    for (int p = 0; p < P; ++p) vacc[p] = nrm;
    for (int d = 0; d < V; ++d) {
      const __m256 cd = _mm256_loadu_ps(c + d * kVecLanes);
      for (int p = 0; p < P; ++p) vacc[p] = _mm256_fmadd_ps(cd, _mm256_broadcast_ss(&x[p][d]), vacc[p]);
    }
    const __m256i id = _mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int>(t * kVecLanes)));
    for (int p = 0; p < P; ++p) {
      const __m256 lt = _mm256_cmp_ps(vacc[p], vbest[p], _CMP_LT_OQ);
      vbest[p] = _mm256_blendv_ps(vbest[p], vacc[p], lt);
      vidx[p] = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(vidx[p]), _mm256_castsi256_ps(id), lt));
    }
  }
  for (int p = 0; p < P; ++p) {
    _mm256_storeu_ps(best[p], vbest[p]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bidx[p]), vidx[p]);
  }
#else
  for (int p = 0; p < P; ++p)
    for (int l = 0; l < kVecLanes; ++l) {
      best[p][l] = std::numeric_limits<float>::infinity();
      bidx[p][l] = l;
    }
  for (std::size_t t = 0; t < ntiles; ++t) {
    const float* c = tiles + t * static_cast<std::size_t>(V + 1) * kVecLanes;
    float acc[P][kVecLanes];
    for (int p = 0; p < P; ++p)
      for (int l = 0; l < kVecLanes; ++l) acc[p][l] = c[V * kVecLanes + l];
    for (int d = 0; d < V; ++d)
      for (int p = 0; p < P; ++p) {
        const float xv = x[p][d];
        for (int l = 0; l < kVecLanes; ++l) acc[p][l] = std::fma(c[d * kVecLanes + l], xv, acc[p][l]);
      }
    const auto base = static_cast<std::int32_t>(t * kVecLanes);
    for (int p = 0; p < P; ++p)
      for (int l = 0; l < kVecLanes; ++l) {
        const bool lt = acc[p][l] < best[p][l];
        best[p][l] = lt ? acc[p][l] : best[p][l];
        bidx[p][l] = lt ? base + l : bidx[p][l];
      }
  }
#endif
  for (int p = 0; p < P; ++p) {
    float xx = 0.0f;
    for (int d = 0; d < V; ++d) xx = std::fma(x[p][d], x[p][d], xx);
    float bd = best[p][0];
    std::int32_t bi = bidx[p][0];
    for (int l = 1; l < kVecLanes; ++l)
      if (best[p][l] < bd || (best[p][l] == bd && bidx[p][l] < bi)) {
        bd = best[p][l];
        bi = bidx[p][l];
      }
    idx[p] = bi;
    if (dist != nullptr) dist[p] = std::max(0.0f, bd + xx);
  }
}

template <int V>
void vec_nearest_v(const float* X, std::size_t n, const float* tiles, std::size_t k,
                   std::int32_t* idx, float* dist, int nt) {
  constexpr int P = kVecPoints;
  const std::size_t ntiles = (k + kVecLanes - 1) / kVecLanes;
  const std::size_t nblk = (n + P - 1) / P;
  auto run = [&](std::size_t b) {
    const std::size_t i0 = b * P, m = std::min<std::size_t>(P, n - i0);
    float x[P][V] = {};
    for (std::size_t p = 0; p < m; ++p)
      for (int d = 0; d < V; ++d) x[p][d] = X[(i0 + p) * V + static_cast<std::size_t>(d)];
    std::int32_t bi[P];
    float bd[P];
    vec_nearest_block<V, P>(x, tiles, ntiles, bi, bd);
    for (std::size_t p = 0; p < m; ++p) {
      idx[i0 + p] = bi[p];
      if (dist != nullptr) dist[i0 + p] = bd[p];
    }
  };
  if (nt <= 1 || nblk < 2) {
    for (std::size_t b = 0; b < nblk; ++b) run(b);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
  for (std::ptrdiff_t b = 0; b < static_cast<std::ptrdiff_t>(nblk); ++b) run(static_cast<std::size_t>(b));
}

#define SQLLM_VEC_CASE(N) \
  case N:                 \
    return vec_nearest_v<N>(X, n, tiles, k, idx, dist, nt);

inline void vec_nearest_tiled(const float* X, std::size_t n, int v, const float* tiles,
                              std::size_t k, std::int32_t* idx, float* dist, int nt) {
  switch (v) {
    SQLLM_VEC_CASE(2) SQLLM_VEC_CASE(3) SQLLM_VEC_CASE(4) SQLLM_VEC_CASE(5) SQLLM_VEC_CASE(6)
    SQLLM_VEC_CASE(7) SQLLM_VEC_CASE(8) SQLLM_VEC_CASE(9) SQLLM_VEC_CASE(10) SQLLM_VEC_CASE(11)
    SQLLM_VEC_CASE(12) SQLLM_VEC_CASE(13) SQLLM_VEC_CASE(14) SQLLM_VEC_CASE(15) SQLLM_VEC_CASE(16)
    default:
      throw Error(detail::concat("unsupported vector length v=", v, " (supported: 2..16)"));
  }
}
#undef SQLLM_VEC_CASE

}  // namespace detail
}  // namespace sqllm
