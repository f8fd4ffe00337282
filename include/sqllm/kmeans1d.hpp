// sqllm/kmeans1d.hpp -- weighted 1-D k-means, the lookup-table builder of SqueezeLLM.
//
// Given values x[n] and non-negative weights w[n] (SqueezeLLM: the diagonal of
// the Fisher information), find k centroids c (ascending) minimising the
// weighted SSE  sum_i w_i (x_i - c_{label_i})^2  with label_i the nearest
// centroid.  Both methods first sort x (LSD radix sort on the IEEE bit
// patterns; float items carry their weight along) and merge duplicates into
// m distinct weighted values with prefix sums of w, w*d, w*d^2 (d = v -
// median: a central origin keeps the cluster cost S2 - S1^2/W free of
// cancellation); all arithmetic is in double.  The labels come last, straight
// from x: the first value of each cluster is a threshold, and a label is the
// number of thresholds <= x (no scatter through the sort order).
//
//  * Exact  -- the globally optimal clustering, Ckmeans.1d.dp style: a
//    dynamic program over contiguous partitions with the divide-and-conquer
//    optimisation (the optimal split index is monotone because the 1-D SSE
//    cost is Monge) plus the Knuth bound opt[q-1][j] <= opt[q][j]; the inner
//    argmin runs 2 (SSE2) or 4 (AVX2, detected at run time) candidates at a
//    time.  O(k m log m) time, (k-2)(m-k+1) 32-bit split indices.
//  * Lloyd  -- fast and deterministic.  The distinct values are grouped into
//    about max(64, 8k) bins of roughly equal weighted SSE (greedy, the bin SSE
//    predicted by high-resolution quantisation theory, so bins are narrow
//    where an optimal quantiser puts many centroids: tails, heavy points); the
//    exact DP on the bin boundaries gives the start (its cost differs from the
//    full cost by a constant, so it is the optimal partition whose cuts are bin
//    boundaries).  Lloyd iterations on the full sorted data follow, O(k log d)
//    each (boundaries are midpoints found by galloping from where they were,
//    d the distance moved; means come from the prefix sums), then a polish:
//    the exact DP with every cut confined to a window of half a bin around
//    its current place, coarse to fine (every s-th position of the window,
//    then every position within s of the new cut, ...), and Lloyd again.  The
//    objective never increases.  Lloyd stops when the assignment repeats,
//    after max_iter iterations, or when an iteration gains <= tol (relative).
//
// A KMeans1D object keeps its scratch buffers, so after the first call of a
// given size it does not allocate; use one per thread.
//
// Conventions (both methods):
//  * centroids are ascending (non-decreasing); labels index the nearest
//    output centroid (as rounded to T), ties to the lower index; the returned
//    SSE is computed with those labels and centroids and the weights used;
//  * fewer distinct values m than k: the m values are the first m centroids,
//    the rest repeat the largest value, SSE = 0;
//  * all weights zero (or w == nullptr): equal weights, as upstream SqueezeLLM;
//    a cluster holding only zero-weight points gets their unweighted mean;
//  * n == 0, k outside 1..65536, NaN/Inf in x or w, negative w: sqllm::Error
//    naming the argument, the index and the value.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
// SIMD paths (same arithmetic as the scalar code); -DSQLLM_KMEANS_NO_SIMD
// keeps only the scalar code (used to test it).
#if defined(__SSE2__) && !defined(SQLLM_KMEANS_NO_SIMD)
#define SQLLM_KMEANS_SSE2 1
#include <emmintrin.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SQLLM_KMEANS_NO_SIMD)
#define SQLLM_KMEANS_AVX2 1
#include <immintrin.h>
#endif

#include "sqllm/error.hpp"

