// sqllm/kmeans1d.hpp -- weighted 1-D k-means, the lookup-table builder of SqueezeLLM.
//
// Given values x[n] and non-negative weights w[n] (SqueezeLLM: the diagonal of
// the Fisher information), find k centroids c (ascending) minimising the
// weighted SSE  sum_i w_i (x_i - c_{label_i})^2  with label_i the nearest
// centroid.  Two methods:
//
//  * Exact  -- the globally optimal clustering, Ckmeans.1d.dp style: sort,
//    merge duplicates into m distinct weighted points, then a dynamic program
//    over contiguous partitions with the divide-and-conquer optimisation (the
//    optimal split index is monotone because the 1-D SSE cost is Monge), plus
//    the Knuth bound opt[q-1][j] <= opt[q][j].  O(k m log m) time,
//    O(k (m - k)) 32-bit split indices.
//  * Lloyd  -- the distinct points are merged into <= ~256 (or 4k) bins
//    (quantiles of a half-weight, half-count mass, capped in length), the exact
//    DP runs on the bin boundaries (its cost differs from the full cost by a
//    constant, so it is the optimal partition whose cuts are bin boundaries),
//    and Lloyd iterations on the full sorted data refine it.  One iteration
//    costs O(k log m): boundaries are midpoints found by binary search and
//    cluster means come from prefix sums.  Deterministic; the objective never
//    increases; stops when the assignment repeats, after max_iter iterations,
//    or when the relative improvement falls to `tol`.
//
// All arithmetic is in double; cluster costs come from prefix sums of w,
// w*(x-mu), w*(x-mu)^2 with mu the weighted mean (centring avoids most of the
// cancellation of the S2 - S1^2/W formula).  Sorting is an LSD radix sort on
// the IEEE bit patterns.  A KMeans1D object keeps its scratch buffers, so after
// the first call of a given size it does not allocate; use one per thread.
//
// Conventions (both methods):
//  * centroids are ascending (non-decreasing); labels index the nearest
//    output centroid (as rounded to T), ties to the lower index; the returned
//    SSE is computed with those labels and centroids and the weights used;
//  * fewer distinct values m than k: the m values are the first m centroids,
//    the rest repeat the largest value, SSE = 0;
//  * all weights zero (or w == nullptr): equal weights, as upstream SqueezeLLM;
//    a cluster holding only zero-weight points gets their unweighted mean;
//  * n == 0, k outside 1..65536, NaN/Inf in x or w, negative w: sqllm::Error.
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

namespace detail {

/// Exact method: most split indices (4 bytes each) the DP table may hold.
constexpr std::size_t kKMeansMaxDPTable = std::size_t(1) << 27;  // 512 MiB
/// Lloyd initialisation: target number of bins (at least 4k) and the largest
/// k * bins for which the coarse DP runs (else: equal-count initial ranges).
constexpr std::size_t kKMeansCoarseBins = 256;
constexpr std::size_t kKMeansMaxCoarseWork = std::size_t(1) << 22;

inline void check_kmeans_params(const KMeans1DParams& p) {
  SQLLM_CHECK(p.k >= 1 && p.k <= kKMeansMaxK, "kmeans1d: k must be in 1..", kKMeansMaxK,
              ", got ", p.k);
  SQLLM_CHECK(p.method == KMeansMethod::Exact || p.method == KMeansMethod::Lloyd,
              "kmeans1d: unknown method ", static_cast<int>(p.method));
  SQLLM_CHECK(p.max_iter >= 0, "kmeans1d: max_iter must be >= 0, got ", p.max_iter);
  SQLLM_CHECK(std::isfinite(p.tol) && p.tol >= 0, "kmeans1d: tol must be finite and >= 0, got ",
              p.tol);
}

/// "[i]" for a single row, "[row r, col i]" inside kmeans1d_rows.
inline std::string kmeans_where(std::int64_t row, std::size_t i) {
  return row < 0 ? concat("[", i, "]") : concat("[row ", row, ", col ", i, "]");
}

// ---- LSD radix sort of (key, index) items on the IEEE bit pattern ----------

template <class T>
struct RadixItems;

/// float: the 32-bit order-preserving key in the high half, the index in the low.
template <>
struct RadixItems<float> {
  using Item = std::uint64_t;
  static constexpr int kBytes = 4;
  static Item make(float f, std::uint32_t idx) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    u ^= static_cast<std::uint32_t>(-static_cast<std::int32_t>(u >> 31)) | 0x80000000u;
    return (static_cast<Item>(u) << 32) | idx;
  }
  static unsigned byte(Item it, int b) { return static_cast<unsigned>(it >> (32 + 8 * b)) & 0xffu; }
  static std::uint32_t index(Item it) { return static_cast<std::uint32_t>(it); }
  static bool less(Item a, Item b) { return a < b; }
};

