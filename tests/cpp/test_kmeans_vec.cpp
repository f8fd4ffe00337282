// Weighted vector k-means and nearest-centroid assignment against plain loops.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "sqllm/cluster/kmeans_vec.hpp"
#include "sqllm/quant/vptq.hpp"
#include "sqllm/vq_matmul.hpp"

namespace {

std::vector<float> gaussian(std::size_t n, std::uint64_t seed, float sd = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<float> x(n);
  for (auto& e : x) e = nd(rng);
  return x;
}

// Brute force: squared distance in double, first minimum wins.
std::int32_t brute_nearest(const float* x, const float* C, std::size_t k, int v) {
  double best = std::numeric_limits<double>::infinity();
  std::int32_t bi = 0;
  for (std::size_t j = 0; j < k; ++j) {
    double d = 0.0;
    for (int t = 0; t < v; ++t) {
      const double e = static_cast<double>(x[t]) - C[j * static_cast<std::size_t>(v) + static_cast<std::size_t>(t)];
      d += e * e;
    }
    if (d < best) {
      best = d;
      bi = static_cast<std::int32_t>(j);
    }
  }
  return bi;
}

}  // namespace

TEST_CASE("vec_nearest equals brute force for every v and odd sizes", "[kmeans_vec]") {
  // Small-integer data: every squared distance is an exact small integer in fp32,
  // so the kernel and the double brute force must agree exactly, ties included.
  for (int v = 2; v <= 16; ++v) {
    for (std::size_t k : {1u, 3u, 8u, 13u, 70u}) {
      const std::size_t n = 37;
      std::mt19937_64 rng(static_cast<std::uint64_t>(v * 100 + static_cast<int>(k)));
      std::uniform_int_distribution<int> ud(-3, 3);
      std::vector<float> X(n * static_cast<std::size_t>(v)), C(k * static_cast<std::size_t>(v));
      for (auto& e : X) e = static_cast<float>(ud(rng));
      for (auto& e : C) e = static_cast<float>(ud(rng));
      std::vector<std::int32_t> idx(n);
      std::vector<float> dist(n);
      sqllm::vec_nearest(X.data(), n, v, C.data(), k, idx.data(), dist.data(), 2);
      for (std::size_t i = 0; i < n; ++i) {
        const std::int32_t b = brute_nearest(&X[i * static_cast<std::size_t>(v)], C.data(), k, v);
        REQUIRE(idx[i] == b);
      }
    }
  }
}

TEST_CASE("vec_kmeans: objective never increases, result independent of threads", "[kmeans_vec]") {
  const int v = 6;
  const std::size_t n = 3000;
  const auto X = gaussian(n * v, 7);
  auto W = gaussian(n, 8);
  for (auto& w : W) w = std::fabs(w) + 0.01f;
  for (auto init : {sqllm::VecKmeansInit::Random, sqllm::VecKmeansInit::KMeansPlusPlus}) {
    sqllm::VecKmeansParams p;
    p.k = 64;
    p.iters = 40;
    p.tol = 0.0;
    p.init = init;
    p.seed = 3;
    p.num_threads = 1;
    const auto a = sqllm::vec_kmeans(X.data(), n, v, W.data(), p);
    REQUIRE(a.objective.size() >= 2);
    // fp32 distances pick the assignment; the objective is summed in double.
    // An fp32 near-tie can pick a centroid that is worse in double by ~1e-7
    // of one distance, so allow that much per iteration.
    for (std::size_t t = 1; t < a.objective.size(); ++t)
      REQUIRE(a.objective[t] <= a.objective[t - 1] * (1.0 + 1e-6));
    REQUIRE(a.objective.back() < 0.8 * a.objective.front());
    p.num_threads = 3;
    const auto b = sqllm::vec_kmeans(X.data(), n, v, W.data(), p);
    REQUIRE(a.centroids == b.centroids);
    REQUIRE(a.assign == b.assign);
    REQUIRE(a.objective == b.objective);
  }
}

TEST_CASE("vec_kmeans: fewer points than k, empty clusters, bad input", "[kmeans_vec]") {
  const int v = 4;
  std::vector<float> X = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2};
  sqllm::VecKmeansParams p;
  p.k = 8;
  const auto r = sqllm::vec_kmeans(X.data(), 3, v, nullptr, p);
  REQUIRE(r.objective.back() == 0.0);
  // Empty clusters: start with all centroids far away but one.
  std::vector<float> init(4 * v, 100.0f);
  for (int t = 0; t < v; ++t) init[static_cast<std::size_t>(t)] = 0.5f;
  init[v] = 101.0f;  // distinct far centroids
  init[2 * v] = 102.0f;
  p.k = 4;
  p.init_centroids = init.data();
  const auto e = sqllm::vec_kmeans(X.data(), 3, v, nullptr, p);
  REQUIRE(e.repaired >= 1);
  REQUIRE(e.objective.back() == 0.0);  // 3 points, 4 centroids: each point its own
  p.init_centroids = nullptr;
  std::vector<float> bad = X;
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(sqllm::vec_kmeans(bad.data(), 3, v, nullptr, p), sqllm::Error);
  std::vector<float> w = {1.0f, -1.0f, 1.0f};
  REQUIRE_THROWS_AS(sqllm::vec_kmeans(X.data(), 3, v, w.data(), p), sqllm::Error);
  REQUIRE_THROWS_AS(sqllm::vec_kmeans(X.data(), 6, 2, nullptr, [] {
                      sqllm::VecKmeansParams q;
                      q.k = 0;
                      return q;
                    }()),
                    sqllm::Error);
  REQUIRE_THROWS_AS(sqllm::vec_kmeans(X.data(), 1, 17, nullptr, p), sqllm::Error);
}

