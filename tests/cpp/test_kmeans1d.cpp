// Tests of sqllm/kmeans1d.hpp against the plain oracles of
// sqllm/reference/kmeans1d_brute.hpp, plus the properties any clustering
// must have (objective never increases, more centroids never hurt, ...).
//
// Tolerances:
//  * kRelExact = 1e-9 of the SSE plus kAbsExact = 1e-12 of sum w x^2: the
//    optimised DP and the oracles compute the same optimum with different
//    arithmetic (centred prefix sums vs two-pass means).  Both carry rounding
//    errors of about m * 2^-53 * sum w x^2 (m <= 200 here: ~2e-14), which
//    matters only when the optimal SSE is ~0 (e.g. the oracle's mean of a
//    single point is not exactly that point); a wrong partition changes the SSE
//    by orders of magnitude more than either term on this data.
//  * Float centroids: the library returns centroids rounded to T and the SSE
//    at those centroids.  Rounding c by |d| <= ulp(c)/2 adds W*d^2 to a
//    cluster's SSE, so for T = float the SSE may exceed the real optimum by up
//    to sum(w) * (2^-24 max|x|)^2 (kFloatSlack below).
//  * kRelRound = 1e-12: comparisons of SSEs computed by the same code path in
//    a different summation order (per point vs per distinct value).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "sqllm/kmeans1d.hpp"
#include "sqllm/reference/kmeans1d_brute.hpp"

namespace {

using sqllm::KMeans1D;
using sqllm::KMeans1DParams;
using sqllm::KMeansMethod;

constexpr double kRelExact = 1e-9;
constexpr double kAbsExact = 1e-12;
constexpr double kRelRound = 1e-12;

KMeans1DParams params(int k, KMeansMethod method = KMeansMethod::Exact, int max_iter = 50) {
  KMeans1DParams p;
  p.k = k;
  p.method = method;
  p.max_iter = max_iter;
  return p;
}

template <class T>
struct Result {
  std::vector<T> c;
  std::vector<std::int32_t> labels;
  double sse = 0;
};

template <class T>
Result<T> run(const std::vector<T>& x, const std::vector<T>* w, const KMeans1DParams& p) {
  KMeans1D<T> km;
  Result<T> r;
  r.c.resize(static_cast<std::size_t>(p.k));
  r.labels.assign(x.size(), -1);
  r.sse = km.fit(x.data(), w ? w->data() : nullptr, x.size(), p, r.c.data(), r.labels.data());
  return r;
}

template <class T>
Result<T> run(const std::vector<T>& x, std::nullptr_t, const KMeans1DParams& p) {
  return run(x, static_cast<const std::vector<T>*>(nullptr), p);
}

/// Weights the library uses: all-zero or missing -> ones.
template <class T>
std::vector<double> used_weights(const std::vector<T>& x, const std::vector<T>* w) {
  double s = 0;
  if (w) {
    for (T v : *w) s += static_cast<double>(v);
  }
  std::vector<double> u(x.size(), 1.0);
  if (w && s > 0) {
    for (std::size_t i = 0; i < x.size(); ++i) u[i] = static_cast<double>((*w)[i]);
  }
  return u;
}

/// Ascending centroids, nearest-centroid labels (ties to the lower index) and
/// a returned SSE equal to the SSE recomputed from them.
template <class T>
void check_solution(const std::vector<T>& x, const std::vector<T>* w, const Result<T>& r) {
  const std::size_t k = r.c.size();
  for (std::size_t t = 1; t < k; ++t) REQUIRE(r.c[t - 1] <= r.c[t]);
  const std::vector<double> u = used_weights(x, w);
  double sse = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const std::int32_t l = r.labels[i];
    REQUIRE(l >= 0);
    REQUIRE(static_cast<std::size_t>(l) < k);
    const double xi = static_cast<double>(x[i]);
    const double dl = (xi - static_cast<double>(r.c[l])) * (xi - static_cast<double>(r.c[l]));
    for (std::size_t t = 0; t < k; ++t) {
      const double dt = (xi - static_cast<double>(r.c[t])) * (xi - static_cast<double>(r.c[t]));
      INFO("i=" << i << " x=" << xi << " label=" << l << " t=" << t);
      REQUIRE(dl <= dt);
      if (dl == dt) REQUIRE(static_cast<std::size_t>(l) <= t);
    }
    sse += u[i] * dl;
  }
  REQUIRE(r.sse == Approx(sse).epsilon(kRelRound).margin(1e-300));
}