namespace sqllm {

enum class KMeansMethod { Exact, Lloyd };

/// "exact" or "lloyd"; anything else throws sqllm::Error naming the value.
inline KMeansMethod parse_kmeans_method(const std::string& s) {
  if (s == "exact") return KMeansMethod::Exact;
  if (s == "lloyd") return KMeansMethod::Lloyd;
  throw Error(detail::concat("kmeans method must be 'exact' or 'lloyd', got '", s, "'"));
}

inline const char* to_string(KMeansMethod m) {
  return m == KMeansMethod::Exact ? "exact" : "lloyd";
}

/// Largest supported number of clusters.
constexpr int kKMeansMaxK = 65536;

/// Parameters of KMeans1D::fit.
struct KMeans1DParams {
  int k = 16;                                  ///< number of centroids, 1..65536
  KMeansMethod method = KMeansMethod::Exact;   ///< Exact (optimal) or Lloyd (fast)
  int max_iter = 50;  ///< Lloyd: iteration cap (>= 0; 0 returns the initialisation)
  double tol = 0;     ///< Lloyd: also stop when the relative SSE gain of an iteration <= tol
};

/// Throws sqllm::Error unless p is valid (k in 1..65536, max_iter >= 0, tol >= 0).
inline void check_kmeans_params(const KMeans1DParams& p) {
  SQLLM_CHECK(p.k >= 1 && p.k <= kKMeansMaxK, "kmeans1d: k must be in 1..", kKMeansMaxK,
              ", got ", p.k);
  SQLLM_CHECK(p.method == KMeansMethod::Exact || p.method == KMeansMethod::Lloyd,
              "kmeans1d: unknown method ", static_cast<int>(p.method));
  SQLLM_CHECK(p.max_iter >= 0, "kmeans1d: max_iter must be >= 0, got ", p.max_iter);
  SQLLM_CHECK(std::isfinite(p.tol) && p.tol >= 0, "kmeans1d: tol must be finite and >= 0, got ",
              p.tol);
}

namespace detail {

/// Exact method: most split indices (4 bytes each) the DP table may hold.
constexpr std::size_t kKMeansMaxDPTable = std::size_t(1) << 27;  // 512 MiB
/// Lloyd initialisation: about max(64, 8k) equal-SSE bins (on LLM-like rows
/// the optimal partition on them is ~0.3% above the optimum, the polished
/// result ~0.01%); when k * bins exceeds kKMeansCoarseWork, max(2k, work / k)
/// bins; beyond kKMeansMaxCoarseWork no DP: equal numbers of distinct values
/// per cluster start Lloyd.
constexpr std::size_t kKMeansMinBins = 64;
constexpr std::size_t kKMeansBinsPerCluster = 8;
constexpr std::size_t kKMeansCoarseWork = std::size_t(1) << 16;
constexpr std::size_t kKMeansMaxCoarseWork = std::size_t(1) << 21;
/// Lloyd: at most this many (windowed DP polish + Lloyd) rounds after the first Lloyd run.
constexpr int kKMeansPolishRounds = 2;
/// Lloyd polish: candidate cuts on each side of a cut per coarse-to-fine step.
constexpr std::size_t kKMeansPolishSide = 8;

/// "[i]" for a single row, "[row r, col i]" inside kmeans1d_rows.
inline std::string kmeans_where(std::int64_t row, std::size_t i) {
  return row < 0 ? concat("[", i, "]") : concat("[row ", row, ", col ", i, "]");
}

// ---- LSD radix sort of (key, index) items on the IEEE bit pattern ----------

template <class T>
struct RadixItems;

/// float: the 32-bit order-preserving key in the high half, a 32-bit payload
/// in the low (the bits of the value's weight: the sort carries the weights
/// along, so the merge reads them in order instead of gathering w[index]).
template <>
struct RadixItems<float> {
  using Item = std::uint64_t;
  using Key = std::uint32_t;
  static constexpr int kKeyBits = 32;
  static Item make(float f, std::uint32_t payload) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    u ^= static_cast<std::uint32_t>(-static_cast<std::int32_t>(u >> 31)) | 0x80000000u;
    return (static_cast<Item>(u) << 32) | payload;
  }
  static Key key(Item it) { return static_cast<Key>(it >> 32); }
  static std::uint32_t payload(Item it) { return static_cast<std::uint32_t>(it); }
  static double value(Item it) {
    std::uint32_t u = key(it);
    u ^= ((u >> 31) - 1u) | 0x80000000u;  // undo make()
    float f;
    std::memcpy(&f, &u, sizeof f);
    return static_cast<double>(f);
  }
  static bool less(Item a, Item b) { return a < b; }
};

/// double: 64-bit order-preserving key and a 32-bit payload (the index: the
/// merge reads the weight w[index]).
template <>
struct RadixItems<double> {
  struct Item {
    std::uint64_t key;
    std::uint32_t idx;
  };
  using Key = std::uint64_t;
  static constexpr int kKeyBits = 64;
  static Item make(double f, std::uint32_t payload) {
    std::uint64_t u;
    std::memcpy(&u, &f, sizeof u);
    u ^= static_cast<std::uint64_t>(-static_cast<std::int64_t>(u >> 63)) | 0x8000000000000000ull;
    return Item{u, payload};
  }
  static Key key(const Item& it) { return it.key; }
  static std::uint32_t payload(const Item& it) { return it.idx; }
  static double value(const Item& it) {
    std::uint64_t u = it.key;
    u ^= ((u >> 63) - 1u) | 0x8000000000000000ull;
    double f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static bool less(const Item& a, const Item& b) {
    return a.key < b.key || (a.key == b.key && a.idx < b.idx);
  }
};

/// Largest scratch histogram radix_sort needs, in 32-bit counters.
constexpr std::size_t kRadixHistSize = std::size_t(5) << 11;

template <class Key>
int bit_width(Key v) {
  int b = 0;
  while (v != 0) {
    v >>= 1;
    ++b;
  }
  return b;
}

/// Sort x[0..n) (finite, with minimum xmin and maximum xmax) into (key,
/// payload) items, payload(i) the 32-bit payload of x[i]; a and b are buffers
/// of n items, hist has kRadixHistSize counters.
/// LSD radix sort with BITS-bit digits of r = (key - key(xmin)) >> low, low
/// chosen so that PASSES digits cover r; then an insertion pass puts items
/// equal in r (equal in the sign, the exponent and 12+ mantissa bits) in
/// order (by the whole item: key, then payload); if that would move too
/// much, std::sort finishes.  Returns the array holding the result.
template <class Traits, int BITS, int PASSES, class T, class Payload>
typename Traits::Item* radix_sort_range(const T* x, std::size_t n, T xmin, T xmax,
                                        typename Traits::Item* a, typename Traits::Item* b,
                                        std::uint32_t* hist, Payload payload) {
  using Item = typename Traits::Item;
  using Key = typename Traits::Key;
  static_assert((std::size_t(PASSES) << BITS) <= kRadixHistSize, "radix_sort_range");
  constexpr Key kMask = (Key(1) << BITS) - 1;
  // -0.0 sorts before +0.0: a zero extreme may stand for either
  const Key kmin = Traits::key(Traits::make(xmin == 0 ? -T(0) : xmin, 0));
  const Key kmax = Traits::key(Traits::make(xmax == 0 ? T(0) : xmax, 0));
  const int low = std::max(0, bit_width<Key>(kmax - kmin) - BITS * PASSES);
  std::fill(hist, hist + (std::size_t(PASSES) << BITS), 0u);
  for (std::size_t i = 0; i < n; ++i) {
    const Key r = (Traits::key(Traits::make(x[i], 0)) - kmin) >> low;
    for (int d = 0; d < PASSES; ++d) ++hist[(std::size_t(d) << BITS) + ((r >> (d * BITS)) & kMask)];
  }
  const Item* src = nullptr;  // pass 0 reads x directly
  Item* dst = b;
  Item* other = a;
  for (int d = 0; d < PASSES; ++d) {
    std::uint32_t* h = hist + (std::size_t(d) << BITS);
    const int shift = low + d * BITS;
    std::uint32_t sum = 0;
    bool single = false;
    for (std::size_t v = 0; v <= kMask; ++v) {
      const std::uint32_t c = h[v];
      single |= c == n;
      h[v] = sum;
      sum += c;
    }
    if (single && src != nullptr) continue;  // one digit value: already in order
    if (src == nullptr) {
      for (std::size_t i = 0; i < n; ++i) {
        const Item it = Traits::make(x[i], payload(i));
        dst[h[((Traits::key(it) - kmin) >> shift) & kMask]++] = it;
      }
    } else {
      for (std::size_t i = 0; i < n; ++i) {
        const Item it = src[i];
        dst[h[((Traits::key(it) - kmin) >> shift) & kMask]++] = it;
      }
    }
    src = dst;
    std::swap(dst, other);
  }
  Item* out = const_cast<Item*>(src);
  if (low > 0) {  // order items equal in the sorted digits
    const auto less = [](const Item& u, const Item& v) { return Traits::less(u, v); };
    std::size_t moves = 0;
    const std::size_t budget = 8 * n;
    for (std::size_t u = 1; u < n; ++u) {
      const Item it = out[u];
      if (!less(it, out[u - 1])) continue;
      std::size_t v = u;
      for (; v > 0 && less(it, out[v - 1]); --v) out[v] = out[v - 1];
      out[v] = it;
      moves += u - v;
      if (moves > budget) {
        std::sort(out, out + n, less);
        break;
      }
    }
  }
  return out;
}

/// Sorted (key, payload) items of x[0..n): std::sort for tiny n, else
/// radix_sort_range with 8-bit (n < 2048) or 11-bit digits covering 22-24
/// (float) or 40-44 (double) bits of the key range.
template <class Traits, class T, class Payload>
typename Traits::Item* radix_sort(const T* x, std::size_t n, T xmin, T xmax,
                                  typename Traits::Item* a, typename Traits::Item* b,
                                  std::uint32_t* hist, Payload payload) {
  using Item = typename Traits::Item;
  constexpr bool kWide = Traits::kKeyBits == 64;
  if (n < 96) {
    for (std::size_t i = 0; i < n; ++i) a[i] = Traits::make(x[i], payload(i));
    std::sort(a, a + n, [](const Item& u, const Item& v) { return Traits::less(u, v); });
    return a;
  }
  if (n < 2048) return radix_sort_range<Traits, 8, kWide ? 5 : 3>(x, n, xmin, xmax, a, b, hist, payload);
  return radix_sort_range<Traits, 11, kWide ? 4 : 2>(x, n, xmin, xmax, a, b, hist, payload);
}

/// Minimum and maximum of x[0..n) (n >= 1); returns false if some value is
/// NaN or infinite (the extremes are then meaningless).
template <class T>
bool finite_minmax(const T* x, std::size_t n, T* lo_out, T* hi_out) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  T lo = x[0], hi = x[0];
  unsigned bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const T v = x[i];
    bad |= static_cast<unsigned>(!(std::fabs(v) < kInf));
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  *lo_out = lo;
  *hi_out = hi;
  return bad == 0;
}

#if defined(SQLLM_KMEANS_SSE2)
// The scalar loop does not vectorise (min/max with NaN semantics); these do.
inline bool finite_minmax(const float* x, std::size_t n, float* lo_out, float* hi_out) {
  const __m128 inf = _mm_set1_ps(std::numeric_limits<float>::infinity());
  const __m128 absmask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  __m128 lo = _mm_set1_ps(x[0]), hi = lo, bad = _mm_setzero_ps();
  const std::size_t n4 = n - n % 4;
  std::size_t i = 0;
  for (; i < n4; i += 4) {
    const __m128 v = _mm_loadu_ps(x + i);
    bad = _mm_or_ps(bad, _mm_cmpnlt_ps(_mm_and_ps(v, absmask), inf));  // !(|v| < inf)
    lo = _mm_min_ps(lo, v);
    hi = _mm_max_ps(hi, v);
  }
  float l[4], h[4];
  _mm_storeu_ps(l, lo);
  _mm_storeu_ps(h, hi);
  float mn = std::min(std::min(l[0], l[1]), std::min(l[2], l[3]));
  float mx = std::max(std::max(h[0], h[1]), std::max(h[2], h[3]));
  bool ok = _mm_movemask_ps(bad) == 0;
  for (; i < n; ++i) {
    ok &= std::fabs(x[i]) < std::numeric_limits<float>::infinity();
    mn = std::min(mn, x[i]);
    mx = std::max(mx, x[i]);
  }
  *lo_out = mn;
  *hi_out = mx;
  return ok;
}

inline bool finite_minmax(const double* x, std::size_t n, double* lo_out, double* hi_out) {
  const __m128d inf = _mm_set1_pd(std::numeric_limits<double>::infinity());
  const __m128d absmask = _mm_castsi128_pd(_mm_set1_epi64x(0x7fffffffffffffffLL));
  __m128d lo = _mm_set1_pd(x[0]), hi = lo, bad = _mm_setzero_pd();
  const std::size_t n2 = n - n % 2;
  std::size_t i = 0;
  for (; i < n2; i += 2) {
    const __m128d v = _mm_loadu_pd(x + i);
    bad = _mm_or_pd(bad, _mm_cmpnlt_pd(_mm_and_pd(v, absmask), inf));
    lo = _mm_min_pd(lo, v);
    hi = _mm_max_pd(hi, v);
  }
  double l[2], h[2];
  _mm_storeu_pd(l, lo);
  _mm_storeu_pd(h, hi);
  double mn = std::min(l[0], l[1]), mx = std::max(h[0], h[1]);
  bool ok = _mm_movemask_pd(bad) == 0;
  for (; i < n; ++i) {
    ok &= std::fabs(x[i]) < std::numeric_limits<double>::infinity();
    mn = std::min(mn, x[i]);
    mx = std::max(mx, x[i]);
  }
  *lo_out = mn;
  *hi_out = mx;
  return ok;
}
#endif

/// One step of the k-means DP: the first argmin over i in [lo, hi] of
/// D[i] + cost(i, j), where cost(i, j) = S2 - S1^2 / W of the points [i, j)
/// from prefix sums Q* (q* = Q*[j]).  A zero-weight range has S1 == S2 == 0
/// exactly, so it divides by 1 instead of 0.  SSE2 evaluates two i at a time
/// with the same operations as the scalar loop.
inline std::size_t dp_scan_sse2(const double* D, const double* Q0, const double* Q1,
                                const double* Q2, double q0, double q1, double q2, std::size_t lo,
                                std::size_t hi, double* min_out) {
  double best = std::numeric_limits<double>::infinity();
  std::size_t arg = lo, i = lo;
#if defined(SQLLM_KMEANS_SSE2)
  if (hi - lo >= 3) {
    const __m128d vq0 = _mm_set1_pd(q0), vq1 = _mm_set1_pd(q1), vq2 = _mm_set1_pd(q2);
    const __m128d one = _mm_set1_pd(1.0), zero = _mm_setzero_pd(), two = _mm_set1_pd(2.0);
    __m128d vbest = _mm_set1_pd(best), varg = _mm_setzero_pd();
    __m128d vidx = _mm_set_pd(static_cast<double>(i + 1), static_cast<double>(i));
    for (; i + 1 <= hi; i += 2) {
      __m128d W = _mm_sub_pd(vq0, _mm_loadu_pd(Q0 + i));
      const __m128d s1 = _mm_sub_pd(vq1, _mm_loadu_pd(Q1 + i));
      const __m128d s2 = _mm_sub_pd(vq2, _mm_loadu_pd(Q2 + i));
      const __m128d pos = _mm_cmpgt_pd(W, zero);
      W = _mm_or_pd(_mm_and_pd(pos, W), _mm_andnot_pd(pos, one));
      const __m128d val =
          _mm_add_pd(_mm_loadu_pd(D + i), _mm_sub_pd(s2, _mm_div_pd(_mm_mul_pd(s1, s1), W)));
      const __m128d lt = _mm_cmplt_pd(val, vbest);
      vbest = _mm_or_pd(_mm_and_pd(lt, val), _mm_andnot_pd(lt, vbest));
      varg = _mm_or_pd(_mm_and_pd(lt, vidx), _mm_andnot_pd(lt, varg));
      vidx = _mm_add_pd(vidx, two);
    }
    double b[2], a[2];
    _mm_storeu_pd(b, vbest);
    _mm_storeu_pd(a, varg);
    const int l = (b[1] < b[0] || (b[1] == b[0] && a[1] < a[0])) ? 1 : 0;  // first minimum
    best = b[l];
    arg = static_cast<std::size_t>(a[l]);
  }
#endif
  for (; i <= hi; ++i) {
    const double W = q0 - Q0[i];
    const double s1 = q1 - Q1[i];
    const double val = D[i] + ((q2 - Q2[i]) - s1 * s1 / (W > 0 ? W : 1.0));
    const bool lt = val < best;  // branch-free argmin
    best = lt ? val : best;
    arg = lt ? i : arg;
  }
  *min_out = best;
  return arg;
}

#if defined(SQLLM_KMEANS_AVX2)
/// dp_scan_sse2 with four i at a time (AVX2, chosen at run time); the same
/// operations, so the same result.
__attribute__((target("avx2"))) inline std::size_t dp_scan_avx2(
    const double* D, const double* Q0, const double* Q1, const double* Q2, double q0, double q1,
    double q2, std::size_t lo, std::size_t hi, double* min_out) {
  double best = std::numeric_limits<double>::infinity();
  std::size_t arg = lo, i = lo;
  if (hi - lo >= 7) {
    const __m256d vq0 = _mm256_set1_pd(q0), vq1 = _mm256_set1_pd(q1), vq2 = _mm256_set1_pd(q2);
    const __m256d one = _mm256_set1_pd(1.0), zero = _mm256_setzero_pd(), four = _mm256_set1_pd(4.0);
    __m256d vbest = _mm256_set1_pd(best), varg = _mm256_setzero_pd();
    const double d0 = static_cast<double>(i);
    __m256d vidx = _mm256_set_pd(d0 + 3, d0 + 2, d0 + 1, d0);
    for (; i + 3 <= hi; i += 4) {
      __m256d W = _mm256_sub_pd(vq0, _mm256_loadu_pd(Q0 + i));
      const __m256d s1 = _mm256_sub_pd(vq1, _mm256_loadu_pd(Q1 + i));
      const __m256d s2 = _mm256_sub_pd(vq2, _mm256_loadu_pd(Q2 + i));
      W = _mm256_blendv_pd(one, W, _mm256_cmp_pd(W, zero, _CMP_GT_OQ));
      const __m256d val = _mm256_add_pd(_mm256_loadu_pd(D + i),
                                        _mm256_sub_pd(s2, _mm256_div_pd(_mm256_mul_pd(s1, s1), W)));
      const __m256d lt = _mm256_cmp_pd(val, vbest, _CMP_LT_OQ);
      vbest = _mm256_blendv_pd(vbest, val, lt);
      varg = _mm256_blendv_pd(varg, vidx, lt);
      vidx = _mm256_add_pd(vidx, four);
    }
    double b[4], a[4];
    _mm256_storeu_pd(b, vbest);
    _mm256_storeu_pd(a, varg);
    int l = 0;
    for (int u = 1; u < 4; ++u) {  // first minimum
      if (b[u] < b[l] || (b[u] == b[l] && a[u] < a[l])) l = u;
    }
    best = b[l];
    arg = static_cast<std::size_t>(a[l]);
  }
  for (; i <= hi; ++i) {
    const double W = q0 - Q0[i];
    const double s1 = q1 - Q1[i];
    const double val = D[i] + ((q2 - Q2[i]) - s1 * s1 / (W > 0 ? W : 1.0));
    const bool lt = val < best;
    best = lt ? val : best;
    arg = lt ? i : arg;
  }
  *min_out = best;
  return arg;
}

// GCC 12's AVX-512 reduction intrinsics start from a self-initialised
// register (`__m512i __Y = __Y;`), which -Wmaybe-uninitialized reports.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
/// dp_scan_sse2 with eight i at a time (AVX-512F, chosen at run time), the
/// tail as one masked step: short ranges (most calls of the divide and
/// conquer) cost one vector step instead of a scalar loop of divisions.  The
/// same operations on every candidate, the same first minimum.
__attribute__((target("avx512f"))) inline std::size_t dp_scan_avx512(
    const double* D, const double* Q0, const double* Q1, const double* Q2, double q0, double q1,
    double q2, std::size_t lo, std::size_t hi, double* min_out) {
  const __m512d vq0 = _mm512_set1_pd(q0), vq1 = _mm512_set1_pd(q1), vq2 = _mm512_set1_pd(q2);
  const __m512d one = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd();
  const __m512d inf = _mm512_set1_pd(std::numeric_limits<double>::infinity());
  const __m512i step = _mm512_set1_epi64(8);
  __m512d vbest = inf;
  __m512i vidx = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(lo)),
                                  _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  __m512i varg = vidx;
  std::size_t i = lo;
  const std::size_t end = hi + 1;
  if (end - lo <= 8) {  // one candidate per lane: the first minimum is the lowest lane holding it
    const __mmask8 m = static_cast<__mmask8>((1u << (end - lo)) - 1u);
    __m512d W = _mm512_sub_pd(vq0, _mm512_maskz_loadu_pd(m, Q0 + i));
    const __m512d s1 = _mm512_sub_pd(vq1, _mm512_maskz_loadu_pd(m, Q1 + i));
    const __m512d s2 = _mm512_sub_pd(vq2, _mm512_maskz_loadu_pd(m, Q2 + i));
    W = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(W, zero, _CMP_GT_OQ), one, W);
    __m512d val = _mm512_add_pd(_mm512_maskz_loadu_pd(m, D + i),
                                _mm512_sub_pd(s2, _mm512_div_pd(_mm512_mul_pd(s1, s1), W)));
    // lanes that are not candidates, and NaN (never less than anything), count as +inf
    val = _mm512_mask_blend_pd(_mm512_mask_cmp_pd_mask(m, val, inf, _CMP_LT_OQ), inf, val);
    const double best = _mm512_reduce_min_pd(val);
    const unsigned at = _mm512_cmp_pd_mask(val, _mm512_set1_pd(best), _CMP_EQ_OQ) & m;
    *min_out = best;
    return best < std::numeric_limits<double>::infinity()
               ? lo + static_cast<std::size_t>(__builtin_ctz(at)) : lo;
  }
  auto eval = [&](__mmask8 m) {
    __m512d W = _mm512_sub_pd(vq0, _mm512_maskz_loadu_pd(m, Q0 + i));
    const __m512d s1 = _mm512_sub_pd(vq1, _mm512_maskz_loadu_pd(m, Q1 + i));
    const __m512d s2 = _mm512_sub_pd(vq2, _mm512_maskz_loadu_pd(m, Q2 + i));
    W = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(W, zero, _CMP_GT_OQ), one, W);
    const __m512d val = _mm512_add_pd(_mm512_maskz_loadu_pd(m, D + i),
                                      _mm512_sub_pd(s2, _mm512_div_pd(_mm512_mul_pd(s1, s1), W)));
    const __mmask8 lt = _mm512_mask_cmp_pd_mask(m, val, vbest, _CMP_LT_OQ);
    vbest = _mm512_mask_blend_pd(lt, vbest, val);
    varg = _mm512_mask_blend_epi64(lt, varg, vidx);
    vidx = _mm512_add_epi64(vidx, step);
  };
  for (; i + 8 <= end; i += 8) eval(0xFF);
  if (i < end) eval(static_cast<__mmask8>((1u << (end - i)) - 1u));
  // first minimum: the smallest index among the lanes holding the minimum
  const double best = _mm512_reduce_min_pd(vbest);
  const __mmask8 at = _mm512_cmp_pd_mask(vbest, _mm512_set1_pd(best), _CMP_EQ_OQ);
  std::size_t arg = static_cast<std::size_t>(_mm512_mask_reduce_min_epu64(at, varg));
  if (at == 0) arg = lo;  // every candidate NaN/inf-free data never gets here
  *min_out = best;
  return arg;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