TEST_CASE("pruned nearest-centroid search equals the brute-force kernel, ties included", "[kmeans_vec]") {
  std::mt19937_64 rng(77);
  for (int v : {2, 3, 5, 8, 16}) {
    for (std::size_t k : {std::size_t{1}, std::size_t{7}, std::size_t{130}}) {
      const std::size_t n = 257 + static_cast<std::size_t>(v) * 13;
      std::vector<float> X = gaussian(n * static_cast<std::size_t>(v), 10 + static_cast<std::uint64_t>(v) + k);
      std::vector<float> C = gaussian(k * static_cast<std::size_t>(v), 20 + static_cast<std::uint64_t>(v) + k);
      if (v == 3)  // small integers: exact sums, many exact ties, duplicated centroids
        for (auto* a : {&X, &C})
          for (auto& e : *a) e = std::round(2.0f * e);
      std::vector<std::int32_t> ib(n), ig(n), guess(n);
      std::vector<float> db(n), dg(n);
      std::vector<double> lower(n);
      for (auto& g : guess) g = static_cast<std::int32_t>(rng() % k);
      sqllm::vec_nearest(X.data(), n, v, C.data(), k, ib.data(), db.data(), 1);
      sqllm::detail::GuidedCentroids gc;
      sqllm::detail::vec_prepare_guided(C.data(), k, v, gc);
      sqllm::detail::vec_assign_guided(X.data(), n, v, gc, guess.data(), ig.data(), dg.data(), 2,
                                       lower.data());
      INFO("v=" << v << " k=" << k);
      CHECK(ig == ib);
      CHECK(dg == db);
      for (std::size_t i = 0; i < n; ++i) {  // lower bounds the distance to every other centroid
        double second = std::numeric_limits<double>::infinity();
        for (std::size_t j = 0; j < k; ++j) {
          if (static_cast<std::int32_t>(j) == ig[i]) continue;
          double d = 0.0;
          for (int t = 0; t < v; ++t) {
            const double e = static_cast<double>(X[i * static_cast<std::size_t>(v) + static_cast<std::size_t>(t)]) -
                             C[j * static_cast<std::size_t>(v) + static_cast<std::size_t>(t)];
            d += e * e;
          }
          second = std::min(second, std::sqrt(d));
        }
        REQUIRE(lower[i] <= second * (1 + 1e-12));
      }
    }
  }
}

TEST_CASE("yinyang search equals the brute-force kernel at every step, ties included", "[kmeans_vec]") {
  std::mt19937_64 rng(78);
  for (int v : {2, 3, 5, 8, 16}) {
    for (std::size_t k : {std::size_t{1}, std::size_t{7}, std::size_t{130}, std::size_t{1100}}) {
      const std::size_t n = 257 + static_cast<std::size_t>(v) * 13, V = static_cast<std::size_t>(v);
      std::vector<float> X = gaussian(n * V, 30 + static_cast<std::uint64_t>(v) + k);
      std::vector<float> C = gaussian(k * V, 40 + static_cast<std::uint64_t>(v) + k);
      const bool ints = v == 3;  // small integers: exact sums, many exact ties, duplicates
      if (ints)
        for (auto* a : {&X, &C})
          for (auto& e : *a) e = std::round(2.0f * e);
      sqllm::detail::YinyangState s;
      std::vector<std::int32_t> ib(n), iy(n), prev(n);
      std::vector<float> C_old, drift(k);
      for (int step = 0; step < 4; ++step) {
        if (step > 0) {  // move every centroid a little and one far
          C_old = C;
          std::normal_distribution<float> nd(0.0f, 0.1f);
          for (auto& e : C) e = ints ? e + static_cast<float>(static_cast<int>(rng() % 3) - 1) : e + nd(rng);
          C[(rng() % k) * V] += 5.0f;
          sqllm::detail::vec_centroid_drift(C.data(), C_old.data(), k, v, drift.data());
          prev = iy;
        }
        sqllm::vec_nearest(X.data(), n, v, C.data(), k, ib.data(), nullptr, 1);
        sqllm::detail::vec_assign_yinyang(X.data(), n, v, C.data(), k, s, step > 0 ? drift.data() : nullptr,
                                          step > 0 ? prev.data() : nullptr, iy.data(), 2);
        INFO("v=" << v << " k=" << k << " step=" << step);
        REQUIRE(iy == ib);
      }
      for (std::size_t i = 0; i < n; ++i)  // each group bound is below every other member's distance
        for (std::size_t j = 0; j < k; ++j) {
          if (static_cast<std::int32_t>(j) == iy[i]) continue;
          double d = 0.0;
          for (std::size_t t = 0; t < V; ++t) {
            const double e = static_cast<double>(X[i * V + t]) - C[j * V + t];
            d += e * e;
          }
          const float l = s.lower[i * s.G + static_cast<std::size_t>(s.group_of[j])];
          REQUIRE(static_cast<double>(l) <= std::sqrt(d));
        }
    }
  }
}