/// Small random data with duplicates (a coarse grid) and occasional zeros.
template <class T>
void random_small(std::mt19937& rng, std::size_t n, std::vector<T>* x, std::vector<T>* w,
                  int weight_mode) {
  std::uniform_int_distribution<int> grid(-12, 12);
  std::uniform_real_distribution<double> unif(-3, 3), uw(0.05, 2);
  std::bernoulli_distribution coin(0.5), rare(0.2);
  x->resize(n);
  w->resize(n);
  const bool on_grid = coin(rng);
  for (std::size_t i = 0; i < n; ++i) {
    (*x)[i] = on_grid ? static_cast<T>(grid(rng) / 4.0) : static_cast<T>(unif(rng));
    if (rare(rng)) (*x)[i] = 0;
    switch (weight_mode) {
      case 0: (*w)[i] = static_cast<T>(uw(rng)); break;                  // positive
      case 1: (*w)[i] = rare(rng) ? T(0) : static_cast<T>(uw(rng)); break;  // some zeros
      default: (*w)[i] = 0; break;                                       // all zero
    }
  }
  if (rare(rng) && n > 1) (*x)[n - 1] = (*x)[0];  // a certain duplicate
}

template <class T>
std::vector<T> laplace(std::mt19937& rng, std::size_t n, double scale) {
  std::exponential_distribution<double> e(1.0);
  std::bernoulli_distribution s(0.5);
  std::vector<T> x(n);
  for (auto& v : x) v = static_cast<T>((s(rng) ? 1 : -1) * scale * e(rng));
  return x;
}

/// Fisher-like weights: g^2 with g heavy tailed (Student-t, 3 dof).
template <class T>
std::vector<T> fisher_weights(std::mt19937& rng, std::size_t n) {
  std::student_t_distribution<double> t(3.0);
  std::vector<T> w(n);
  for (auto& v : w) {
    const double g = t(rng);
    v = static_cast<T>(g * g);
  }
  return w;
}

template <class T>
double max_abs(const std::vector<T>& x) {
  double m = 0;
  for (T v : x) m = std::max(m, std::fabs(static_cast<double>(v)));
  return m;
}

/// sum w x^2 with the weights used: the scale of the rounding errors.
template <class T>
double sse_scale(const std::vector<T>& x, const std::vector<T>* w) {
  const std::vector<double> u = used_weights(x, w);
  double s = 0;
  for (std::size_t i = 0; i < x.size(); ++i) s += u[i] * static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return s;
}

/// |ours - ref| within the exact-comparison tolerance (ours may exceed ref by `slack` more).
inline bool close_to_optimum(double ours, double ref, double scale, double slack = 0) {
  const double tol = kRelExact * ref + kAbsExact * scale;
  return ours >= ref - tol && ours <= ref + tol + slack;
}

template <class T>
double float_slack(const std::vector<T>& x, const std::vector<T>* w) {
  if (!std::is_same<T, float>::value) return 0.0;
  const std::vector<double> u = used_weights(x, w);
  const double sw = std::accumulate(u.begin(), u.end(), 0.0);
  const double d = std::ldexp(max_abs(x), -24);
  return sw * d * d;
}

template <class T>
void exact_vs_brute(std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<T> x, w;
  for (int trial = 0; trial < 1500; ++trial) {
    const std::size_t n = 1 + static_cast<std::size_t>(trial % 12);
    const int k = 1 + (trial / 12) % 5;
    const int mode = static_cast<int>(rng() % 3);
    random_small(rng, n, &x, &w, mode);
    const bool null_w = rng() % 5 == 0;
    const std::vector<T>* wp = null_w ? nullptr : &w;
    const Result<T> r = run(x, wp, params(k));
    const double brute = sqllm::reference::kmeans1d_brute_sse(x.data(), wp ? wp->data() : nullptr, n, k);
    INFO("trial " << trial << " n=" << n << " k=" << k << " mode=" << mode << " null_w=" << null_w);
    check_solution(x, wp, r);
    INFO("ours " << r.sse << " brute " << brute);
    REQUIRE(close_to_optimum(r.sse, brute, sse_scale(x, wp), float_slack(x, wp)));
    // Lloyd on so few points starts from the exact DP: it must agree too
    const Result<T> l = run(x, wp, params(k, KMeansMethod::Lloyd));
    REQUIRE(close_to_optimum(l.sse, brute, sse_scale(x, wp), float_slack(x, wp)));
  }
}

}  // namespace

