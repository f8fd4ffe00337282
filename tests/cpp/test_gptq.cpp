// The uniform format (grids, RTN, CPU kernel vs the scalar reference), the
// GPTQ engine's invariants that need no second implementation (identity
// Hessian = round-to-nearest, thread-count independence, errors), and the
// 1..32-bit packing.  GPTQ against an independent float64 implementation is
// tested from Python (tests/python/test_gptq.py).
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "sqllm/packing.hpp"
#include "sqllm/quant/gptq.hpp"
#include "sqllm/quant/gptq_uniform.hpp"
#include "sqllm/quant/uniform.hpp"
#include "sqllm/reference/uniform_matmul.hpp"
#include "sqllm/uniform_matmul.hpp"

using namespace sqllm;

namespace {

std::vector<float> random_matrix(std::size_t rows, std::size_t cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> w(rows * cols);
  for (auto& v : w) v = d(rng);
  return w;
}

/// H = X^T X for X (n x cols) with correlated columns, row-major.
std::vector<double> random_hessian(std::size_t cols, std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> x(n * cols);
  for (std::size_t r = 0; r < n; ++r) {
    double prev = d(rng);
    for (std::size_t c = 0; c < cols; ++c) {
      prev = 0.7 * prev + d(rng);
      x[r * cols + c] = prev;
    }
  }
  std::vector<double> h(cols * cols, 0.0);
  for (std::size_t r = 0; r < n; ++r)
    for (std::size_t a = 0; a < cols; ++a)
      for (std::size_t b = 0; b < cols; ++b) h[a * cols + b] += x[r * cols + a] * x[r * cols + b];
  return h;
}

/// Unit roundoff of fp32.
constexpr double kU32 = 1.0 / (1 << 24);

/// Worst-case error of a length-n fp32 dot product of decoded weights (one
/// rounding for s*(q-z), one per product, n-1 for the running sum) relative
/// to sum |x_i w_i|: (n + 2) u to first order.
double fp32_dot_bound(std::size_t n) { return static_cast<double>(n + 2) * kU32; }

}  // namespace

TEST_CASE("pack_codes32 round trips 1..32-bit codes; <= 8 bits packs as pack_codes", "[packing]") {
  std::mt19937_64 rng(7);
  for (int bits = 1; bits <= 32; ++bits) {
    for (std::size_t n : {1u, 7u, 31u, 32u, 33u, 100u}) {
      const std::size_t rows = 3;
      std::vector<std::uint32_t> codes(rows * n);
      for (auto& c : codes) c = static_cast<std::uint32_t>(rng()) & code_mask(bits);
      std::vector<std::uint32_t> packed(rows * packed_words(n, bits), 0xdeadbeefu);
      pack_codes32(codes.data(), rows, n, bits, packed.data());
      std::vector<std::uint32_t> back(rows * n, 0u);
      unpack_codes32(packed.data(), rows, n, bits, back.data());
      INFO("bits=" << bits << " n=" << n);
      REQUIRE(back == codes);
      if (bits <= 8) {
        std::vector<std::uint8_t> c8(codes.begin(), codes.end());
        std::vector<std::uint32_t> p8(packed.size());
        pack_codes(c8.data(), rows, n, bits, p8.data());
        REQUIRE(p8 == packed);
      }
    }
  }
  std::vector<std::uint32_t> big{1u << 20}, out(1);
  REQUIRE_THROWS_WITH(pack_codes32(big.data(), 1, 1, 20, out.data()),
                      Catch::Contains("does not fit in 20 bits"));
  REQUIRE_THROWS_WITH(pack_codes32(big.data(), 1, 1, 33, out.data()),
                      Catch::Contains("code bits must be in 1..32, got 33"));
}