inline bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}

inline bool cpu_has_avx512f() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has;
}
#endif

/// Which dp_scan runs: 0 the best the CPU has, 1 SSE2/scalar, 2 AVX2 (for
/// ranges of 8+), 3 AVX-512.  Tests force each path; the results are equal.
inline int& kmeans_dp_scan_path() {
  static int path = 0;
  return path;
}

/// One step of the k-means DP (see dp_scan_sse2): AVX-512 or AVX2 when the CPU has it.
inline std::size_t dp_scan(const double* D, const double* Q0, const double* Q1, const double* Q2,
                           double q0, double q1, double q2, std::size_t lo, std::size_t hi,
                           double* min_out) {
#if defined(SQLLM_KMEANS_AVX2)
  const int path = kmeans_dp_scan_path();
  if ((path == 0 || path == 3) && cpu_has_avx512f())
    return dp_scan_avx512(D, Q0, Q1, Q2, q0, q1, q2, lo, hi, min_out);
  if ((path == 0 || path == 2) && hi - lo >= 7 && cpu_has_avx2())
    return dp_scan_avx2(D, Q0, Q1, Q2, q0, q1, q2, lo, hi, min_out);
#endif
  return dp_scan_sse2(D, Q0, Q1, Q2, q0, q1, q2, lo, hi, min_out);
}

