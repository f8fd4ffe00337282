// Tests of the k-means paths added for speed (issue #13): the galloping
// search Lloyd's assignment uses (detail::upper_bound_from), the labelling of
// x by thresholds (a compare pass per threshold for k <= 32, a branch-free
// binary search above), and Lloyd on rows shaped like SmolLM2's (values on a
// per-block 4-bit grid, ~n/2 distinct values, equal weights).
//
// References are plain loops: std::upper_bound, and the nearest centroid by
// scanning all k centroids in double (first minimum = ties to the lower
// index).  Labels and searches must agree exactly (the same comparisons of
// the same values); SSE bounds use the tolerances of test_kmeans1d.cpp.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "sqllm/kmeans1d.hpp"

namespace {

using sqllm::KMeans1D;
using sqllm::KMeans1DParams;
using sqllm::KMeansMethod;

KMeans1DParams params(int k, KMeansMethod method, int max_iter = 50) {
  KMeans1DParams p;
  p.k = k;
  p.method = method;
  p.max_iter = max_iter;
  return p;
}

/// Nearest centroid of v in double, ties to the lower index (the reference labelling).
template <class T>
std::int32_t nearest(const std::vector<T>& c, T v) {
  const double x = static_cast<double>(v);
  std::int32_t best = 0;
  double bd = (x - static_cast<double>(c[0])) * (x - static_cast<double>(c[0]));
  for (std::size_t t = 1; t < c.size(); ++t) {
    const double d = (x - static_cast<double>(c[t])) * (x - static_cast<double>(c[t]));
    if (d < bd) {
      bd = d;
      best = static_cast<std::int32_t>(t);
    }
  }
  return best;
}

/// Weighted SSE of labels/centroids in double (w == nullptr: ones).
template <class T>
double sse_of(const std::vector<T>& x, const T* w, const std::vector<T>& c,
              const std::vector<std::int32_t>& l) {
  double s = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double d = static_cast<double>(x[i]) - static_cast<double>(c[static_cast<std::size_t>(l[i])]);
    s += (w ? static_cast<double>(w[i]) : 1.0) * d * d;
  }
  return s;
}

}  // namespace

TEST_CASE("kmeans1d fast: upper_bound_from equals std::upper_bound from every hint", "[kmeans1d]") {
  std::mt19937 rng(5150);
  std::uniform_int_distribution<int> grid(-20, 20);
  for (std::size_t m : {std::size_t(1), std::size_t(2), std::size_t(7), std::size_t(33), std::size_t(130)}) {
    std::vector<double> v(m);
    for (auto& e : v) e = grid(rng) / 4.0;  // many duplicates
    std::sort(v.begin(), v.end());
    std::vector<double> probes = {-100.0, 100.0};
    for (double e : v) {
      probes.push_back(e);
      probes.push_back(std::nextafter(e, -1e9));
      probes.push_back(std::nextafter(e, 1e9));
    }
    for (std::size_t lo = 0; lo <= m; ++lo) {
      for (double x : probes) {
        const std::size_t want = static_cast<std::size_t>(std::upper_bound(v.begin() + static_cast<std::ptrdiff_t>(lo), v.end(), x) - v.begin());
        for (std::size_t hint = lo; hint <= m; ++hint) {
          INFO("m=" << m << " lo=" << lo << " hint=" << hint << " x=" << x);
          REQUIRE(sqllm::detail::upper_bound_from(v.data(), lo, m, hint, x) == want);
        }
      }
    }
  }
}