TEST_CASE("uniform grids: zero exact, scale > 0, codes in range", "[uniform]") {
  for (int bits = 2; bits <= 8; ++bits) {
    for (bool sym : {false, true}) {
      const UniformGrid g = UniformGrid::from_range(0.0, 0.0, bits, sym);  // constant group
      REQUIRE(g.scale > 0.0f);
      const UniformGrid h = UniformGrid::from_range(0.3, 2.0, bits, sym);  // range widened to 0
      REQUIRE(h.value(h.code(0.0)) == 0.0);
      REQUIRE(h.code(1e9) == (1 << bits) - 1);
      REQUIRE(h.code(-1e9) == 0);
    }
  }
  UniformParams p;
  p.bits = 9;
  REQUIRE_THROWS_WITH(check_uniform_params(p), Catch::Contains("bits must be in 2..8, got 9"));
  p.bits = 4;
  p.group_size = 48;
  REQUIRE_THROWS_WITH(check_uniform_params(p), Catch::Contains("group_size must be -1"));
}

TEST_CASE("uniform CPU matmul matches the float64 reference within the fp32 bound", "[uniform]") {
  for (int bits : {2, 3, 4, 5, 8}) {
    for (int gs : {-1, 32, 128}) {
      for (bool gidx : {false, true}) {
        const std::size_t out = 37, in = 161;  // odd: a tail after the last 32-code run
        const auto w = random_matrix(out, in, static_cast<unsigned>(bits * 100 + gs));
        UniformParams p;
        p.bits = bits;
        p.group_size = gs;
        const std::size_t G = uniform_num_groups(in, gs);
        std::vector<std::uint8_t> codes(out * in);
        std::vector<std::uint16_t> scales(out * G), zeros(out * G);
        uniform_rtn(w.data(), out, in, p, codes.data(), scales.data(), zeros.data());
        std::vector<std::uint32_t> packed(out * packed_words(in, bits));
        pack_codes(codes.data(), out, in, bits, packed.data());
        std::vector<std::int32_t> g_idx(in);
        for (std::size_t i = 0; i < in; ++i)  // a scattered assignment, as act-order makes
          g_idx[i] = static_cast<std::int32_t>((i * 7) % G);
        UniformView v;
        v.qweight = packed.data();
        v.scales = scales.data();
        v.zeros = zeros.data();
        v.g_idx = gidx ? g_idx.data() : nullptr;
        v.out = out;
        v.in = in;
        v.bits = bits;
        v.group_size = gs;
        v.num_groups = G;
        for (std::size_t batch : {1u, 3u, 70u}) {
          const auto x = random_matrix(batch, in, 99);
          std::vector<float> y(batch * out);
          std::vector<double> yref(batch * out), absref(batch * out);
          uniform_matmul(v, x.data(), batch, y.data(), 2);
          reference::uniform_matmul(v, x.data(), batch, yref.data());
          std::vector<float> ax(x.size());
          for (std::size_t k = 0; k < x.size(); ++k) ax[k] = std::abs(x[k]);
          // The bound scales with sum_i |x_i w_i| (the dequantized weight).
          std::vector<float> wd(out * in);
          uniform_dequantize(v, wd.data());
          for (std::size_t b = 0; b < batch; ++b)
            for (std::size_t o = 0; o < out; ++o) {
              double s = 0.0;
              for (std::size_t i = 0; i < in; ++i)
                s += std::abs(static_cast<double>(wd[o * in + i])) * ax[b * in + i];
              INFO("bits=" << bits << " gs=" << gs << " gidx=" << gidx << " batch=" << batch);
              REQUIRE(std::abs(y[b * out + o] - yref[b * out + o]) <= fp32_dot_bound(in) * s);
            }
        }
      }
    }
  }
}