/// std::upper_bound(v + lo, v + m, x) - v (the first g in [lo, m) with
/// x < v[g], else m) for ascending v, found by galloping from hint (lo <=
/// hint <= m): O(log d) comparisons for an answer d away from the hint.
inline std::size_t upper_bound_from(const double* v, std::size_t lo, std::size_t m,
                                    std::size_t hint, double x) {
  if (hint < m && !(x < v[hint])) {  // v[hint] <= x: the answer is above hint
    std::size_t a = hint, step = 1;   // v[a] <= x
    while (true) {
      if (m - a <= step) return static_cast<std::size_t>(std::upper_bound(v + a + 1, v + m, x) - v);
      const std::size_t b = a + step;
      if (x < v[b]) return static_cast<std::size_t>(std::upper_bound(v + a + 1, v + b, x) - v);
      a = b;
      step *= 2;
    }
  }
  std::size_t b = hint, step = 1;  // the answer is <= b (b == m or x < v[b])
  while (true) {
    if (b - lo <= step) return static_cast<std::size_t>(std::upper_bound(v + lo, v + b, x) - v);
    const std::size_t a = b - step;
    if (!(x < v[a])) return static_cast<std::size_t>(std::upper_bound(v + a + 1, v + b, x) - v);
    b = a;
    step *= 2;
  }
}

}  // namespace detail

/// Reusable weighted 1-D k-means solver (T = float or double input; math in
/// double).  Holds scratch buffers: one object per thread, reuse it across rows.
template <class T>
class KMeans1D {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "KMeans1D<T>: T must be float or double");

 public:
  /// Cluster x[0..n) with weights w[0..n) (nullptr: equal weights) into p.k
  /// centroids.  Writes centroids[0..k) ascending and, when labels is not
  /// null, labels[i] = index of the centroid nearest to x[i] (ties to the
  /// lower index).  Returns the weighted SSE with the weights actually used.
  template <class Label>
  double fit(const T* x, const T* w, std::size_t n, const KMeans1DParams& p, T* centroids,
             Label* labels) {
    return fit_row(x, w, n, p, centroids, labels, -1);
  }
  /// As above, without labels.
  double fit(const T* x, const T* w, std::size_t n, const KMeans1DParams& p, T* centroids,
             std::nullptr_t = nullptr) {
    return fit_row(x, w, n, p, centroids, static_cast<std::int32_t*>(nullptr), -1);
  }

  /// fit() whose error messages name row `row` (row < 0: a single vector).
  template <class Label>
  double fit_row(const T* x, const T* w, std::size_t n, const KMeans1DParams& p, T* centroids,
                 Label* labels, std::int64_t row);

  /// Number of distinct values of the last fit (after merging duplicates).
  std::size_t last_distinct() const { return m_; }
  /// Lloyd iterations run by the last fit (0 for Exact).
  int last_iterations() const { return iters_; }

 private:
  using Radix = detail::RadixItems<T>;
  using Item = typename Radix::Item;

  double cost(const double* Q0, const double* Q1, const double* Q2, std::size_t i,
              std::size_t j) const {
    const double W = Q0[j] - Q0[i];
    const double s1 = Q1[j] - Q1[i];
    return (Q2[j] - Q2[i]) - s1 * s1 / (W > 0 ? W : 1.0);  // as detail::dp_scan
  }
  double centroid(std::size_t a, std::size_t b) const;
  /// The weight of a sorted item: its payload's bits (float) or w[payload] (double).
  static double item_weight(const Item& it, const T* w) {
    const std::uint32_t u = Radix::payload(it);
    if (std::is_same<T, float>::value) {
      float f;
      std::memcpy(&f, &u, sizeof f);
      return static_cast<double>(f);
    }
    return static_cast<double>(w[u]);
  }
  bool validate(const T* x, const T* w, std::size_t n, std::int64_t row);
  void sort_and_merge(const T* x, const T* w, std::size_t n, bool use_w);
  void prefix_sums(double mu);
  void dp_partition(const double* Q0, const double* Q1, const double* Q2, std::size_t B,
                    std::size_t k);
  void dp_layer(const double* Q0, const double* Q1, const double* Q2, std::size_t q,
                std::size_t width, std::size_t jlo, std::size_t jhi, std::size_t ilo,
                std::size_t ihi);
  std::size_t greedy_bins(double tau, std::size_t maxlen);
  void init_lloyd(std::size_t k);
  void run_lloyd(std::size_t k, const KMeans1DParams& p, int* budget);
  void window_layer(std::size_t jlo, std::size_t jhi, std::size_t ilo, std::size_t ihi);
  bool polish(std::size_t k);
  void refine(std::size_t k, const KMeans1DParams& p);
  template <class Label>
  double finish(std::size_t k, const T* x, std::size_t n, T* centroids, Label* labels);
  template <class Label>
  void label_values(const T* x, std::size_t n, std::size_t k, Label* labels);

  // sorted, merged data (m_ distinct values)
  std::vector<Item> items_, items_tmp_;
  std::vector<std::uint32_t> hist_;
  const Item* sorted_ = nullptr;
  std::size_t m_ = 0;
  int iters_ = 0;
  T xmin_ = 0, xmax_ = 0;
  double mu_ = 0;
  std::vector<double> v_, W_;                      // distinct values, summed weights
  std::vector<std::uint32_t> gstart_;              // first sorted position of value g
  std::vector<double> P0_, P1_, P2_;               // prefix sums of W, W d, W d^2 (d = v - mu)
  // clustering state
  std::vector<double> c_, cs_;                     // centroids (double; rounded to T)
  std::vector<std::uint32_t> s_, sprev_;           // cluster boundaries in distinct index
  std::vector<std::uint32_t> pos_;                 // coarse bin boundaries
  std::vector<std::uint32_t> rad_, str_;           // polish: window radius and stride per cut
  std::vector<std::uint32_t> cand_, coff_, lim_;   // polish candidates, window t's, last below
  std::vector<double> G0_, G1_, G2_, Dg_;          // prefix sums at the candidates, their DP row
  bool have_bins_ = false;                         // init_lloyd used coarse bins pos_
  std::vector<double> Q0_, Q1_, Q2_;               // prefix sums at bin boundaries
  std::vector<double> Dprev_, Dcur_;               // DP rows
  std::vector<std::uint32_t> J_, cuts_;            // DP split indices, optimal cuts
  std::vector<std::uint32_t> bnd_;                 // values of label t: [bnd_[t], bnd_[t+1])
  std::vector<T> thr_;                             // first value of each label (labelling)
  struct Segment {                                 // a divide-and-conquer step of a DP layer
    std::uint32_t jlo, jhi, ilo, ihi;
  };
  std::vector<Segment> seg_, seg_next_;            // one level of the recursion, the next
};

