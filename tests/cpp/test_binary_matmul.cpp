// The PTQ1.61 format's sign-table kernel (binary_matmul.hpp) against its scalar
// reference (dequantize, double dot products), odd shapes, thread-count
// independence, and the validator's errors.  Against an independent NumPy
// definition: tests/python/test_ptq161.py.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "sqllm/binary_matmul.hpp"
#include "sqllm/half.hpp"
#include "sqllm/packing.hpp"

using namespace sqllm;

namespace {

struct Layer {
  std::size_t out, in, n_sal;
  int bits, group_size;
  std::vector<std::uint8_t> mask, signs;
  std::vector<std::uint16_t> alpha, mu, r1, r2, scales, zeros;
  std::vector<std::uint32_t> qweight;

  Ptq161View view() const {
    Ptq161View v;
    v.out = out;
    v.in = in;
    v.mask = mask.data();
    v.signs = signs.data();
    v.alpha = alpha.data();
    v.mu = mu.data();
    v.r1 = r1.data();
    v.r2 = r2.data();
    v.sal.qweight = qweight.data();
    v.sal.scales = scales.data();
    v.sal.zeros = zeros.data();
    v.sal.out = out;
    v.sal.in = n_sal;
    v.sal.bits = bits;
    v.sal.group_size = group_size;
    v.sal.num_groups = n_sal ? uniform_num_groups(n_sal, group_size) : 0;
    return v;
  }
};

Layer random_layer(std::size_t out, std::size_t in, std::size_t n_sal, int bits, int gs,
                   unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  Layer l{out, in, n_sal, bits, gs, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  std::vector<std::size_t> idx(in);
  for (std::size_t i = 0; i < in; ++i) idx[i] = i;
  std::shuffle(idx.begin(), idx.end(), rng);
  l.mask.assign((in + 7) / 8, 0);
  for (std::size_t k = 0; k < n_sal; ++k) l.mask[idx[k] / 8] |= std::uint8_t(1u << (idx[k] % 8));
  const std::size_t n_bin = in - n_sal, sb = ptq161_sign_bytes(n_bin);
  l.signs.assign(out * sb, 0);
  for (std::size_t o = 0; o < out; ++o)
    for (std::size_t j = 0; j < n_bin; ++j)
      if (rng() & 1u) l.signs[o * sb + j / 8] |= std::uint8_t(1u << (j % 8));
  auto h = [](float f) { return float_to_half_bits(f); };
  for (std::size_t o = 0; o < out; ++o) {
    l.alpha.push_back(h(0.05f * u(rng)));
    l.mu.push_back(h(0.01f * (u(rng) - 1.0f)));
    l.r1.push_back(h(u(rng)));
  }
  for (std::size_t j = 0; j < n_bin; ++j) l.r2.push_back(h(u(rng)));
  if (n_sal) {
    const std::size_t G = uniform_num_groups(n_sal, gs);
    std::vector<std::uint32_t> codes(out * n_sal);
    for (auto& c : codes) c = rng() % (1u << bits);
    l.qweight.assign(out * packed_words(n_sal, bits), 0);
    pack_codes32(codes.data(), out, n_sal, bits, l.qweight.data());
    for (std::size_t k = 0; k < out * G; ++k) {
      l.scales.push_back(h(0.01f * u(rng)));
      l.zeros.push_back(h(static_cast<float>(rng() % (1u << bits))));
    }
  }
  return l;
}

}  // namespace

TEST_CASE("ptq161 kernel equals the scalar reference on odd shapes", "[ptq161]") {
  struct Case { std::size_t out, in, n_sal; int bits, gs; };
  const Case cases[] = {{1, 1, 0, 4, -1}, {1, 1, 1, 4, -1}, {7, 9, 2, 2, 32}, {37, 53, 11, 4, -1},
                        {5, 8, 0, 3, -1}, {16, 200, 40, 4, 32}, {33, 130, 130, 8, 128},
                        {64, 257, 51, 4, 64}};
  unsigned seed = 1;
  for (const auto& c : cases) {
    const Layer l = random_layer(c.out, c.in, c.n_sal, c.bits, c.gs, seed++);
    const Ptq161View v = l.view();
    REQUIRE_NOTHROW(check_ptq161_view(v));
    for (std::size_t batch : {1u, 8u, 11u}) {
      std::mt19937 rng(seed * 7 + batch);
      std::normal_distribution<float> d(0.0f, 1.0f);
      std::vector<float> x(batch * c.in);
      for (auto& e : x) e = d(rng);
      std::vector<float> y(batch * c.out), yr(batch * c.out), w(c.out * c.in);
      ptq161_matmul_reference(v, x.data(), batch, yr.data());
      ptq161_dequantize(v, w.data());
      for (CpuKernel k : {CpuKernel::Scalar, CpuKernel::Avx2, CpuKernel::Avx512}) {
      if (!cpu_supports(k)) continue;
      INFO("kernel " << to_string(k) << ", batch " << batch << ", shape " << c.out << "x" << c.in);
      ptq161_matmul(v, x.data(), batch, y.data(), 0, false, k);
      for (std::size_t b = 0; b < batch; ++b)
        for (std::size_t o = 0; o < c.out; ++o) {
          // fp32 sums of at most in + 8 terms, each at most |Ŵ|max-ish: bound by
          // (in + 16) u Σ_i (|r1|(|α|+|μ|)|r2| or |Ŵ_oi|) |x_i|, with the binary bound
          // taken as 2 |r1 r2| (|α| + |μ|) >= |Ŵ| and the partial sums' magnitude.
          double mag = 0.0;
          const float a = half_bits_to_float(l.alpha[o]), m = half_bits_to_float(l.mu[o]),
                      r = half_bits_to_float(l.r1[o]);
          std::size_t j = 0;
          for (std::size_t i = 0; i < c.in; ++i) {
            const double xi = std::fabs(x[b * c.in + i]);
            if (v.is_salient(i)) {
              mag += std::fabs(w[o * c.in + i]) * xi;
            } else {
              mag += std::fabs(r) * (std::fabs(a) + std::fabs(m)) * std::fabs(half_bits_to_float(l.r2[j++])) * xi;
            }
          }
          const double tol = (c.in + 16) * 1.1920929e-7 * mag;
          REQUIRE(std::fabs(y[b * c.out + o] - yr[b * c.out + o]) <= tol + 1e-30);
        }
      }
    }
  }
}

TEST_CASE("ptq161 every kernel path is exact on small-integer data", "[ptq161]") {
  // integer α, μ, r1, r2, scales, zeros and x: every product and partial sum is an
  // integer below 2^24, exact in fp32 in any order, so each path must equal the reference
  struct Case { std::size_t out, in, n_sal; int bits, gs; };
  const Case cases[] = {{1, 1, 0, 4, -1}, {3, 7, 2, 4, -1}, {17, 31, 5, 4, -1}, {9, 40, 40, 4, -1},
                        {21, 260, 52, 4, 32}, {11, 333, 130, 4, 128}, {8, 201, 41, 3, 32},
                        {40, 576, 115, 4, -1}};
  unsigned seed = 100;
  for (const auto& c : cases) {
    Layer l = random_layer(c.out, c.in, c.n_sal, c.bits, c.gs, seed++);
    std::mt19937 rng(seed);
    auto hi = [&](int lo, int n) { return float_to_half_bits(static_cast<float>(lo + static_cast<int>(rng() % n))); };
    for (auto& e : l.alpha) e = hi(1, 3);
    for (auto& e : l.mu) e = hi(-2, 5);
    for (auto& e : l.r1) e = hi(1, 2);
    for (auto& e : l.r2) e = hi(1, 2);
    for (auto& e : l.scales) e = hi(1, 2);
    const Ptq161View v = l.view();
    REQUIRE_NOTHROW(check_ptq161_view(v));
    for (std::size_t batch : {1u, 2u, 3u, 4u, 9u, 17u}) {
      std::vector<float> x(batch * c.in), y(batch * c.out), yr(batch * c.out);
      for (auto& e : x) e = static_cast<float>(static_cast<int>(rng() % 7) - 3);
      ptq161_matmul_reference(v, x.data(), batch, yr.data());
      for (CpuKernel k : {CpuKernel::Scalar, CpuKernel::Avx2, CpuKernel::Avx512}) {
        if (!cpu_supports(k)) continue;
        for (int nt : {1, 2}) {
          INFO("kernel " << to_string(k) << ", batch " << batch << ", threads " << nt);
          ptq161_matmul(v, x.data(), batch, y.data(), nt, false, k);
          REQUIRE(y == yr);
        }
      }
    }
  }
}

#ifdef _OPENMP
TEST_CASE("ptq161 kernel result does not depend on the thread count", "[ptq161]") {
  const Layer l = random_layer(45, 203, 41, 4, -1, 9);
  std::vector<float> x(19 * 203);
  std::mt19937 rng(3);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (auto& e : x) e = d(rng);
  std::vector<float> y1(19 * 45), y3(19 * 45);
  ptq161_matmul(l.view(), x.data(), 19, y1.data(), 1);
  ptq161_matmul(l.view(), x.data(), 19, y3.data(), 3);
  REQUIRE(y1 == y3);
}
#endif

TEST_CASE("ptq161 validator rejects corrupt buffers", "[ptq161]") {
  Layer l = random_layer(6, 20, 5, 4, -1, 4);
  REQUIRE_NOTHROW(check_ptq161_view(l.view()));
  Layer bad = l;
  bad.mask.back() |= 0x80;  // past in_features
  REQUIRE_THROWS_AS(check_ptq161_view(bad.view()), Error);
  bad = l;
  bad.signs[1] |= 0x80;  // n_bin = 15: bit 15 of row 0 is padding
  REQUIRE_THROWS_AS(check_ptq161_view(bad.view()), Error);
  bad = l;
  bad.alpha[0] = 0x7C00;  // +inf
  REQUIRE_THROWS_AS(check_ptq161_view(bad.view()), Error);
  bad = l;
  bad.r2[3] = 0x7E00;  // NaN
  REQUIRE_THROWS_AS(check_ptq161_view(bad.view()), Error);
  bad = l;
  Ptq161View v = bad.view();
  v.sal.in = 4;  // disagrees with the mask's 5 salient channels
  REQUIRE_THROWS_AS(check_ptq161_view(v), Error);
  v = l.view();
  v.out = 0;
  REQUIRE_THROWS_AS(check_ptq161_view(v), Error);
}