TEST_CASE("kmeans1d: exact equals brute force on small inputs (double)", "[kmeans1d]") {
  exact_vs_brute<double>(1234u);
}

TEST_CASE("kmeans1d: exact equals brute force on small inputs (float)", "[kmeans1d]") {
  exact_vs_brute<float>(99u);
}

TEST_CASE("kmeans1d: exact equals the quadratic DP on medium inputs", "[kmeans1d]") {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 40; ++trial) {
    const std::size_t n = 20 + static_cast<std::size_t>(rng() % 180);
    const int k = 1 + static_cast<int>(rng() % 24);
    std::vector<double> x = laplace<double>(rng, n, 1.0);
    std::vector<double> w = fisher_weights<double>(rng, n);
    if (trial % 3 == 0) {  // duplicates and zero weights
      for (std::size_t i = 0; i < n; i += 4) x[i] = std::round(x[i] * 2) / 2;
      for (std::size_t i = 1; i < n; i += 5) w[i] = 0;
    }
    const Result<double> r = run(x, &w, params(k));
    const double ref = sqllm::reference::kmeans1d_dp_quadratic_sse(x.data(), w.data(), n, k);
    INFO("trial " << trial << " n=" << n << " k=" << k);
    check_solution(x, &w, r);
    INFO("ours " << r.sse << " ref " << ref);
    REQUIRE(close_to_optimum(r.sse, ref, sse_scale(x, &w)));
  }
}

TEST_CASE("kmeans1d: exact equals the quadratic DP through every sort path", "[kmeans1d]") {
  // n >= 2048 (11-bit digits), 96 <= n < 2048 (8-bit digits), n < 96 (std::sort),
  // with few distinct values (so the O(m^3) oracle stays cheap) spread over a
  // wide range of magnitudes and signs.
  std::mt19937 rng(77);
  for (std::size_t n : {std::size_t(5000), std::size_t(2048), std::size_t(1500), std::size_t(97),
                        std::size_t(60)}) {
    std::vector<double> grid;
    std::uniform_real_distribution<double> u(-1, 1);
    for (int g = 0; g < 150; ++g) grid.push_back(u(rng) * std::pow(10.0, static_cast<int>(rng() % 7) - 3));
    grid.push_back(0.0);
    std::vector<float> xf(n), wf(n);
    std::vector<double> xd(n), wd(n);
    std::uniform_real_distribution<float> uw(0.0f, 2.0f);
    for (std::size_t i = 0; i < n; ++i) {
      xf[i] = static_cast<float>(grid[rng() % grid.size()]);
      xd[i] = xf[i];
      wf[i] = i % 9 == 0 ? 0.0f : uw(rng);
      wd[i] = wf[i];
    }
    for (int k : {1, 2, 5, 12}) {
      INFO("n=" << n << " k=" << k);
      const Result<float> rf = run(xf, &wf, params(k));
      const Result<double> rd = run(xd, &wd, params(k));
      const double ref = sqllm::reference::kmeans1d_dp_quadratic_sse(xd.data(), wd.data(), n, k);
      check_solution(xf, &wf, rf);
      check_solution(xd, &wd, rd);
      REQUIRE(close_to_optimum(rd.sse, ref, sse_scale(xd, &wd)));
      REQUIRE(close_to_optimum(rf.sse, ref, sse_scale(xf, &wf), float_slack(xf, &wf)));
    }
  }
}