// ---- implementation ----------------------------------------------------------

template <class T>
double KMeans1D<T>::centroid(std::size_t a, std::size_t b) const {
  const double W = P0_[b] - P0_[a];
  double c;
  if (W > 0) {
    c = mu_ + (P1_[b] - P1_[a]) / W;
  } else {  // only zero-weight points (rare): their unweighted mean
    double s = 0;
    for (std::size_t g = a; g < b; ++g) s += static_cast<double>(gstart_[g + 1] - gstart_[g]) * v_[g];
    c = s / static_cast<double>(gstart_[b] - gstart_[a]);
  }
  // the mean lies in [v_a, v_{b-1}]; clamp away rounding so centroids stay ordered
  return std::min(std::max(c, v_[a]), v_[b - 1]);
}

// Check x and w (finite; w >= 0; NaN fails every comparison); returns whether
// to use w (false: w is null or all zero, so equal weights).
template <class T>
bool KMeans1D<T>::validate(const T* x, const T* w, std::size_t n, std::int64_t row) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  if (!detail::finite_minmax(x, n, &xmin_, &xmax_)) {
    for (std::size_t i = 0; i < n; ++i) {
      SQLLM_CHECK(std::fabs(x[i]) < kInf, "kmeans1d: x", detail::kmeans_where(row, i), " = ",
                  x[i], " is not finite");
    }
  }
  if (w == nullptr) return false;
  unsigned bad = 0, positive = 0;
  for (std::size_t i = 0; i < n; ++i) {  // bitwise ops only, so that it vectorises
    const T v = w[i];
    bad |= static_cast<unsigned>(!(v >= 0)) | static_cast<unsigned>(!(v < kInf));
    positive |= static_cast<unsigned>(v > 0);
  }
  if (bad != 0) {
    for (std::size_t i = 0; i < n; ++i) {
      SQLLM_CHECK(std::fabs(w[i]) < kInf, "kmeans1d: w", detail::kmeans_where(row, i), " = ",
                  w[i], " is not finite");
      SQLLM_CHECK(w[i] >= 0, "kmeans1d: w", detail::kmeans_where(row, i), " = ", w[i],
                  " is negative (weights must be >= 0)");
    }
  }
  return positive != 0;  // all zero: equal weights
}

// Sort, merge duplicates into m_ distinct values v_ with summed weights W_,
// and build the prefix sums of the values centred on mu_, the median: any
// central origin keeps S2 - S1^2/W free of the cancellation that raw sums of
// far-from-zero values would suffer.
template <class T>
void KMeans1D<T>::sort_and_merge(const T* x, const T* w, std::size_t n, bool use_w) {
  items_.resize(n);
  items_tmp_.resize(n);
  hist_.resize(detail::kRadixHistSize);
  // float items carry the weight's bits (0 without weights), double items the index
  constexpr bool kCarryWeight = std::is_same<T, float>::value;
  if (kCarryWeight && use_w) {
    sorted_ = detail::radix_sort<Radix>(x, n, xmin_, xmax_, items_.data(), items_tmp_.data(),
                                        hist_.data(), [w](std::size_t i) {
                                          std::uint32_t u;
                                          std::memcpy(&u, w + i, sizeof u);
                                          return u;
                                        });
  } else if (kCarryWeight) {
    sorted_ = detail::radix_sort<Radix>(x, n, xmin_, xmax_, items_.data(), items_tmp_.data(),
                                        hist_.data(), [](std::size_t) { return std::uint32_t(0); });
  } else {
    sorted_ = detail::radix_sort<Radix>(x, n, xmin_, xmax_, items_.data(), items_tmp_.data(),
                                        hist_.data(),
                                        [](std::size_t i) { return static_cast<std::uint32_t>(i); });
  }

  mu_ = Radix::value(sorted_[n / 2]);
  const double mu = mu_;
  v_.resize(n);
  W_.resize(n);
  gstart_.resize(n + 1);
  P0_.resize(n + 1);
  P1_.resize(n + 1);
  P2_.resize(n + 1);
  // distinct values and their summed weights (-0.0 and +0.0 compare equal and merge)
  double prev = Radix::value(sorted_[0]), gw = 0;
  std::size_t m = 0;
  gstart_[0] = 0;
  v_[0] = prev;
  for (std::size_t j = 0; j < n; ++j) {
    const auto& it = sorted_[j];
    const double xv = Radix::value(it);
    if (xv != prev) {  // close value m
      W_[m] = gw;
      ++m;
      gstart_[m] = static_cast<std::uint32_t>(j);
      v_[m] = xv;
      prev = xv;
      gw = 0;
    }
    gw += use_w ? item_weight(it, w) : 1.0;
  }
  W_[m] = gw;
  ++m;
  gstart_[m] = static_cast<std::uint32_t>(n);
  m_ = m;
  prefix_sums(mu);
}

// P0_, P1_, P2_[0..m_] = prefix sums of W, W d, W d^2 (d = v - mu), four
// values at a time: the running sum advances once per four (a sequential sum
// waits on the add latency at every value); the three inner prefixes come
// from partial sums of the four.  Adding an exact zero changes nothing, so a
// run of zero-weight values has equal prefix sums at both ends (its S0, S1,
// S2 are exactly 0), as with a sequential sum.
template <class T>
void KMeans1D<T>::prefix_sums(double mu) {
  const std::size_t m = m_;
  const double *v = v_.data(), *W = W_.data();
  double *Q0 = P0_.data(), *Q1 = P1_.data(), *Q2 = P2_.data();
  Q0[0] = Q1[0] = Q2[0] = 0;
  double p0 = 0, p1 = 0, p2 = 0;
  std::size_t g = 0;
  for (; g + 4 <= m; g += 4) {
    double a[4], b[4], c[4];
    for (std::size_t u = 0; u < 4; ++u) {
      const double d = v[g + u] - mu;
      a[u] = W[g + u];
      b[u] = a[u] * d;
      c[u] = b[u] * d;
    }
    const double a01 = a[0] + a[1], b01 = b[0] + b[1], c01 = c[0] + c[1];
    Q0[g + 1] = p0 + a[0];
    Q1[g + 1] = p1 + b[0];
    Q2[g + 1] = p2 + c[0];
    Q0[g + 2] = p0 + a01;
    Q1[g + 2] = p1 + b01;
    Q2[g + 2] = p2 + c01;
    Q0[g + 3] = p0 + (a01 + a[2]);
    Q1[g + 3] = p1 + (b01 + b[2]);
    Q2[g + 3] = p2 + (c01 + c[2]);
    p0 += a01 + (a[2] + a[3]);
    p1 += b01 + (b[2] + b[3]);
    p2 += c01 + (c[2] + c[3]);
    Q0[g + 4] = p0;
    Q1[g + 4] = p1;
    Q2[g + 4] = p2;
  }
  for (; g < m; ++g) {
    const double d = v[g] - mu, wd = W[g] * d;
    p0 += W[g];
    p1 += wd;
    p2 += wd * d;
    Q0[g + 1] = p0;
    Q1[g + 1] = p1;
    Q2[g + 1] = p2;
  }
}

// One DP layer q (2 <= q < k) by divide and conquer: D_q[j] for j in [jlo, jhi],
// the optimal split searched in [ilo, ihi] (monotone in j) intersected with
// [opt_{q-1}[j], j-1] (Knuth).  Dprev_ holds layer q-1, Dcur_ receives layer q.
// The recursion runs breadth first: the segments of one level do not depend
// on each other, so consecutive scans overlap in the CPU instead of waiting
// for each other's argmin (a depth-first walk makes every scan wait for the
// previous one); each scan gets the same bounds as in the depth-first order.
template <class T>
void KMeans1D<T>::dp_layer(const double* Q0, const double* Q1, const double* Q2, std::size_t q,
                           std::size_t width, std::size_t jlo, std::size_t jhi, std::size_t ilo,
                           std::size_t ihi) {
  seg_.clear();
  seg_.push_back({static_cast<std::uint32_t>(jlo), static_cast<std::uint32_t>(jhi),
                  static_cast<std::uint32_t>(ilo), static_cast<std::uint32_t>(ihi)});
  const std::uint32_t* Jprev = q > 2 ? J_.data() + (q - 3) * width : nullptr;
  std::uint32_t* Jcur = J_.data() + (q - 2) * width;
  const double* Dp = Dprev_.data();
  double* Dc = Dcur_.data();
  while (!seg_.empty()) {
    seg_next_.clear();
    for (const Segment& g : seg_) {
      const std::size_t j = g.jlo + (g.jhi - g.jlo) / 2;
      std::size_t lo = g.ilo;
      if (Jprev != nullptr && j - (q - 1) < width) lo = std::max<std::size_t>(lo, Jprev[j - (q - 1)]);
      const std::size_t hi = std::min<std::size_t>(g.ihi, j - 1);
      lo = std::min(lo, hi);
      double best;
      const std::size_t arg = detail::dp_scan(Dp, Q0, Q1, Q2, Q0[j], Q1[j], Q2[j], lo, hi, &best);
      Dc[j] = best;
      Jcur[j - q] = static_cast<std::uint32_t>(arg);
      const auto a = static_cast<std::uint32_t>(arg), uj = static_cast<std::uint32_t>(j);
      if (j > g.jlo) seg_next_.push_back({g.jlo, uj - 1, g.ilo, a});
      if (j < g.jhi) seg_next_.push_back({uj + 1, g.jhi, a, g.ihi});
    }
    std::swap(seg_, seg_next_);
  }
}