template <>
struct RadixItems<double> {
  struct Item {
    std::uint64_t key;
    std::uint32_t idx;
  };
  static constexpr int kBytes = 8;
  static Item make(double f, std::uint32_t idx) {
    std::uint64_t u;
    std::memcpy(&u, &f, sizeof u);
    u ^= static_cast<std::uint64_t>(-static_cast<std::int64_t>(u >> 63)) |
         0x8000000000000000ull;
    return Item{u, idx};
  }
  static unsigned byte(const Item& it, int b) { return static_cast<unsigned>(it.key >> (8 * b)) & 0xffu; }
  static std::uint32_t index(const Item& it) { return it.idx; }
  static bool less(const Item& a, const Item& b) { return a.key < b.key || (a.key == b.key && a.idx < b.idx); }
};

/// Sort a[0..n) by key using b[0..n) as the second buffer and hist[kBytes*256]
/// as scratch; returns whichever of a, b holds the result.  Passes whose byte
/// is the same for every item are skipped.
template <class Traits>
typename Traits::Item* radix_sort(typename Traits::Item* a, typename Traits::Item* b, std::size_t n,
                                  std::uint32_t* hist) {
  using Item = typename Traits::Item;
  if (n < 96) {
    std::sort(a, a + n, [](const Item& u, const Item& v) { return Traits::less(u, v); });
    return a;
  }
  constexpr int NB = Traits::kBytes;
  std::fill(hist, hist + NB * 256, 0u);
  for (std::size_t i = 0; i < n; ++i) {
    for (int d = 0; d < NB; ++d) ++hist[d * 256 + Traits::byte(a[i], d)];
  }
  Item* src = a;
  Item* dst = b;
  for (int d = 0; d < NB; ++d) {
    std::uint32_t* h = hist + d * 256;
    if (h[Traits::byte(src[0], d)] == n) continue;  // every item has this byte
    std::uint32_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      const std::uint32_t c = h[v];
      h[v] = sum;
      sum += c;
    }
    for (std::size_t i = 0; i < n; ++i) dst[h[Traits::byte(src[i], d)]++] = src[i];
    std::swap(src, dst);
  }
  return src;
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
    const double s2 = Q2[j] - Q2[i];
    return W > 0 ? s2 - s1 * s1 / W : 0.0;
  }
  double centroid(std::size_t a, std::size_t b) const;
  void validate(const T* x, const T* w, std::size_t n, std::int64_t row, bool* use_w) const;
  void sort_and_merge(const T* x, const T* w, std::size_t n, bool use_w);
  void dp_partition(const double* Q0, const double* Q1, const double* Q2, std::size_t B,
                    std::size_t k);
  void dp_layer(const double* Q0, const double* Q1, const double* Q2, std::size_t q,
                std::size_t width, std::size_t jlo, std::size_t jhi, std::size_t ilo,
                std::size_t ihi);
  void init_lloyd(std::size_t k);
  void run_lloyd(std::size_t k, const KMeans1DParams& p);
  template <class Label>
  double finish(std::size_t k, std::size_t n, T* centroids, Label* labels);

  // sorted, merged data (m_ distinct values)
  std::vector<Item> items_, items_tmp_;
  std::vector<std::uint32_t> hist_;
  const Item* sorted_ = nullptr;
  std::size_t m_ = 0;
  int iters_ = 0;
  double mu_ = 0;
  std::vector<double> v_, W_, cnt_;                // distinct values, weights, counts
  std::vector<std::uint32_t> gstart_;              // first sorted position of value g
  std::vector<double> P0_, P1_, P2_, C0_, C1_;     // prefix sums (centred)
  // clustering state
  std::vector<double> c_, cs_;                     // centroids (double; rounded to T)
  std::vector<std::uint32_t> s_, sprev_;           // cluster boundaries in distinct index
  std::vector<std::uint32_t> pos_;                 // coarse bin boundaries
  std::vector<double> Q0_, Q1_, Q2_;               // prefix sums at bin boundaries
  std::vector<double> Dprev_, Dcur_;               // DP rows
  std::vector<std::uint32_t> J_, cuts_;            // DP split indices, optimal cuts
  std::vector<std::uint32_t> lab_, next_;          // label per distinct value; next distinct centroid
};