TEST_CASE("kmeans1d fast: labels are the nearest centroid for every k and length", "[kmeans1d]") {
  // k <= 32 takes the compare-per-threshold pass (blocks of 64 values and a
  // tail), larger k the binary search over thresholds padded to a power of
  // two; both must give the reference labels, in float and double, with
  // duplicates, zeros of both signs and k above the number of distinct values.
  std::mt19937 rng(8080);
  std::uniform_int_distribution<int> grid(-40, 40);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> uw(0.1, 3.0);
  for (std::size_t n : {std::size_t(1), std::size_t(63), std::size_t(64), std::size_t(65),
                        std::size_t(1000), std::size_t(4097)}) {
    for (int k : {1, 2, 3, 16, 17, 31, 32, 33, 64, 100, 257}) {
      for (int kind = 0; kind < 2; ++kind) {
        std::vector<float> x(n), w(n);
        for (std::size_t i = 0; i < n; ++i) {
          x[i] = kind == 0 ? static_cast<float>(grid(rng)) / 8.0f : static_cast<float>(nd(rng));
          w[i] = static_cast<float>(uw(rng));
        }
        if (n > 2) {
          x[0] = 0.0f;
          x[1] = -0.0f;
        }
        std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end());
        for (KMeansMethod m : {KMeansMethod::Exact, KMeansMethod::Lloyd}) {
          if (m == KMeansMethod::Exact && k > 64 && n > 1000) continue;  // keep the DP small
          INFO("n=" << n << " k=" << k << " kind=" << kind << " method=" << sqllm::to_string(m));
          KMeans1D<float> kf;
          std::vector<float> cf(static_cast<std::size_t>(k));
          std::vector<std::int32_t> lf(n, -1);
          const double ef = kf.fit(x.data(), w.data(), n, params(k, m), cf.data(), lf.data());
          for (std::size_t i = 0; i < n; ++i) REQUIRE(lf[i] == nearest(cf, x[i]));
          REQUIRE(ef == Approx(sse_of(x, w.data(), cf, lf)).epsilon(1e-12).margin(1e-300));
          // uint8 / uint16 labels: the same values
          if (k <= 256) {
            std::vector<std::uint8_t> l8(n);
            kf.fit(x.data(), w.data(), n, params(k, m), cf.data(), l8.data());
            for (std::size_t i = 0; i < n; ++i) REQUIRE(l8[i] == lf[i]);
          }
          KMeans1D<double> kd;
          std::vector<double> cd(static_cast<std::size_t>(k));
          std::vector<std::uint16_t> ld(n);
          const double ed = kd.fit(xd.data(), wd.data(), n, params(k, m), cd.data(), ld.data());
          std::vector<std::int32_t> ld32(ld.begin(), ld.end());
          for (std::size_t i = 0; i < n; ++i) REQUIRE(ld32[i] == nearest(cd, xd[i]));
          REQUIRE(ed == Approx(sse_of(xd, wd.data(), cd, ld32)).epsilon(1e-12).margin(1e-300));
        }
      }
    }
  }
}

TEST_CASE("kmeans1d fast: Lloyd on SmolLM2-like grid rows stays near the optimum", "[kmeans1d]") {
  // Rows of 576 / 1536 values on a per-block 4-bit grid (blocks of 32 share a
  // scale and an offset, as a Q4_1 GGUF dequantized), equal weights: the
  // whole-model quantizer's case.  Lloyd must never be worse than its start,
  // never better than the optimum, and (as for the Fisher-weighted rows of
  // test_kmeans1d.cpp) within 1% of it.
  std::mt19937 rng(135);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> us(0.5, 2.0);
  for (int trial = 0; trial < 12; ++trial) {
    const std::size_t n = trial % 2 ? 1536 : 576;
    const int k = trial % 3 ? 16 : 8;
    std::vector<float> x(n);
    for (std::size_t b = 0; b < n; b += 32) {
      const double d = 0.004 * us(rng), lo = -8 * d + 0.002 * nd(rng);
      for (std::size_t i = b; i < b + 32; ++i) {
        const double q = std::min(15.0, std::max(0.0, std::round(nd(rng) * 2.5 + 7.5)));
        x[i] = static_cast<float>(lo + d * q);
      }
    }
    KMeans1D<float> km;
    std::vector<float> c(static_cast<std::size_t>(k));
    std::vector<std::int32_t> l(n);
    const double start = km.fit(x.data(), static_cast<const float*>(nullptr), n,
                                params(k, KMeansMethod::Lloyd, 0), c.data(), l.data());
    const double lloyd = km.fit(x.data(), static_cast<const float*>(nullptr), n,
                                params(k, KMeansMethod::Lloyd), c.data(), l.data());
    for (std::size_t i = 0; i < n; ++i) REQUIRE(l[i] == nearest(c, x[i]));
    const double exact = km.fit(x.data(), static_cast<const float*>(nullptr), n,
                                params(k, KMeansMethod::Exact), c.data(), l.data());
    INFO("trial " << trial << " n=" << n << " k=" << k << " start=" << start << " lloyd=" << lloyd
                  << " exact=" << exact);
    // float centroids: the SSE may exceed the optimum by sum(w) (2^-24 max|x|)^2
    double amax = 0;
    for (float v : x) amax = std::max(amax, std::fabs(static_cast<double>(v)));
    const double slack = static_cast<double>(n) * std::ldexp(amax, -24) * std::ldexp(amax, -24);
    REQUIRE(lloyd <= start * (1 + 1e-12));
    REQUIRE(lloyd >= exact * (1 - 1e-9) - slack);
    REQUIRE(lloyd <= exact * 1.01);
  }
}
