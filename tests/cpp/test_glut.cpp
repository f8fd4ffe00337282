// Grouped lookup tables (glut.hpp): the fast decode and kernel against the
// scalar references, the compact-table encoder, the quantizer's codes, and
// bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "sqllm/glut.hpp"

using namespace sqllm;

namespace {

struct Packed {
  std::vector<std::uint32_t> qweight;
  std::vector<std::uint8_t> tables;
  std::vector<std::uint16_t> scales, offsets;
  GlutView view(std::size_t out, std::size_t in, int bits, int g) const {
    GlutView v;
    v.qweight = qweight.data();
    v.tables = tables.data();
    v.scales = scales.data();
    v.offsets = offsets.data();
    v.out = out;
    v.in = in;
    v.bits = bits;
    v.group_size = g;
    return v;
  }
};

Packed random_packed(std::mt19937& rng, std::size_t out, std::size_t in, int bits, int g) {
  const std::size_t G = glut_num_groups(in, static_cast<std::size_t>(g)), K = std::size_t{1} << bits;
  std::uniform_int_distribution<int> code(0, static_cast<int>(K) - 1), byte(0, 255);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<std::uint8_t> codes(out * in);
  for (auto& c : codes) c = static_cast<std::uint8_t>(code(rng));
  Packed p;
  p.qweight.assign(out * packed_words(in, bits), 0u);
  pack_codes(codes.data(), out, in, bits, p.qweight.data());
  p.tables.resize(out * G * K);
  for (auto& t : p.tables) t = static_cast<std::uint8_t>(byte(rng));
  for (std::size_t t = 0; t < out * G; ++t) {
    p.scales.push_back(float_to_half_bits(std::abs(nd(rng)) * 0.01f));
    p.offsets.push_back(float_to_half_bits(nd(rng) * 0.5f));
  }
  return p;
}

bool bit_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("glut: fast decode equals the scalar reference bit for bit", "[glut]") {
  std::mt19937 rng(11);
  for (int bits = 1; bits <= 8; ++bits) {
    for (auto shape : {std::pair<std::size_t, int>{37, 5}, {64, 64}, {100, 33}, {129, 32},
                       {576, 576}, {200, 1000}, {31, 1}}) {
      const std::size_t out = 3, in = shape.first;
      const int g = shape.second;
      Packed p = random_packed(rng, out, in, bits, g);
      const GlutView v = p.view(out, in, bits, g);
      check_glut_view(v);
      std::vector<float> a(out * in), b(out * in);
      glut_dequantize(v, a.data(), 2);
      glut_dequantize_ref(v, b.data());
      INFO("bits=" << bits << " in=" << in << " g=" << g);
      REQUIRE(bit_equal(a, b));
      // matmul: fp32 accumulation within in * 2^-24 * sum|x w| of the double reference
      std::normal_distribution<float> nd(0.0f, 1.0f);
      const std::size_t batch = 4;
      std::vector<float> x(batch * in), y(batch * out), yr(batch * out);
      for (auto& xi : x) xi = nd(rng);
      glut_matmul(v, x.data(), batch, y.data(), 2);
      glut_matmul_ref(v, x.data(), batch, yr.data());
      for (std::size_t n = 0; n < batch; ++n)
        for (std::size_t o = 0; o < out; ++o) {
          double absdot = 0.0;
          for (std::size_t i = 0; i < in; ++i) absdot += std::abs(static_cast<double>(x[n * in + i]) * b[o * in + i]);
          const double bound = static_cast<double>(in + 2) * std::ldexp(1.0, -24) * absdot +
                               std::ldexp(1.0, -24) * std::abs(static_cast<double>(yr[n * out + o]));
          REQUIRE(std::abs(static_cast<double>(y[n * out + o]) - yr[n * out + o]) <= bound + 1e-30);
        }
    }
  }
}

TEST_CASE("glut: the compact table spans its values within half a step", "[glut]") {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int rep = 0; rep < 200; ++rep) {
    const std::size_t K = std::size_t{1} << (1 + rep % 6);
    std::vector<float> c(K);
    const float scale = std::ldexp(1.0f, -(rep % 12));
    for (auto& v : c) v = nd(rng) * scale;
    std::vector<std::uint8_t> q(K);
    std::uint16_t sb = 0, ob = 0;
    detail::glut_compact(c.data(), K, q.data(), &sb, &ob);
    const float s = half_bits_to_float(sb), o = half_bits_to_float(ob);
    float lo = c[0], hi = c[0];
    for (float v : c) {
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    REQUIRE(o <= lo);
    REQUIRE(glut_entry(255, s, o) >= hi);
    for (std::size_t k = 0; k < K; ++k) {
      // the nearest of the 256 steps: within half a step (plus the fp32 rounding of the entry)
      REQUIRE(std::abs(glut_entry(q[k], s, o) - c[k]) <= 0.5f * s * 1.0001f + 1e-6f * std::abs(c[k]));
    }
  }
}

TEST_CASE("glut: codes are the nearest decoded entries; bad input throws", "[glut]") {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const std::size_t out = 5, in = 70;
  std::vector<float> W(out * in), S(out * in);
  for (auto& w : W) w = nd(rng);
  for (auto& s : S) s = std::abs(nd(rng));
  GlutParams p;
  p.bits = 3;
  p.group_size = 16;
  const std::size_t G = glut_num_groups(in, 16), K = 8;
  Packed pk;
  pk.qweight.resize(out * packed_words(in, 3));
  pk.tables.resize(out * G * K);
  pk.scales.resize(out * G);
  pk.offsets.resize(out * G);
  std::vector<std::uint8_t> codes(out * in);
  GlutOut o;
  o.qweight = pk.qweight.data();
  o.tables = pk.tables.data();
  o.scales = pk.scales.data();
  o.offsets = pk.offsets.data();
  o.codes = codes.data();
  glut_quantize(W.data(), S.data(), out, in, p, o);
  std::vector<float> Wq(out * in);
  glut_dequantize_ref(pk.view(out, in, 3, 16), Wq.data());
  std::vector<float> dec(out * G * K);
  glut_decode_tables(pk.view(out, in, 3, 16), dec.data());
  for (std::size_t r = 0; r < out; ++r)
    for (std::size_t i = 0; i < in; ++i) {
      const float* t = dec.data() + (r * G + i / 16) * K;
      for (std::size_t k = 0; k < K; ++k) REQUIRE(std::abs(W[r * in + i] - Wq[r * in + i]) <= std::abs(W[r * in + i] - t[k]));
    }
  GlutParams bad = p;
  bad.bits = 0;
  REQUIRE_THROWS_WITH(glut_quantize(W.data(), S.data(), out, in, bad, o), Catch::Contains("bits must be in 1..8"));
  bad = p;
  bad.group_size = 0;
  REQUIRE_THROWS_WITH(glut_quantize(W.data(), S.data(), out, in, bad, o), Catch::Contains("group_size"));
  W[7] = std::nanf("");
  REQUIRE_THROWS_WITH(glut_quantize(W.data(), S.data(), out, in, p, o), Catch::Contains("non-finite"));
  pk.scales[2] = 0x7c00u;  // +inf
  REQUIRE_THROWS_WITH(check_glut_view(pk.view(out, in, 3, 16)), Catch::Contains("not finite"));
}