TEST_CASE("kmeans1d: k >= distinct values recovers the sorted distinct values", "[kmeans1d]") {
  // A strong check of the sort and the duplicate merge: the centroids must be
  // exactly the sorted distinct values and labels[i] the rank of x[i] among
  // them.  Cases: wide magnitudes (radix on the top bits, then insertion),
  // one tiny outlier next to values a few ulps apart (insertion overflows its
  // budget and std::sort finishes), a narrow range (radix on all bits).
  std::mt19937 rng(99);
  std::vector<std::vector<float>> cases;
  {
    std::vector<float> x(5000);
    std::uniform_real_distribution<double> u(-1, 1);
    for (auto& v : x) v = static_cast<float>(u(rng) * std::pow(10.0, static_cast<int>(rng() % 20) - 10));
    for (std::size_t i = 0; i < x.size(); i += 3) x[i] = x[i / 3];  // duplicates
    x[7] = 0.0f;
    x[8] = -0.0f;
    cases.push_back(x);
  }
  {
    std::vector<float> x(4000);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::nextafter(1.0f, 2.0f) + static_cast<float>((i * 7919) % 4000) * 1.2e-7f;
    x[0] = 1e-30f;
    cases.push_back(x);
  }
  {
    std::vector<float> x(3000);
    std::normal_distribution<double> nd(5.0, 1e-3);
    for (auto& v : x) v = static_cast<float>(nd(rng));
    cases.push_back(x);
  }
  for (std::size_t ci = 0; ci < cases.size(); ++ci) {
    const std::vector<float>& x = cases[ci];
    std::vector<float> uniq(x);
    std::sort(uniq.begin(), uniq.end());
    uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());  // -0.0 == 0.0
    const int k = 8192;
    REQUIRE(uniq.size() <= static_cast<std::size_t>(k));
    for (KMeansMethod m : {KMeansMethod::Exact, KMeansMethod::Lloyd}) {
      INFO("case " << ci << " method " << sqllm::to_string(m));
      const Result<float> r = run(x, nullptr, params(k, m));
      REQUIRE(r.sse == 0.0);
      REQUIRE(std::vector<float>(r.c.begin(), r.c.begin() + static_cast<std::ptrdiff_t>(uniq.size())) == uniq);
      REQUIRE(r.c.back() == uniq.back());
      for (std::size_t i = 0; i < x.size(); ++i) {
        const auto rank = std::lower_bound(uniq.begin(), uniq.end(), x[i]) - uniq.begin();
        REQUIRE(r.labels[i] == rank);
      }
      // and in double
      const std::vector<double> xd(x.begin(), x.end());
      const Result<double> rd = run(xd, nullptr, params(k, m));
      REQUIRE(rd.sse == 0.0);
      for (std::size_t t = 0; t < uniq.size(); ++t) REQUIRE(rd.c[t] == static_cast<double>(uniq[t]));
    }
  }
}

TEST_CASE("kmeans1d: Lloyd never worse than its start, never better than exact", "[kmeans1d]") {
  std::mt19937 rng(2024);
  int moved = 0;
  for (int trial = 0; trial < 24; ++trial) {
    const std::size_t n = trial % 2 ? 4096 : 1500 + static_cast<std::size_t>(rng() % 1000);
    const int k = std::vector<int>{2, 3, 4, 8, 16, 32}[static_cast<std::size_t>(trial % 6)];
    std::vector<float> x = laplace<float>(rng, n, 0.02);
    std::vector<float> w = fisher_weights<float>(rng, n);
    const Result<float> start = run(x, &w, params(k, KMeansMethod::Lloyd, 0));
    const Result<float> lloyd = run(x, &w, params(k, KMeansMethod::Lloyd, 50));
    const Result<float> exact = run(x, &w, params(k));
    INFO("trial " << trial << " n=" << n << " k=" << k << " start=" << start.sse << " lloyd="
                  << lloyd.sse << " exact=" << exact.sse);
    check_solution(x, &w, start);
    check_solution(x, &w, lloyd);
    check_solution(x, &w, exact);
    REQUIRE(lloyd.sse <= start.sse * (1 + kRelRound));
    REQUIRE(lloyd.sse >= exact.sse * (1 - kRelExact) - float_slack(x, &w));
    // The start is the optimum over ~max(64, 8k) equal-SSE bins and the
    // polish re-cuts around it: measured <= 0.3% above the optimum on such
    // rows (mean ~0.01%); 1% catches a broken initialisation or polish.
    REQUIRE(lloyd.sse <= exact.sse * 1.01);
    if (lloyd.sse < start.sse) ++moved;
  }
  REQUIRE(moved > 0);  // the refinement does something on this data
}