// ---- implementation ----------------------------------------------------------

template <class T>
double KMeans1D<T>::centroid(std::size_t a, std::size_t b) const {
  const double W = P0_[b] - P0_[a];
  double c;
  if (W > 0) {
    c = mu_ + (P1_[b] - P1_[a]) / W;
  } else {  // only zero-weight points: their unweighted mean
    c = mu_ + (C1_[b] - C1_[a]) / (C0_[b] - C0_[a]);
  }
  // the mean lies in [v_a, v_{b-1}]; clamp away rounding so centroids stay ordered
  return std::min(std::max(c, v_[a]), v_[b - 1]);
}

template <class T>
void KMeans1D<T>::validate(const T* x, const T* w, std::size_t n, std::int64_t row,
                           bool* use_w) const {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  bool ok = true;
  for (std::size_t i = 0; i < n; ++i) ok &= std::fabs(x[i]) < kInf;  // false for NaN, Inf
  if (!ok) {
    for (std::size_t i = 0; i < n; ++i) {
      SQLLM_CHECK(std::fabs(x[i]) < kInf, "kmeans1d: x", detail::kmeans_where(row, i), " = ",
                  x[i], " is not finite");
    }
  }
  *use_w = false;
  if (w == nullptr) return;
  double sum = 0;
  for (std::size_t i = 0; i < n; ++i) {
    ok &= w[i] >= 0 && w[i] < kInf;  // false for NaN, Inf, negatives
    sum += static_cast<double>(w[i]);
  }
  if (!ok) {
    for (std::size_t i = 0; i < n; ++i) {
      SQLLM_CHECK(std::fabs(w[i]) < kInf, "kmeans1d: w", detail::kmeans_where(row, i), " = ",
                  w[i], " is not finite");
      SQLLM_CHECK(w[i] >= 0, "kmeans1d: w", detail::kmeans_where(row, i), " = ", w[i],
                  " is negative (weights must be >= 0)");
    }
  }
  SQLLM_CHECK(std::isfinite(sum), "kmeans1d: the weights w",
              row < 0 ? std::string() : detail::concat(" of row ", row),
              " sum to infinity; rescale them");
  *use_w = sum > 0;  // all zero: equal weights
}

template <class T>
void KMeans1D<T>::sort_and_merge(const T* x, const T* w, std::size_t n, bool use_w) {
  items_.resize(n);
  items_tmp_.resize(n);
  hist_.resize(Radix::kBytes * 256);
  for (std::size_t i = 0; i < n; ++i) items_[i] = Radix::make(x[i], static_cast<std::uint32_t>(i));
  sorted_ = detail::radix_sort<Radix>(items_.data(), items_tmp_.data(), n, hist_.data());

  v_.resize(n);
  W_.resize(n);
  cnt_.resize(n);
  gstart_.resize(n + 1);
  std::size_t m = 0;
  double prev = 0;
  for (std::size_t j = 0; j < n; ++j) {
    const std::uint32_t i = Radix::index(sorted_[j]);
    const double xv = static_cast<double>(x[i]);
    const double wv = use_w ? static_cast<double>(w[i]) : 1.0;
    if (j == 0 || xv != prev) {  // -0.0 and +0.0 merge
      gstart_[m] = static_cast<std::uint32_t>(j);
      v_[m] = xv;
      W_[m] = 0;
      cnt_[m] = 0;
      ++m;
      prev = xv;
    }
    W_[m - 1] += wv;
    cnt_[m - 1] += 1;
  }
  gstart_[m] = static_cast<std::uint32_t>(n);
  m_ = m;

  double sw = 0, swx = 0;
  for (std::size_t g = 0; g < m; ++g) {
    sw += W_[g];
    swx += W_[g] * v_[g];
  }
  mu_ = std::min(std::max(swx / sw, v_[0]), v_[m - 1]);
  P0_.resize(m + 1);
  P1_.resize(m + 1);
  P2_.resize(m + 1);
  C0_.resize(m + 1);
  C1_.resize(m + 1);
  P0_[0] = P1_[0] = P2_[0] = C0_[0] = C1_[0] = 0;
  for (std::size_t g = 0; g < m; ++g) {
    const double d = v_[g] - mu_;
    const double wd = W_[g] * d;
    P0_[g + 1] = P0_[g] + W_[g];
    P1_[g + 1] = P1_[g] + wd;
    P2_[g + 1] = P2_[g] + wd * d;
    C0_[g + 1] = C0_[g] + cnt_[g];
    C1_[g + 1] = C1_[g] + cnt_[g] * d;
  }
}