// Optimal partition of the B points whose prefix sums are Q*[0..B] into k
// non-empty contiguous clusters (1 <= k <= B); writes cuts_[0..k].
template <class T>
void KMeans1D<T>::dp_partition(const double* Q0, const double* Q1, const double* Q2,
                               std::size_t B, std::size_t k) {
  cuts_.resize(k + 1);
  cuts_[0] = 0;
  cuts_[k] = static_cast<std::uint32_t>(B);
  if (k == 1) return;
  const std::size_t width = B - k + 1;  // layer q covers j in [q, q + width - 1]
  Dprev_.resize(B + 1);
  Dcur_.resize(B + 1);
  J_.resize((k - 2) * width);
  for (std::size_t j = 1; j <= width; ++j) Dprev_[j] = cost(Q0, Q1, Q2, 0, j);
  for (std::size_t q = 2; q < k; ++q) {
    dp_layer(Q0, Q1, Q2, q, width, q, q + width - 1, q - 1, q + width - 2);
    std::swap(Dprev_, Dcur_);
  }
  // last layer: only j = B
  double best;
  cuts_[k - 1] = static_cast<std::uint32_t>(
      detail::dp_scan(Dprev_.data(), Q0, Q1, Q2, Q0[B], Q1[B], Q2[B], k - 1, B - 1, &best));
  for (std::size_t q = k - 1; q >= 2; --q) cuts_[q - 1] = J_[(q - 2) * width + (cuts_[q] - q)];
}

// Greedy bins over the distinct values: each bin is the longest run from its
// start whose weighted SSE (from the prefix sums) is <= tau, of at most maxlen
// values.  The SSE of a run grows with its end, so a linear scan finds the
// first end that fails; it tests eight ends at a time without a branch or a
// division (SSE <= tau as S2 W - S1^2 <= tau W), O(m) in all.  Writes pos_;
// returns the number of bins.
template <class T>
std::size_t KMeans1D<T>::greedy_bins(double tau, std::size_t maxlen) {
  const std::size_t m = m_;
  const double *Q0 = P0_.data(), *Q1 = P1_.data(), *Q2 = P2_.data();
  pos_.clear();
  pos_.push_back(0);
  std::size_t a = 0;
  while (a < m) {
    const std::size_t lim = std::min(m, a + maxlen);
    const double q0 = Q0[a], q1 = Q1[a], q2 = Q2[a];
    std::size_t good = a + 1;  // one value always fits
    for (std::size_t b = a + 2; b <= lim;) {
      const std::size_t cnt = std::min<std::size_t>(8, lim + 1 - b);
      unsigned fail = 0;
      for (std::size_t u = 0; u < cnt; ++u) {
        const double W = Q0[b + u] - q0, s1 = Q1[b + u] - q1, s2 = Q2[b + u] - q2;
        fail |= static_cast<unsigned>(s2 * W - s1 * s1 > tau * W) << u;
      }
      if (fail != 0) {
        std::size_t first = 0;  // the first end that fails
        while ((fail & 1u) == 0) {
          fail >>= 1;
          ++first;
        }
        good = b + first - 1;
        break;
      }
      good = b + cnt - 1;
      b += cnt;
    }
    pos_.push_back(static_cast<std::uint32_t>(good));
    a = good;
  }
  return pos_.size() - 1;
}

// Lloyd's start: the optimal partition whose cuts are coarse-bin boundaries.
// The bins are built to resemble an optimal `target`-level quantiser (each
// holds about the same SSE), so they are fine where the optimum puts many
// centroids (the tails, heavy points) and coarse where it puts few.
template <class T>
void KMeans1D<T>::init_lloyd(std::size_t k) {
  const std::size_t m = m_;
  std::size_t target = std::max(detail::kKMeansMinBins, detail::kKMeansBinsPerCluster * k);
  if (k * target > detail::kKMeansCoarseWork) {  // many clusters: fewer bins per cluster
    target = std::max(2 * k, detail::kKMeansCoarseWork / k);
  }
  s_.resize(k + 1);
  have_bins_ = false;
  if (m <= target) {  // the data is small enough: the coarse DP is the exact DP
    dp_partition(P0_.data(), P1_.data(), P2_.data(), m, k);
    for (std::size_t t = 0; t <= k; ++t) s_[t] = cuts_[t];
  } else if (k * target <= detail::kKMeansMaxCoarseWork) {
    // High-resolution estimate of the per-cell SSE of an optimal B-level
    // quantiser of a weight density p: (int p^(1/3))^3 / (12 B^3), with the
    // integral summed over 64 groups of consecutive values.
    const std::size_t groups = std::min<std::size_t>(64, m - 1);
    double integral = 0;
    for (std::size_t b = 0; b < groups; ++b) {
      const std::size_t lo = b * (m - 1) / groups, hi = (b + 1) * (m - 1) / groups;
      const double wsum = P0_[hi] - P0_[lo];
      const double len = v_[hi] - v_[lo];
      const double cl = std::cbrt(len);
      integral += std::cbrt(wsum) * cl * cl;
    }
    const double B3 = static_cast<double>(target) * target * target;
    double tau = integral * integral * integral / (12 * B3);
    if (!(tau > 0)) tau = (P2_[m] - P1_[m] * P1_[m] / P0_[m]) / B3;
    const std::size_t maxlen = std::max<std::size_t>(1, m / std::max(k, target / 4));
    std::size_t B = greedy_bins(tau, maxlen);
    for (int round = 0; round < 3 && tau > 0; ++round) {  // cell SSE ~ B^-3: correct tau
      const double r = static_cast<double>(B) / static_cast<double>(target);
      if (r <= 1.5 && r >= 0.67) break;
      tau *= std::min(64.0, std::max(1.0 / 64, r * r * r));
      B = greedy_bins(tau, maxlen);
    }
    Q0_.resize(B + 1);
    Q1_.resize(B + 1);
    Q2_.resize(B + 1);
    for (std::size_t b = 0; b <= B; ++b) {
      Q0_[b] = P0_[pos_[b]];
      Q1_[b] = P1_[pos_[b]];
      Q2_[b] = P2_[pos_[b]];
    }
    dp_partition(Q0_.data(), Q1_.data(), Q2_.data(), B, k);
    for (std::size_t t = 0; t <= k; ++t) s_[t] = pos_[cuts_[t]];
    have_bins_ = true;  // refine() sizes its polish windows by these bins
  } else {  // very large k: equal numbers of distinct values
    for (std::size_t t = 0; t <= k; ++t) s_[t] = static_cast<std::uint32_t>(t * m / k);
  }
  c_.resize(k);
  for (std::size_t t = 0; t < k; ++t) c_[t] = centroid(s_[t], s_[t + 1]);
}

// Lloyd iterations from c_ (s_ its partition), at most *budget of them
// (decremented).  Stops when the assignment repeats or the relative SSE gain
// of an iteration is <= tol.
template <class T>
void KMeans1D<T>::run_lloyd(std::size_t k, const KMeans1DParams& p, int* budget) {
  const std::size_t m = m_;
  const double* v = v_.data();
  sprev_ = s_;
  double prev_sse = std::numeric_limits<double>::infinity();
  while (*budget > 0) {
    // assignment: values <= midpoint go to the lower centroid; each boundary
    // is searched from where it was (it moves little between iterations)
    s_[0] = 0;
    s_[k] = static_cast<std::uint32_t>(m);
    for (std::size_t t = 1; t < k; ++t) {
      const double mid = 0.5 * (c_[t - 1] + c_[t]);
      const std::size_t lo = s_[t - 1];
      const std::size_t hint = std::min<std::size_t>(std::max<std::size_t>(sprev_[t], lo), m);
      s_[t] = static_cast<std::uint32_t>(detail::upper_bound_from(v, lo, m, hint, mid));
    }
    if (s_ == sprev_) break;  // same assignment: the means are a fixed point
    --*budget;
    ++iters_;
    // update: means of the non-empty clusters; an empty one keeps its centroid
    // (it lies between its neighbours' new means, so the order is kept)
    for (std::size_t t = 0; t < k; ++t) {
      if (s_[t] < s_[t + 1]) c_[t] = centroid(s_[t], s_[t + 1]);
    }
    sprev_ = s_;
    if (p.tol > 0) {
      double sse = 0;
      for (std::size_t t = 0; t < k; ++t) {
        if (s_[t] < s_[t + 1]) sse += cost(P0_.data(), P1_.data(), P2_.data(), s_[t], s_[t + 1]);
      }
      if (prev_sse - sse <= p.tol * prev_sse) break;
      prev_sse = sse;
    }
  }
}

