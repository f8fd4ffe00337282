// The k-means DP's inner argmin (detail::dp_scan) has SSE2/scalar, AVX2 and
// AVX-512 paths chosen at run time.  They evaluate every candidate with the
// same IEEE operations and return the first minimum, so they must agree
// exactly: on the scan itself (random prefix sums, every range length 1..40,
// zero-weight ranges, ties) and on whole fits with each path forced.
#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <vector>

#include "sqllm/kmeans1d.hpp"

namespace {

using sqllm::KMeans1D;
using sqllm::KMeans1DParams;
using sqllm::KMeansMethod;

struct PathGuard {  // restores the automatic choice after a test
  ~PathGuard() { sqllm::detail::kmeans_dp_scan_path() = 0; }
};

std::vector<int> available_paths() {
  std::vector<int> p = {1};
#if defined(SQLLM_KMEANS_AVX2)
  if (sqllm::detail::cpu_has_avx2()) p.push_back(2);
  if (sqllm::detail::cpu_has_avx512f()) p.push_back(3);
#endif
  return p;
}

// Prefix sums of n random points (some with zero weight, some repeated) and a D row.
struct ScanData {
  std::vector<double> Q0, Q1, Q2, D;
};

ScanData make_scan_data(std::size_t n, std::mt19937& rng, bool ties) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::uniform_int_distribution<int> coin(0, 3);
  ScanData s;
  s.Q0.assign(n + 1, 0.0);
  s.Q1.assign(n + 1, 0.0);
  s.Q2.assign(n + 1, 0.0);
  s.D.assign(n + 1, 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    const double w = coin(rng) == 0 ? 0.0 : (ties ? 1.0 : 0.5 + u(rng) * 0.25);
    const double d = ties ? static_cast<double>(i % 3) : u(rng);
    s.Q0[i + 1] = s.Q0[i] + w;
    s.Q1[i + 1] = s.Q1[i] + w * d;
    s.Q2[i + 1] = s.Q2[i] + w * d * d;
    s.D[i] = ties ? 0.0 : std::abs(u(rng));
  }
  s.D[n] = 0.0;
  return s;
}

}  // namespace

TEST_CASE("kmeans1d dp_scan: SSE2, AVX2 and AVX-512 paths agree exactly", "[kmeans1d][simd]") {
#if !defined(SQLLM_KMEANS_AVX2)
  SUCCEED("no x86 SIMD paths in this build");
#else
  std::mt19937 rng(7);
  for (int trial = 0; trial < 40; ++trial) {
    const bool ties = trial % 4 == 3;
    const std::size_t n = 48;
    const ScanData s = make_scan_data(n, rng, ties);
    const std::size_t j = n;
    for (std::size_t lo = 0; lo < 8; ++lo) {
      for (std::size_t len = 1; lo + len <= j && len <= 40; ++len) {
        const std::size_t hi = lo + len - 1;
        double b1, b2, b3;
        const std::size_t a1 = sqllm::detail::dp_scan_sse2(s.D.data(), s.Q0.data(), s.Q1.data(),
                                                           s.Q2.data(), s.Q0[j], s.Q1[j], s.Q2[j],
                                                           lo, hi, &b1);
        // plain loop: the first minimum of the same expression
        double bref = std::numeric_limits<double>::infinity();
        std::size_t aref = lo;
        for (std::size_t i = lo; i <= hi; ++i) {
          const double W = s.Q0[j] - s.Q0[i];
          const double s1 = s.Q1[j] - s.Q1[i];
          const double v = s.D[i] + ((s.Q2[j] - s.Q2[i]) - s1 * s1 / (W > 0 ? W : 1.0));
          if (v < bref) {
            bref = v;
            aref = i;
          }
        }
        REQUIRE(a1 == aref);
        REQUIRE(b1 == bref);
        if (sqllm::detail::cpu_has_avx2() && len >= 8) {
          const std::size_t a2 = sqllm::detail::dp_scan_avx2(s.D.data(), s.Q0.data(), s.Q1.data(),
                                                             s.Q2.data(), s.Q0[j], s.Q1[j],
                                                             s.Q2[j], lo, hi, &b2);
          REQUIRE(a2 == aref);
          REQUIRE(b2 == bref);
        }
        if (sqllm::detail::cpu_has_avx512f()) {
          const std::size_t a3 = sqllm::detail::dp_scan_avx512(
              s.D.data(), s.Q0.data(), s.Q1.data(), s.Q2.data(), s.Q0[j], s.Q1[j], s.Q2[j], lo,
              hi, &b3);
          REQUIRE(a3 == aref);
          REQUIRE(b3 == bref);
        }
      }
    }
  }
#endif
}

TEST_CASE("kmeans1d: fits are identical with every dp_scan path forced", "[kmeans1d][simd]") {
  PathGuard guard;
  const std::vector<int> paths = available_paths();
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> uw(0.0f, 2.0f);
  for (std::size_t n : {1u, 5u, 97u, 700u, 3001u}) {
    std::vector<float> x(n), w(n);
    for (std::size_t i = 0; i < n; ++i) {
      x[i] = nd(rng);
      if (i % 7 == 3 && i > 0) x[i] = x[i - 1];  // duplicates
      w[i] = i % 5 == 0 ? 0.0f : uw(rng);
    }
    for (int k : {2, 3, 8, 16}) {
      for (KMeansMethod method : {KMeansMethod::Exact, KMeansMethod::Lloyd}) {
        KMeans1DParams p;
        p.k = k;
        p.method = method;
        std::vector<float> c0;
        std::vector<std::int32_t> l0;
        double e0 = 0;
        for (int path : paths) {
          sqllm::detail::kmeans_dp_scan_path() = path;
          KMeans1D<float> km;
          std::vector<float> c(static_cast<std::size_t>(k));
          std::vector<std::int32_t> l(n);
          const double e = km.fit(x.data(), w.data(), n, p, c.data(), l.data());
          if (c0.empty()) {
            c0 = c;
            l0 = l;
            e0 = e;
          } else {
            INFO("n " << n << " k " << k << " path " << path);
            REQUIRE(c == c0);
            REQUIRE(l == l0);
            REQUIRE(e == e0);
          }
        }
      }
    }
  }
}