// One DP layer q (2 <= q < k) by divide and conquer: D_q[j] for j in [jlo, jhi],
// the optimal split searched in [ilo, ihi] (monotone in j) intersected with
// [opt_{q-1}[j], j-1] (Knuth).  Dprev_ holds layer q-1, Dcur_ receives layer q.
template <class T>
void KMeans1D<T>::dp_layer(const double* Q0, const double* Q1, const double* Q2, std::size_t q,
                           std::size_t width, std::size_t jlo, std::size_t jhi, std::size_t ilo,
                           std::size_t ihi) {
  while (jlo <= jhi) {
    const std::size_t j = jlo + (jhi - jlo) / 2;
    std::size_t lo = ilo;
    if (q > 2 && j - (q - 1) < width) {
      lo = std::max<std::size_t>(lo, J_[(q - 3) * width + (j - (q - 1))]);
    }
    const std::size_t hi = std::min(ihi, j - 1);
    lo = std::min(lo, hi);
    const double* D = Dprev_.data();
    const double q0 = Q0[j], q1 = Q1[j], q2 = Q2[j];
    double best = std::numeric_limits<double>::infinity();
    std::size_t arg = lo;
    for (std::size_t i = lo; i <= hi; ++i) {
      const double W = q0 - Q0[i];
      const double s1 = q1 - Q1[i];
      const double c = W > 0 ? (q2 - Q2[i]) - s1 * s1 / W : 0.0;
      const double val = D[i] + c;
      if (val < best) {
        best = val;
        arg = i;
      }
    }
    Dcur_[j] = best;
    J_[(q - 2) * width + (j - q)] = static_cast<std::uint32_t>(arg);
    // left half recursively, right half by iteration
    if (j > jlo) dp_layer(Q0, Q1, Q2, q, width, jlo, j - 1, ilo, arg);
    jlo = j + 1;
    ilo = arg;
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
  double best = std::numeric_limits<double>::infinity();
  std::size_t arg = k - 1;
  for (std::size_t i = k - 1; i < B; ++i) {
    const double val = Dprev_[i] + cost(Q0, Q1, Q2, i, B);
    if (val < best) {
      best = val;
      arg = i;
    }
  }
  cuts_[k - 1] = static_cast<std::uint32_t>(arg);
  for (std::size_t q = k - 1; q >= 2; --q) cuts_[q - 1] = J_[(q - 2) * width + (cuts_[q] - q)];
}

// Lloyd's start: the optimal partition whose cuts are coarse-bin boundaries.
template <class T>
void KMeans1D<T>::init_lloyd(std::size_t k) {
  const std::size_t m = m_;
  const std::size_t target = std::max(detail::kKMeansCoarseBins, 4 * k);
  s_.resize(k + 1);
  if (m <= target) {  // the data is small enough: the coarse DP is the exact DP
    dp_partition(P0_.data(), P1_.data(), P2_.data(), m, k);
    for (std::size_t t = 0; t <= k; ++t) s_[t] = cuts_[t];
  } else if (k * target <= detail::kKMeansMaxCoarseWork) {
    // Bins: quantiles of the mass (w/sum w + count/n)/2, each at most
    // ceil(2m/target) distinct values long; between target/2 and 1.5*target+1 bins.
    const double sw = P0_[m], sc = C0_[m];
    const double step = 1.0 / static_cast<double>(target);
    const std::size_t maxlen = (2 * m + target - 1) / target;
    pos_.clear();
    pos_.push_back(0);
    double acc = 0, next = step;
    std::size_t start = 0;
    for (std::size_t g = 0; g + 1 < m; ++g) {
      acc += 0.5 * (W_[g] / sw + cnt_[g] / sc);
      if (acc >= next || g + 1 - start >= maxlen) {
        pos_.push_back(static_cast<std::uint32_t>(g + 1));
        start = g + 1;
        while (next <= acc) next += step;
      }
    }
    pos_.push_back(static_cast<std::uint32_t>(m));
    const std::size_t B = pos_.size() - 1;  // >= target/2 >= 2k > k
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
  } else {  // very large k: equal numbers of distinct values
    for (std::size_t t = 0; t <= k; ++t) s_[t] = static_cast<std::uint32_t>(t * m / k);
  }
  c_.resize(k);
  for (std::size_t t = 0; t < k; ++t) c_[t] = centroid(s_[t], s_[t + 1]);
}

template <class T>
void KMeans1D<T>::run_lloyd(std::size_t k, const KMeans1DParams& p) {
  const std::size_t m = m_;
  const double* v = v_.data();
  sprev_ = s_;
  double prev_sse = std::numeric_limits<double>::infinity();
  iters_ = 0;
  for (int it = 0; it < p.max_iter; ++it) {
    // assignment: values <= midpoint go to the lower centroid
    s_[0] = 0;
    s_[k] = static_cast<std::uint32_t>(m);
    for (std::size_t t = 1; t < k; ++t) {
      const double mid = 0.5 * (c_[t - 1] + c_[t]);
      s_[t] = static_cast<std::uint32_t>(std::upper_bound(v + s_[t - 1], v + m, mid) - v);
    }
    if (s_ == sprev_) break;  // same assignment: the means are a fixed point
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

// Round the centroids to T, label every distinct value with its nearest
// centroid (ties: lower index), scatter the labels, return the SSE.
template <class T>
template <class Label>
double KMeans1D<T>::finish(std::size_t k, std::size_t n, T* centroids, Label* labels) {
  const std::size_t m = m_;
  cs_.resize(k);
  for (std::size_t t = 0; t < k; ++t) {
    double c = static_cast<double>(static_cast<T>(c_[t]));
    if (t > 0) c = std::max(c, cs_[t - 1]);
    cs_[t] = c;
    centroids[t] = static_cast<T>(c);
  }
  next_.resize(k);  // next_[t]: first index u > t with cs_[u] != cs_[t] (k if none)
  next_[k - 1] = static_cast<std::uint32_t>(k);
  for (std::size_t t = k - 1; t-- > 0;) {
    next_[t] = cs_[t + 1] != cs_[t] ? static_cast<std::uint32_t>(t + 1) : next_[t + 1];
  }
  lab_.resize(m);
  double sse = 0;
  std::size_t t = 0;
  for (std::size_t g = 0; g < m; ++g) {
    const double x = v_[g];
    double dt = (x - cs_[t]) * (x - cs_[t]);
    for (;;) {  // nearest centroid is monotone in x: only move up
      const std::size_t u = next_[t];
      if (u >= k) break;
      const double du = (x - cs_[u]) * (x - cs_[u]);
      if (!(du < dt)) break;
      t = u;
      dt = du;
    }
    lab_[g] = static_cast<std::uint32_t>(t);
    sse += W_[g] * dt;
  }
  if (labels != nullptr) {
    for (std::size_t g = 0; g < m; ++g) {
      const Label l = static_cast<Label>(lab_[g]);
      for (std::uint32_t j = gstart_[g]; j < gstart_[g + 1]; ++j) labels[Radix::index(sorted_[j])] = l;
    }
  }
  (void)n;
  return sse;
}

template <class T>
template <class Label>
double KMeans1D<T>::fit_row(const T* x, const T* w, std::size_t n, const KMeans1DParams& p,
                            T* centroids, Label* labels, std::int64_t row) {
  static_assert(std::is_integral<Label>::value, "KMeans1D::fit: Label must be an integer type");
  detail::check_kmeans_params(p);
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
  bool use_w = false;
  validate(x, w, n, row, &use_w);
  sort_and_merge(x, w, n, use_w);
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
    run_lloyd(k, p);
  }
  return finish(k, n, centroids, labels);
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
  detail::check_kmeans_params(p);
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