// One layer t >= 2 of the windowed DP over candidate cuts, by divide and
// conquer (breadth first, as dp_layer): for the candidates j in [jlo, jhi] of
// window t (global candidate indices) the best previous cut among the
// candidates [ilo, ihi] of window t-1 that lie below j (at most lim_[j]).
// Dg_ and J_ are indexed by global candidate index; window t-1's D values are
// read and window t's written, disjoint ranges of Dg_.
template <class T>
void KMeans1D<T>::window_layer(std::size_t jlo, std::size_t jhi, std::size_t ilo, std::size_t ihi) {
  const double *G0 = G0_.data(), *G1 = G1_.data(), *G2 = G2_.data();
  double* D = Dg_.data();
  std::uint32_t* J = J_.data();
  seg_.clear();
  seg_.push_back({static_cast<std::uint32_t>(jlo), static_cast<std::uint32_t>(jhi),
                  static_cast<std::uint32_t>(ilo), static_cast<std::uint32_t>(ihi)});
  while (!seg_.empty()) {
    seg_next_.clear();
    for (const Segment& g : seg_) {
      const std::size_t j = g.jlo + (g.jhi - g.jlo) / 2;
      const std::size_t hi = std::min<std::size_t>(g.ihi, lim_[j]);
      double best = std::numeric_limits<double>::infinity();
      std::size_t arg = g.ilo;
      if (hi >= g.ilo) arg = detail::dp_scan(D, G0, G1, G2, G0[j], G1[j], G2[j], g.ilo, hi, &best);
      D[j] = best;
      J[j] = static_cast<std::uint32_t>(arg);
      const auto a = static_cast<std::uint32_t>(arg), uj = static_cast<std::uint32_t>(j);
      if (j > g.jlo) seg_next_.push_back({g.jlo, uj - 1, g.ilo, a});
      if (j < g.jhi) seg_next_.push_back({uj + 1, g.jhi, a, g.ihi});
    }
    std::swap(seg_, seg_next_);
  }
}

// The optimal partition whose cut t (t = 1..k-1) is one of the candidates
// s_[t] + u * str_[t] (u integer) inside [s_[t] - rad_[t], s_[t] + rad_[t]]:
// the exact DP over these candidates (stride 1: over the whole window).  The
// current cuts s_ (non-empty clusters) are candidates, so the SSE cannot
// increase.  Updates s_; returns whether it changed.
template <class T>
bool KMeans1D<T>::polish(std::size_t k) {
  const std::size_t m = m_;
  if (k < 2) return false;
  cand_.clear();
  coff_.resize(k + 2);
  coff_[1] = 0;
  std::size_t prev_first = 0;  // the lowest candidate of window t-1 (window 0 is the cut 0)
  for (std::size_t t = 1; t < k; ++t) {
    const std::size_t c = s_[t], st = str_[t], r = rad_[t];
    // cut t > the lowest cut t-1 (so every candidate has a predecessor) and
    // leaves k - t values for the clusters above it
    const std::size_t lo = std::max(c > r ? c - r : 0, prev_first + 1);
    const std::size_t hi = std::min(c + r, m - (k - t));
    const std::size_t first = c - (c - lo) / st * st;
    for (std::size_t q = first; q <= hi; q += st) cand_.push_back(static_cast<std::uint32_t>(q));
    coff_[t + 1] = static_cast<std::uint32_t>(cand_.size());
    prev_first = first;
  }
  cand_.push_back(static_cast<std::uint32_t>(m));  // window k: the end
  coff_[k + 1] = static_cast<std::uint32_t>(cand_.size());
  const std::size_t total = cand_.size();
  G0_.resize(total);
  G1_.resize(total);
  G2_.resize(total);
  for (std::size_t u = 0; u < total; ++u) {
    G0_[u] = P0_[cand_[u]];
    G1_[u] = P1_[cand_[u]];
    G2_[u] = P2_[cand_[u]];
  }
  // lim_[j]: the last candidate of window t-1 below candidate j of window t
  lim_.resize(total);
  for (std::size_t t = 2; t <= k; ++t) {
    std::size_t i = coff_[t - 1];
    const std::size_t iend = coff_[t];
    for (std::size_t j = coff_[t]; j < coff_[t + 1]; ++j) {
      while (i < iend && cand_[i] < cand_[j]) ++i;
      lim_[j] = static_cast<std::uint32_t>(i - 1);  // i > coff_[t-1]: see lo above
    }
  }
  Dg_.resize(total);
  J_.resize(total);
  for (std::size_t u = coff_[1]; u < coff_[2]; ++u) Dg_[u] = cost(P0_.data(), P1_.data(), P2_.data(), 0, cand_[u]);
  for (std::size_t t = 2; t <= k; ++t) window_layer(coff_[t], coff_[t + 1] - 1, coff_[t - 1], coff_[t] - 1);
  bool changed = false;
  std::size_t c = coff_[k];
  for (std::size_t t = k; t >= 2; --t) {
    c = J_[c];
    changed |= cand_[c] != s_[t - 1];
    s_[t - 1] = cand_[c];
  }
  return changed;
}

// Lloyd iterations from the initialisation; then, when the start came from
// coarse bins, polish rounds, then Lloyd again, while the polish changes
// something.  A round lets each cut move by half the length of the bin it
// lies in (this repairs most of what the coarse cuts cost: ~0.3% -> ~0.01%
// above the optimum on LLM-like rows with k <= 16), coarse to fine: the DP
// over every str-th position of the window (about kKMeansPolishSide
// candidates each side of the cut), then over every position within str of
// the new cut, with str shrinking until it is 1.  max_iter bounds the Lloyd
// iterations; 0 returns the initialisation unpolished.
template <class T>
void KMeans1D<T>::refine(std::size_t k, const KMeans1DParams& p) {
  int budget = p.max_iter;
  iters_ = 0;
  run_lloyd(k, p, &budget);
  if (!have_bins_) return;
  constexpr std::size_t kSide = detail::kKMeansPolishSide;
  for (int round = 0; round < detail::kKMeansPolishRounds && budget > 0; ++round) {
    for (std::size_t t = 0; t < k; ++t) {
      if (s_[t] >= s_[t + 1]) return;  // an empty cluster: the windowed DP needs none
    }
    rad_.assign(k + 1, 0);
    str_.assign(k + 1, 1);
    for (std::size_t t = 1; t < k; ++t) {
      const std::size_t b =
          static_cast<std::size_t>(std::upper_bound(pos_.begin(), pos_.end(), s_[t]) - pos_.begin()) - 1;
      rad_[t] = static_cast<std::uint32_t>(std::max<std::size_t>(2, (pos_[b + 1] - pos_[b]) / 2));
    }
    bool changed = false, more = true;
    while (more) {  // coarse to fine
      more = false;
      for (std::size_t t = 1; t < k; ++t) {
        str_[t] = static_cast<std::uint32_t>((rad_[t] + kSide - 1) / kSide);
        more |= str_[t] > 1;
      }
      changed |= polish(k);
      for (std::size_t t = 1; t < k; ++t) rad_[t] = str_[t];  // next: within a step of the new cut
    }
    if (!changed) return;
    for (std::size_t t = 0; t < k; ++t) c_[t] = centroid(s_[t], s_[t + 1]);
    run_lloyd(k, p, &budget);
  }
}