TEST_CASE("kmeans1d: Lloyd iterations never increase the objective", "[kmeans1d]") {
  std::mt19937 rng(5);
  std::vector<float> x = laplace<float>(rng, 3000, 1.0);
  std::vector<float> w = fisher_weights<float>(rng, 3000);
  for (int k : {4, 16}) {
    double prev = std::numeric_limits<double>::infinity();
    for (int it = 0; it <= 12; ++it) {
      const Result<float> r = run(x, &w, params(k, KMeansMethod::Lloyd, it));
      INFO("k=" << k << " max_iter=" << it);
      REQUIRE(r.sse <= prev * (1 + kRelRound));
      prev = r.sse;
    }
  }
}

TEST_CASE("kmeans1d: tol stops Lloyd early but keeps a valid solution", "[kmeans1d]") {
  std::mt19937 rng(11);
  std::vector<float> x = laplace<float>(rng, 4096, 1.0);
  std::vector<float> w = fisher_weights<float>(rng, 4096);
  KMeans1DParams p = params(16, KMeansMethod::Lloyd, 50);
  p.tol = 0.5;  // any iteration gaining less than half of the SSE stops
  const Result<float> r = run(x, &w, p);
  check_solution(x, &w, r);
  const Result<float> start = run(x, &w, params(16, KMeansMethod::Lloyd, 0));
  REQUIRE(r.sse <= start.sse * (1 + kRelRound));
}

TEST_CASE("kmeans1d: more clusters never increase the exact SSE", "[kmeans1d]") {
  std::mt19937 rng(3);
  std::vector<float> x = laplace<float>(rng, 1000, 1.0);
  std::vector<float> w = fisher_weights<float>(rng, 1000);
  double prev = std::numeric_limits<double>::infinity();
  for (int k = 1; k <= 40; ++k) {
    const Result<float> r = run(x, &w, params(k));
    INFO("k=" << k);
    REQUIRE(r.sse <= prev * (1 + kRelRound) + float_slack(x, &w));
    prev = r.sse;
  }
}

TEST_CASE("kmeans1d: k >= distinct values gives SSE 0 and repeats the largest value", "[kmeans1d]") {
  // 5 distinct values (two zeros of both signs merge), k = 8
  const std::vector<float> x = {3.0f, -1.0f, 0.0f, 3.0f, 7.5f, -0.0f, 2.0f, -1.0f};
  const std::vector<float> w = {1, 2, 0, 1, 4, 1, 0.5f, 1};
  for (KMeansMethod m : {KMeansMethod::Exact, KMeansMethod::Lloyd}) {
    const Result<float> r = run(x, &w, params(8, m));
    REQUIRE(r.sse == 0.0);
    const std::vector<float> expect = {-1.0f, 0.0f, 2.0f, 3.0f, 7.5f, 7.5f, 7.5f, 7.5f};
    REQUIRE(r.c == expect);
    const std::vector<std::int32_t> lab = {3, 0, 1, 3, 4, 1, 2, 0};  // first occurrences
    REQUIRE(r.labels == lab);
    check_solution(x, &w, r);
    // k == m exactly
    const Result<float> r5 = run(x, &w, params(5, m));
    REQUIRE(r5.sse == 0.0);
    REQUIRE(std::vector<float>(r5.c.begin(), r5.c.end()) ==
            std::vector<float>(expect.begin(), expect.begin() + 5));
  }
  // a single value, n = 1, k = 1 and k = 4
  const std::vector<float> one = {2.5f};
  REQUIRE(run(one, nullptr, params(1)).c == std::vector<float>{2.5f});
  REQUIRE(run(one, nullptr, params(4)).c == std::vector<float>(4, 2.5f));
  REQUIRE(run(one, nullptr, params(4)).labels == std::vector<std::int32_t>{0});
}

TEST_CASE("kmeans1d: k = 1 gives the weighted mean", "[kmeans1d]") {
  const std::vector<double> x = {1, 2, 4, 8};
  const std::vector<double> w = {1, 1, 1, 5};
  const Result<double> r = run(x, &w, params(1));
  REQUIRE(r.c[0] == Approx(47.0 / 8.0).epsilon(1e-15));
  REQUIRE(r.labels == std::vector<std::int32_t>{0, 0, 0, 0});
}