TEST_CASE("vptq: feedback beats nearest assignment, residual lowers it again, decode matches", "[vptq]") {
  const std::size_t out = 48, in = 40, rows = 200;
  const auto Xs = gaussian(rows * in, 11);
  // Correlated inputs: x_t = z_t + 0.8 * z_{t-1}.
  std::vector<double> H(in * in, 0.0);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t a = 0; a < in; ++a) {
      const double xa = Xs[r * in + a] + (a ? 0.8 * Xs[r * in + a - 1] : 0.0);
      for (std::size_t b = 0; b < in; ++b) {
        const double xb = Xs[r * in + b] + (b ? 0.8 * Xs[r * in + b - 1] : 0.0);
        H[a * in + b] += xa * xb;
      }
    }
  const auto W = gaussian(out * in, 12, 0.05f);
  sqllm::VptqParams p;
  p.v = 4;
  p.k = 16;
  p.k_res = 4;
  p.enable_norm = true;
  p.outlier_cols = 4;
  p.v_out = 2;
  p.k_out = 8;
  p.group_num = 2;
  p.kiter = 30;
  const auto r = sqllm::vptq_quantize(W.data(), H.data(), out, in, p);
  REQUIRE(r.proxy_gptq < r.proxy_nearest);
  REQUIRE(r.proxy_residual < r.proxy_gptq);
  // The decode of the packed format reproduces the proxy error of the last pass.
  const int B = 4 + 2;
  const std::size_t gs = r.group_size, words = sqllm::packed_words(gs, B);
  std::vector<std::uint32_t> slots(r.main_idx.size()), packed(p.group_num * r.rows_main * words);
  for (std::size_t i = 0; i < slots.size(); ++i) slots[i] = r.main_idx[i] | (r.res_idx[i] << 4);
  sqllm::pack_codes32(slots.data(), p.group_num * r.rows_main, gs, B, packed.data());
  std::vector<std::uint16_t> oidx(r.outlier_idx.begin(), r.outlier_idx.end());
  sqllm::VqView q;
  q.out = out;
  q.in = in;
  q.v = 4;
  q.k = 16;
  q.k_res = 4;
  q.num_groups = 2;
  q.group_size = gs;
  q.indices = packed.data();
  q.centroids = r.centroids.data();
  q.res_centroids = r.res_centroids.data();
  q.outlier_size = 4;
  q.v_out = 2;
  q.k_out = 8;
  q.outlier_indices = oidx.data();
  q.outlier_centroids = r.outlier_centroids.data();
  q.perm = r.perm.data();
  q.scale = r.scale.data();
  q.bias = r.bias.data();
  sqllm::check_vq_view(q);
  std::vector<float> Wq(out * in);
  sqllm::vq_dequantize(q, Wq.data());
  double err = 0.0;
  for (std::size_t o = 0; o < out; ++o)
    for (std::size_t a = 0; a < in; ++a)
      for (std::size_t b = 0; b < in; ++b)
        err += (double(W[o * in + a]) - Wq[o * in + a]) * H[a * in + b] * (double(W[o * in + b]) - Wq[o * in + b]);
  // The quantizer measured in normalised units with S H S; the decode's fp32
  // scale/bias arithmetic differs by ~1e-7 relative per weight.
  REQUIRE(err == Approx(r.proxy_residual).epsilon(1e-4));
  // The gather matmul equals x @ Wq^T.
  const auto x = gaussian(3 * in, 13);
  std::vector<float> y(3 * out);
  sqllm::vq_matmul(q, x.data(), 3, y.data(), 2);
  for (std::size_t b = 0; b < 3; ++b)
    for (std::size_t o = 0; o < out; ++o) {
      double ref = 0.0;
      for (std::size_t a = 0; a < in; ++a) ref += double(x[b * in + a]) * Wq[o * in + a];
      REQUIRE(y[b * out + o] == Approx(ref).margin(1e-4));
    }
  oidx[3] = 8;  // corrupt outlier index
  REQUIRE_THROWS_AS(sqllm::check_vq_view(q), sqllm::Error);
  p.k = 12;  // not a power of two
  REQUIRE_THROWS_AS(sqllm::vptq_quantize(W.data(), H.data(), out, in, p), sqllm::Error);
  p.k = 16;
  H[5] = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_AS(sqllm::vptq_quantize(W.data(), H.data(), out, in, p), sqllm::Error);
}