TEST_CASE("uniform view validation names the problem", "[uniform]") {
  std::vector<std::uint32_t> q(2, 0u);
  std::vector<std::uint16_t> s{float_to_half_bits(1.0f)}, z{float_to_half_bits(20.0f)};
  UniformView v;
  v.qweight = q.data();
  v.scales = s.data();
  v.zeros = z.data();
  v.out = 1;
  v.in = 10;
  v.bits = 4;
  REQUIRE_THROWS_WITH(check_uniform_view(v), Catch::Contains("zero at row 0, group 0"));
  z[0] = float_to_half_bits(3.0f);
  s[0] = float_to_half_bits(0.0f);
  REQUIRE_THROWS_WITH(check_uniform_view(v), Catch::Contains("must be finite and > 0"));
  s[0] = float_to_half_bits(1.0f);
  std::vector<std::int32_t> g(10, 0);
  g[4] = 1;
  v.g_idx = g.data();
  REQUIRE_THROWS_WITH(check_uniform_view(v), Catch::Contains("g_idx[4] = 1 is outside [0, 1)"));
}

TEST_CASE("GPTQ with an identity Hessian is round-to-nearest", "[gptq]") {
  // H = I: U is diagonal, no error is fed forward; the codes are RTN's.
  const std::size_t rows = 19, cols = 75;
  const auto w = random_matrix(rows, cols, 3);
  std::vector<double> h(cols * cols, 0.0);
  for (std::size_t i = 0; i < cols; ++i) h[i * cols + i] = 1.0;
  for (int gs : {-1, 32}) {
    UniformParams up;
    up.bits = 3;
    up.group_size = gs;
    const std::size_t G = uniform_num_groups(cols, gs);
    std::vector<std::uint8_t> rc(rows * cols), gc(rows * cols);
    std::vector<std::uint16_t> rs(rows * G), rz(rows * G), gs_, gz;
    uniform_rtn(w.data(), rows, cols, up, rc.data(), rs.data(), rz.data());
    GptqParams gp;
    gp.blocksize = 16;
    gptq_uniform(w.data(), h.data(), rows, cols, up, gp, gc.data(), gs_, gz);
    REQUIRE(gc == rc);
    REQUIRE(gs_ == rs);
    REQUIRE(gz == rz);
  }
}

TEST_CASE("GPTQ is deterministic across thread counts and lowers the proxy error", "[gptq]") {
  const std::size_t rows = 300, cols = 200;  // several row chunks, a partial last block
  const auto w = random_matrix(rows, cols, 5);
  const auto h = random_hessian(cols, 400, 6);
  UniformParams up;
  up.bits = 3;
  up.group_size = 64;
  GptqParams gp;
  gp.act_order = true;
  gp.blocksize = 48;
  std::vector<std::uint8_t> c1(rows * cols), c2(rows * cols);
  std::vector<std::uint16_t> s1, z1, s2, z2;
  std::vector<float> q1(rows * cols), q2(rows * cols);
  gp.num_threads = 1;
  const GptqResult r1 = gptq_uniform(w.data(), h.data(), rows, cols, up, gp, c1.data(), s1, z1, q1.data());
  gp.num_threads = 2;
  const GptqResult r2 = gptq_uniform(w.data(), h.data(), rows, cols, up, gp, c2.data(), s2, z2, q2.data());
  REQUIRE(c1 == c2);
  REQUIRE(q1 == q2);
  REQUIRE(r1.proxy_error == r2.proxy_error);
  // RTN's proxy error tr(dW H dW^T), computed directly.
  std::vector<std::uint8_t> rc(rows * cols);
  const std::size_t G = uniform_num_groups(cols, 64);
  std::vector<std::uint16_t> rs(rows * G), rz(rows * G);
  uniform_rtn(w.data(), rows, cols, up, rc.data(), rs.data(), rz.data());
  double rtn = 0.0;
  for (std::size_t r = 0; r < rows; ++r) {
    std::vector<double> dw(cols);
    for (std::size_t i = 0; i < cols; ++i) {
      const std::size_t g = i / 64;
      const double s = half_bits_to_float(rs[r * G + g]), z = half_bits_to_float(rz[r * G + g]);
      dw[i] = w[r * cols + i] - s * (rc[r * cols + i] - z);
    }
    for (std::size_t a = 0; a < cols; ++a)
      for (std::size_t b = 0; b < cols; ++b) rtn += dw[a] * h[a * cols + b] * dw[b];
  }
  REQUIRE(r1.proxy_error < rtn);
}