TEST_CASE("kmeans1d: zero weights -> equal weights; nullptr -> ones", "[kmeans1d]") {
  std::mt19937 rng(17);
  std::vector<float> x = laplace<float>(rng, 700, 1.0);
  const std::vector<float> zeros(x.size(), 0.0f), ones(x.size(), 1.0f);
  for (KMeansMethod m : {KMeansMethod::Exact, KMeansMethod::Lloyd}) {
    const Result<float> a = run(x, &zeros, params(6, m));
    const Result<float> b = run(x, &ones, params(6, m));
    const Result<float> c = run(x, static_cast<const std::vector<float>*>(nullptr), params(6, m));
    REQUIRE(a.c == b.c);
    REQUIRE(a.labels == b.labels);
    REQUIRE(a.sse == b.sse);
    REQUIRE(c.c == b.c);
    REQUIRE(c.labels == b.labels);
    REQUIRE(c.sse == b.sse);
    REQUIRE(a.sse > 0);
  }
}

TEST_CASE("kmeans1d: a cluster of zero-weight points gets their unweighted mean", "[kmeans1d]") {
  // Two positive-weight values, k = 3: the third centroid must be placed on
  // the zero-weight points 5 and 7 (every optimal partition makes one of
  // {5}, {7}, {5, 7} a zero-weight cluster, whose centroid is its plain mean).
  const std::vector<double> x = {0, 5, 7, 20};
  const std::vector<double> w = {1, 0, 0, 1};
  const Result<double> r = run(x, &w, params(3));
  REQUIRE(r.sse == 0.0);
  REQUIRE(r.c[0] == 0.0);
  REQUIRE(r.c[1] >= 5.0);
  REQUIRE(r.c[1] <= 7.0);
  REQUIRE(r.c[2] == 20.0);
  check_solution(x, &w, r);
}

TEST_CASE("kmeans1d: zeros in x are ordinary values", "[kmeans1d]") {
  std::vector<float> x = {0, 0, 0, 1, 1, 0, 5, 5, 0, -0.0f};
  const std::vector<float> w = {1, 1, 1, 2, 2, 1, 1, 1, 0, 1};
  const Result<float> r = run(x, &w, params(3));
  REQUIRE(r.c == std::vector<float>{0, 1, 5});
  REQUIRE(r.sse == 0.0);
  const Result<float> r2 = run(x, &w, params(2));
  check_solution(x, &w, r2);
  const double brute = sqllm::reference::kmeans1d_brute_sse(x.data(), w.data(), x.size(), 2);
  REQUIRE(close_to_optimum(r2.sse, brute, sse_scale(x, &w), float_slack(x, &w)));
}

TEST_CASE("kmeans1d: permutation invariance and determinism", "[kmeans1d]") {
  std::mt19937 rng(23);
  const std::size_t n = 2048;
  std::vector<float> x = laplace<float>(rng, n, 0.05);
  for (std::size_t i = 0; i < n; i += 7) x[i] = x[i / 2];  // duplicates
  std::vector<float> w(n);
  std::uniform_real_distribution<float> uw(0.25f, 2.0f);  // sums of these are exact in double
  for (auto& v : w) v = uw(rng);
  std::vector<std::size_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<float> xp(n), wp(n);
  for (std::size_t i = 0; i < n; ++i) {
    xp[i] = x[perm[i]];
    wp[i] = w[perm[i]];
  }
  for (KMeansMethod m : {KMeansMethod::Exact, KMeansMethod::Lloyd}) {
    const Result<float> a = run(x, &w, params(16, m));
    const Result<float> b = run(xp, &wp, params(16, m));
    REQUIRE(a.c == b.c);
    REQUIRE(a.sse == b.sse);
    for (std::size_t i = 0; i < n; ++i) REQUIRE(b.labels[i] == a.labels[perm[i]]);
    // the same object reused for other sizes, then again: identical output
    KMeans1D<float> km;
    std::vector<float> c1(16), c2(16);
    std::vector<std::uint8_t> l1(n), l2(n);
    const double e1 = km.fit(x.data(), w.data(), n, params(16, m), c1.data(), l1.data());
    std::vector<float> junk(16);
    km.fit(x.data(), w.data(), 100, params(3, m), junk.data());
    km.fit(xp.data() + 5, nullptr, n - 5, params(16, m), junk.data());
    const double e2 = km.fit(x.data(), w.data(), n, params(16, m), c2.data(), l2.data());
    REQUIRE(e1 == e2);
    REQUIRE(c1 == c2);
    REQUIRE(l1 == l2);
    REQUIRE(c1 == a.c);
  }
}