// Round the centroids to T and label every distinct value with its nearest
// centroid (ties, including equal centroids: the lower index).  The squared
// distance (v - c_t)^2 is unimodal in t, so the values of label t form the
// range [bnd_[t], bnd_[t+1]) of the sorted values: each boundary is a binary
// search.  Labels x (label_values); returns the SSE.
template <class T>
template <class Label>
double KMeans1D<T>::finish(std::size_t k, const T* x, std::size_t n, T* centroids, Label* labels) {
  const std::size_t m = m_;
  const double* v = v_.data();
  cs_.resize(k);
  for (std::size_t t = 0; t < k; ++t) {
    double c = static_cast<double>(static_cast<T>(c_[t]));
    if (t > 0) c = std::max(c, cs_[t - 1]);
    cs_[t] = c;
    centroids[t] = static_cast<T>(c);
  }
  bnd_.assign(k + 1, static_cast<std::uint32_t>(m));
  bnd_[0] = 0;
  std::size_t prev = 0;  // the label of the previous run of equal centroids
  for (std::size_t t = 1; t < k; ++t) {
    if (cs_[t] == cs_[prev]) continue;  // equal centroid: never a label
    // first value strictly closer to cs_[t] than to cs_[prev]
    const double lo_c = cs_[prev], hi_c = cs_[t];
    std::size_t lo = bnd_[prev], hi = m;
    while (lo < hi) {
      const std::size_t g = lo + (hi - lo) / 2;
      if ((v[g] - hi_c) * (v[g] - hi_c) < (v[g] - lo_c) * (v[g] - lo_c)) {
        hi = g;
      } else {
        lo = g + 1;
      }
    }
    for (std::size_t u = prev + 1; u <= t; ++u) bnd_[u] = static_cast<std::uint32_t>(lo);
    prev = t;
  }
  double sse = 0;
  for (std::size_t t = 0; t < k; ++t) {
    const double c = cs_[t];
    double e0 = 0, e1 = 0, e2 = 0, e3 = 0;  // four add chains
    std::size_t g = bnd_[t];
    const std::size_t end = bnd_[t + 1];
    for (; g + 4 <= end; g += 4) {
      e0 += W_[g] * (v[g] - c) * (v[g] - c);
      e1 += W_[g + 1] * (v[g + 1] - c) * (v[g + 1] - c);
      e2 += W_[g + 2] * (v[g + 2] - c) * (v[g + 2] - c);
      e3 += W_[g + 3] * (v[g + 3] - c) * (v[g + 3] - c);
    }
    for (; g < end; ++g) e0 += W_[g] * (v[g] - c) * (v[g] - c);
    sse += (e0 + e1) + (e2 + e3);
  }
  if (labels != nullptr) label_values(x, n, k, labels);
  return sse;
}

// Label x[0..n) from the boundaries bnd_ of finish(): the values of label t
// are the distinct values [bnd_[t], bnd_[t+1]), so the label of x is the
// number of t in 1..k-1 whose first value v_[bnd_[t]] is <= x (an empty label
// shares its boundary with the next one and is counted with it; a boundary at
// m counts as +inf).  Exact comparisons of T values, so these are the labels
// of the binary searches in finish(); no scatter through the sort order.
// k <= 32: one pass of compares per threshold over blocks of x (vectorises);
// larger k: a branch-free binary search per value.
template <class T>
template <class Label>
void KMeans1D<T>::label_values(const T* x, std::size_t n, std::size_t k, Label* labels) {
  const std::size_t m = m_;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  if (k == 1) {
    std::fill(labels, labels + n, Label(0));
    return;
  }
  std::size_t size = 1;  // thresholds, padded with +inf to a power of two
  while (size < k - 1) size *= 2;
  thr_.assign(size, kInf);
  for (std::size_t t = 1; t < k; ++t) {
    if (bnd_[t] < m) thr_[t - 1] = static_cast<T>(v_[bnd_[t]]);
  }
  const T* thr = thr_.data();
  if (k <= 32) {
    constexpr std::size_t kBlock = 64;
    std::int32_t acc[kBlock];
    const std::size_t nt = k - 1;
    auto block = [&](const T* xb, std::size_t len, Label* out) {
      for (std::size_t u = 0; u < len; ++u) acc[u] = 0;
      for (std::size_t t = 0; t < nt; ++t) {
        const T th = thr[t];
        for (std::size_t u = 0; u < len; ++u) acc[u] += xb[u] >= th ? 1 : 0;
      }
      for (std::size_t u = 0; u < len; ++u) out[u] = static_cast<Label>(acc[u]);
    };
    std::size_t i = 0;
    for (; i + kBlock <= n; i += kBlock) block(x + i, kBlock, labels + i);
    if (i < n) block(x + i, n - i, labels + i);
    return;
  }
  for (std::size_t i = 0; i < n; ++i) {
    const T xi = x[i];
    std::size_t pos = 0;  // thr[0..pos) <= xi
    for (std::size_t step = size / 2; step >= 1; step /= 2) pos += thr[pos + step - 1] <= xi ? step : 0;
    pos += thr[pos] <= xi ? 1 : 0;
    labels[i] = static_cast<Label>(pos);
  }
}

template <class T>
template <class Label>
double KMeans1D<T>::fit_row(const T* x, const T* w, std::size_t n, const KMeans1DParams& p,
                            T* centroids, Label* labels, std::int64_t row) {
  static_assert(std::is_integral<Label>::value, "KMeans1D::fit: Label must be an integer type");
  check_kmeans_params(p);
  const std::size_t k = static_cast<std::size_t>(p.k);
  SQLLM_CHECK(n > 0, "kmeans1d: x is empty (n == 0)");
  SQLLM_CHECK(n <= std::numeric_limits<std::uint32_t>::max(), "kmeans1d: x has ", n,
              " values; at most 2^32-1 are supported");
  SQLLM_CHECK(x != nullptr, "kmeans1d: x is null");
  SQLLM_CHECK(centroids != nullptr, "kmeans1d: centroids is null");
  SQLLM_CHECK(labels == nullptr ||
                  static_cast<unsigned long long>(std::numeric_limits<Label>::max()) >= k - 1,
              "kmeans1d: k = ", k, " labels do not fit the label type (max ",
              static_cast<unsigned long long>(std::numeric_limits<Label>::max()), ")");
  const bool use_w = validate(x, w, n, row);
  sort_and_merge(x, w, n, use_w);
  SQLLM_CHECK(std::isfinite(P0_[m_]) && std::isfinite(P2_[m_]), "kmeans1d: the sums of w",
              row < 0 ? std::string() : detail::concat(" (row ", row, ")"),
              " or w*(x - median)^2 overflow double; rescale x or w");
  const std::size_t m = m_;
  iters_ = 0;
  c_.resize(k);
  if (m <= k) {  // every distinct value is a centroid; the rest repeat the largest
    for (std::size_t t = 0; t < k; ++t) c_[t] = v_[std::min(t, m - 1)];
  } else if (p.method == KMeansMethod::Exact) {
    SQLLM_CHECK((k - 1) * (m - k + 1) <= detail::kKMeansMaxDPTable, "kmeans1d: exact method with k = ",
                k, " and ", m, " distinct values needs ", (k - 1) * (m - k + 1),
                " DP entries (limit ", detail::kKMeansMaxDPTable, "); use method 'lloyd'");
    dp_partition(P0_.data(), P1_.data(), P2_.data(), m, k);
    for (std::size_t t = 0; t < k; ++t) c_[t] = centroid(cuts_[t], cuts_[t + 1]);
  } else {
    init_lloyd(k);
    refine(k, p);
  }
  return finish(k, x, n, centroids, labels);
}

// ---- many rows -------------------------------------------------------------

/// Cluster each row of the row-major rows x n matrix x (weights w, same shape,
/// or nullptr) independently: centroids[rows*k], labels[rows*n] (nullable),
/// sse[rows] (nullable).  OpenMP over rows with one KMeans1D per thread;
/// num_threads <= 0 uses the OpenMP default.  An error in any row is rethrown
/// after the parallel region (the lowest failing row's); messages name the row
/// and column.
template <class T, class Label>
void kmeans1d_rows(const T* x, const T* w, std::size_t rows, std::size_t n, const KMeans1DParams& p,
                   T* centroids, Label* labels, double* sse, int num_threads = 0) {
  check_kmeans_params(p);
  SQLLM_CHECK(n > 0, "kmeans1d_rows: x is empty (n == 0)");
  if (rows == 0) return;
  SQLLM_CHECK(x != nullptr, "kmeans1d_rows: x is null");
  SQLLM_CHECK(centroids != nullptr, "kmeans1d_rows: centroids is null");
  const std::size_t k = static_cast<std::size_t>(p.k);
  const std::int64_t nrows = static_cast<std::int64_t>(rows);
  std::atomic<std::int64_t> first_bad{nrows};
  std::exception_ptr error;
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
#else
  (void)num_threads;
#endif
  {
    KMeans1D<T> km;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (std::int64_t r = 0; r < nrows; ++r) {
      if (r > first_bad.load(std::memory_order_relaxed)) continue;  // a lower row failed
      const std::size_t ur = static_cast<std::size_t>(r);
      try {
        const double e = km.fit_row(x + ur * n, w != nullptr ? w + ur * n : nullptr, n, p,
                                    centroids + ur * k, labels != nullptr ? labels + ur * n : labels, r);
        if (sse != nullptr) sse[ur] = e;
      } catch (...) {
#ifdef _OPENMP
#pragma omp critical(sqllm_kmeans1d_rows_error)
#endif
        {
          if (r < first_bad.load()) {
            first_bad.store(r);
            error = std::current_exception();
          }
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

/// kmeans1d_rows without labels.
template <class T>
void kmeans1d_rows(const T* x, const T* w, std::size_t rows, std::size_t n, const KMeans1DParams& p,
                   T* centroids, std::nullptr_t, double* sse, int num_threads = 0) {
  kmeans1d_rows(x, w, rows, n, p, centroids, static_cast<std::int32_t*>(nullptr), sse, num_threads);
}

}  // namespace sqllm