TEST_CASE("GPTQ rejects bad input with clear errors", "[gptq]") {
  const std::size_t rows = 4, cols = 6;
  auto w = random_matrix(rows, cols, 1);
  std::vector<double> h(cols * cols, 0.0);
  for (std::size_t i = 0; i < cols; ++i) h[i * cols + i] = 1.0;
  UniformParams up;
  GptqParams gp;
  std::vector<std::uint8_t> c(rows * cols);
  std::vector<std::uint16_t> s, z;
  auto nan_h = h;
  nan_h[7] = std::nan("");
  REQUIRE_THROWS_WITH(gptq_uniform(w.data(), nan_h.data(), rows, cols, up, gp, c.data(), s, z),
                      Catch::Contains("Hessian contains NaN or Inf at (1, 1)"));
  auto neg = h;
  neg[2 * cols + 2] = -1.0;
  REQUIRE_THROWS_WITH(gptq_uniform(w.data(), neg.data(), rows, cols, up, gp, c.data(), s, z),
                      Catch::Contains("not positive semi-definite"));
  auto indef = h;  // diagonal fine, but [[1, 5], [5, 1]] is indefinite
  indef[0 * cols + 1] = indef[1 * cols + 0] = 5.0;
  REQUIRE_THROWS_WITH(gptq_uniform(w.data(), indef.data(), rows, cols, up, gp, c.data(), s, z),
                      Catch::Contains("not positive definite even after damping"));
  w[3] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(gptq_uniform(w.data(), h.data(), rows, cols, up, gp, c.data(), s, z),
                      Catch::Contains("weight contains NaN or Inf at row 0, column 3"));
  w[3] = 0.0f;
  up.bits = 1;
  REQUIRE_THROWS_WITH(gptq_uniform(w.data(), h.data(), rows, cols, up, gp, c.data(), s, z),
                      Catch::Contains("bits must be in 2..8, got 1"));
  up.bits = 4;
  gp.blocksize = 0;
  REQUIRE_THROWS_WITH(gptq_uniform(w.data(), h.data(), rows, cols, up, gp, c.data(), s, z),
                      Catch::Contains("blocksize must be >= 1"));
}

TEST_CASE("GPTQ handles dead columns: zero weight, no contribution", "[gptq]") {
  const std::size_t rows = 5, cols = 40;
  const auto w = random_matrix(rows, cols, 8);
  auto h = random_hessian(cols, 80, 9);
  for (std::size_t k = 0; k < cols; ++k) h[k * cols + 11] = h[11 * cols + k] = 0.0;  // input 11 always 0
  UniformParams up;
  GptqParams gp;
  std::vector<std::uint8_t> c(rows * cols);
  std::vector<std::uint16_t> s, z;
  std::vector<float> q(rows * cols);
  const GptqResult r = gptq_uniform(w.data(), h.data(), rows, cols, up, gp, c.data(), s, z, q.data());
  REQUIRE(r.dead_columns == 1);
  for (std::size_t o = 0; o < rows; ++o) REQUIRE(q[o * cols + 11] == 0.0f);
  REQUIRE(std::isfinite(r.proxy_error));
}

TEST_CASE("GPTQ with lookup tables picks table entries", "[gptq]") {
  const std::size_t rows = 7, cols = 50, K = 8;
  const auto w = random_matrix(rows, cols, 10);
  const auto h = random_hessian(cols, 100, 11);
  std::vector<float> tables(rows * K);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t k = 0; k < K; ++k) tables[r * K + k] = -1.5f + 3.0f * k / (K - 1) + 0.01f * r;
  std::vector<std::uint8_t> codes(rows * cols);
  LutColumnQuantizer lq{tables.data(), K, cols, codes.data()};
  std::vector<float> q(rows * cols);
  GptqParams gp;
  gptq(w.data(), h.data(), rows, cols, gp, lq, q.data());
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t i = 0; i < cols; ++i) REQUIRE(q[r * cols + i] == tables[r * K + codes[r * cols + i]]);
}