TEST_CASE("kmeans1d: double input and other label types", "[kmeans1d]") {
  std::mt19937 rng(31);
  std::vector<double> x = laplace<double>(rng, 1024, 1.0);
  std::vector<double> w = fisher_weights<double>(rng, 1024);
  const Result<double> r = run(x, &w, params(8));
  check_solution(x, &w, r);
  KMeans1D<double> km;
  std::vector<double> c(8);
  std::vector<std::uint16_t> l16(x.size());
  REQUIRE(km.fit(x.data(), w.data(), x.size(), params(8), c.data(), l16.data()) == r.sse);
  for (std::size_t i = 0; i < x.size(); ++i) REQUIRE(l16[i] == r.labels[i]);
  REQUIRE(km.fit(x.data(), w.data(), x.size(), params(8), c.data()) == r.sse);
  REQUIRE(c == r.c);
  REQUIRE(km.last_distinct() == x.size());
}

TEST_CASE("kmeans1d_rows equals row-by-row fits, any thread count", "[kmeans1d]") {
  std::mt19937 rng(41);
  const std::size_t rows = 13, n = 777;
  const int k = 8;
  std::vector<float> x = laplace<float>(rng, rows * n, 0.03);
  std::vector<float> w = fisher_weights<float>(rng, rows * n);
  std::fill(w.begin() + 2 * n, w.begin() + 3 * n, 0.0f);  // row 2: all-zero weights
  for (KMeansMethod m : {KMeansMethod::Exact, KMeansMethod::Lloyd}) {
    std::vector<float> c_ref(rows * k);
    std::vector<std::uint8_t> l_ref(rows * n);
    std::vector<double> e_ref(rows);
    KMeans1D<float> km;
    for (std::size_t r = 0; r < rows; ++r) {
      e_ref[r] = km.fit(x.data() + r * n, w.data() + r * n, n, params(k, m), c_ref.data() + r * k,
                        l_ref.data() + r * n);
    }
    for (int threads : {0, 1, 2, 3}) {
      std::vector<float> c(rows * k);
      std::vector<std::uint8_t> l(rows * n);
      std::vector<double> e(rows);
      sqllm::kmeans1d_rows(x.data(), w.data(), rows, n, params(k, m), c.data(), l.data(), e.data(),
                           threads);
      REQUIRE(c == c_ref);
      REQUIRE(l == l_ref);
      REQUIRE(e == e_ref);
    }
    std::vector<float> c(rows * k);
    sqllm::kmeans1d_rows(x.data(), static_cast<const float*>(nullptr), rows, n, params(k, m),
                         c.data(), nullptr, nullptr);
    std::vector<float> c0(k);
    km.fit(x.data() + 5 * n, nullptr, n, params(k, m), c0.data());
    REQUIRE(std::vector<float>(c.begin() + 5 * k, c.begin() + 6 * k) == c0);
  }
}

TEST_CASE("kmeans1d: bad inputs throw sqllm::Error naming the argument", "[kmeans1d]") {
  using Catch::Matchers::Contains;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  KMeans1D<float> km;
  std::vector<float> c(4);
  std::vector<std::int32_t> l(6);
  const std::vector<float> good = {1, 2, 3, 4, 5, 6};
  const std::vector<float> gw = {1, 1, 1, 1, 1, 1};
  auto fit = [&](const std::vector<float>& x, const float* w, KMeans1DParams p) {
    return km.fit(x.data(), w, x.size(), p, c.data(), l.data());
  };
  std::vector<float> bad = good;
  bad[3] = nan;
  REQUIRE_THROWS_AS(fit(bad, gw.data(), params(2)), sqllm::Error);
  REQUIRE_THROWS_WITH(fit(bad, gw.data(), params(2)), Contains("x[3]") && Contains("nan"));
  bad[3] = -inf;
  REQUIRE_THROWS_WITH(fit(bad, nullptr, params(2)), Contains("x[3]") && Contains("inf"));
  std::vector<float> badw = gw;
  badw[2] = nan;
  REQUIRE_THROWS_AS(fit(good, badw.data(), params(2)), sqllm::Error);
  REQUIRE_THROWS_WITH(fit(good, badw.data(), params(2)), Contains("w[2]") && Contains("nan"));
  badw[2] = inf;
  REQUIRE_THROWS_WITH(fit(good, badw.data(), params(2)), Contains("w[2]") && Contains("inf"));
  badw[2] = 1;
  badw[5] = -0.5f;
  REQUIRE_THROWS_WITH(fit(good, badw.data(), params(2)), Contains("w[5]") && Contains("-0.5"));
  REQUIRE_THROWS_WITH(km.fit(good.data(), gw.data(), 0, params(2), c.data(), l.data()),
                      Contains("x is empty"));
  REQUIRE_THROWS_WITH(fit(good, gw.data(), params(0)), Contains("k must be") && Contains("got 0"));
  REQUIRE_THROWS_WITH(fit(good, gw.data(), params(65537)), Contains("k must be") && Contains("65537"));
  REQUIRE_THROWS_WITH(fit(good, gw.data(), params(-3)), Contains("k must be"));
  REQUIRE_THROWS_WITH(fit(good, gw.data(), params(2, KMeansMethod::Lloyd, -1)), Contains("max_iter"));
  KMeans1DParams p = params(2, KMeansMethod::Lloyd);
  p.tol = std::nan("");
  REQUIRE_THROWS_WITH(fit(good, gw.data(), p), Contains("tol"));
  std::vector<std::uint8_t> l8(6);
  std::vector<float> c300(300);
  REQUIRE_THROWS_WITH(km.fit(good.data(), nullptr, 6, params(300), c300.data(), l8.data()),
                      Contains("label type"));
  REQUIRE_NOTHROW(km.fit(good.data(), nullptr, 6, params(300), c300.data()));
  std::vector<float> cmax(65536);  // the largest k is accepted
  REQUIRE_NOTHROW(km.fit(good.data(), gw.data(), 6, params(65536), cmax.data(), l.data()));
  REQUIRE(cmax.back() == 6.0f);

  REQUIRE(sqllm::parse_kmeans_method("exact") == KMeansMethod::Exact);
  REQUIRE(sqllm::parse_kmeans_method("lloyd") == KMeansMethod::Lloyd);
  REQUIRE_THROWS_AS(sqllm::parse_kmeans_method("kmeans++"), sqllm::Error);
  REQUIRE_THROWS_WITH(sqllm::parse_kmeans_method("kmeans++"), Contains("'kmeans++'"));
}

TEST_CASE("kmeans1d_rows: errors name the row and column and escape no thread", "[kmeans1d]") {
  using Catch::Matchers::Contains;
  const std::size_t rows = 9, n = 50;
  std::vector<float> x(rows * n, 1.0f), w(rows * n, 1.0f);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 17);
  x[6 * n + 11] = std::numeric_limits<float>::quiet_NaN();
  w[4 * n + 7] = -2.0f;  // the lowest failing row is reported
  std::vector<float> c(rows * 4);
  std::vector<std::uint8_t> l(rows * n);
  for (int threads : {1, 2, 4}) {
    REQUIRE_THROWS_AS(sqllm::kmeans1d_rows(x.data(), w.data(), rows, n, params(4), c.data(),
                                           l.data(), nullptr, threads),
                      sqllm::Error);
    REQUIRE_THROWS_WITH(sqllm::kmeans1d_rows(x.data(), w.data(), rows, n, params(4), c.data(),
                                             l.data(), nullptr, threads),
                        Contains("w[row 4, col 7]") && Contains("-2"));
  }
  w[4 * n + 7] = 1.0f;
  REQUIRE_THROWS_WITH(sqllm::kmeans1d_rows(x.data(), w.data(), rows, n, params(4), c.data(), l.data(),
                                           nullptr, 2),
                      Contains("x[row 6, col 11]") && Contains("nan"));
  REQUIRE_THROWS_WITH(sqllm::kmeans1d_rows(x.data(), w.data(), rows, std::size_t(0), params(4),
                                           c.data(), l.data(), nullptr),
                      Contains("empty"));
  REQUIRE_THROWS_WITH(sqllm::kmeans1d_rows(x.data(), w.data(), rows, n, params(0), c.data(),
                                           l.data(), nullptr),
                      Contains("k must be"));
}
