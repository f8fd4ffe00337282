// Tests of sqllm/float_emu.hpp (round_to_format, arithmetic policies) and of
// the precision-mode reference sqllm/reference/lut_matmul_precision.hpp.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "sqllm/float_emu.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/reference/lut_matmul_precision.hpp"

namespace {

using sqllm::Precision;
using sqllm::PrecisionConfig;
using sqllm::round_to_format;

std::uint32_t fbits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bitsf(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Independent float -> IEEE binary16 (round to nearest even), classic bit code.
std::uint16_t f32_to_f16_bits(float f) {
  const std::uint32_t x = fbits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520 -> inf
  if (ax <= 0x33000000u) return sign;                                        // <= 2^-25 -> 0
  if (ax < 0x38800000u) {                                                    // subnormal half
    const std::uint32_t e = ax >> 23;
    const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - e;  // 14..24
    std::uint32_t r = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<std::uint16_t>(sign | r);
  }
  const std::uint32_t r = ax - 0x38000000u;  // rebias 127 -> 15
  std::uint32_t h = r >> 13;
  const std::uint32_t rem = r & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

double f16_bits_to_double(std::uint16_t h) {
  const int s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
  double v;
  if (e == 31) {
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (e == 0) {
    v = std::ldexp(static_cast<double>(m), -24);
  } else {
    v = std::ldexp(static_cast<double>(1024 + m), e - 25);
  }
  return s ? -v : v;
}

// bfloat16 round-to-nearest-even of a non-NaN float.
float bf16_rne(float f) {
  const std::uint32_t u = fbits(f);
  const std::uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return bitsf(r);
}

bool same_bits(float a, float b) { return fbits(a) == fbits(b); }

// Every non-negative finite value of EeMm, ascending.
std::vector<double> format_values(int e, int m) {
  const int bias = (1 << (e - 1)) - 1;
  const int emin = 1 - bias;
  std::vector<double> v;
  for (int E = 0; E <= (1 << e) - 2; ++E) {
    for (int f = 0; f < (1 << m); ++f) {
      if (E == 0) {
        v.push_back(std::ldexp(static_cast<double>(f), emin - m));
      } else {
        v.push_back(std::ldexp(static_cast<double>((1 << m) + f), E - bias - m));
      }
    }
  }
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

// Brute-force rounding of x >= 0 to EeMm: nearest, ties to the candidate that
// is an even multiple of the gap, above max -> inf if past the midpoint to
// 2^(emax+1) (ties there go to 2^(emax+1), i.e. inf).
double brute_round(const std::vector<double>& vals, int e, double x) {
  const int emax = (1 << (e - 1)) - 1;
  std::vector<double> c = vals;
  c.push_back(std::ldexp(1.0, emax + 1));  // stands for +inf
  auto it = std::lower_bound(c.begin(), c.end(), x);
  double res;
  if (it == c.end()) {
    res = c.back();
  } else if (*it == x) {
    res = x;
  } else {
    const double hi = *it, lo = *(it - 1);
    const double d = hi - lo;
    if (x - lo < hi - x) {
      res = lo;
    } else if (x - lo > hi - x) {
      res = hi;
    } else {
      res = std::fmod(lo / d, 2.0) == 0.0 ? lo : hi;
    }
  }
  return res == c.back() ? std::numeric_limits<double>::infinity() : res;
}

}  // namespace

TEST_CASE("E5M10 equals IEEE binary16 round-to-nearest-even", "[float_emu]") {
  std::uint64_t checked = 0;
  auto check = [&](float f) {
    const float got = round_to_format(f, 5, 10);
    const std::uint16_t h = f32_to_f16_bits(f);
    if (std::isnan(f)) {
      REQUIRE(std::isnan(got));
      return;
    }
    const double want = f16_bits_to_double(h);
    if (!same_bits(got, static_cast<float>(want))) {
      FAIL("round_to_format(" << f << " [0x" << std::hex << fbits(f) << "], 5, 10) = " << got
                              << ", binary16 gives " << want);
    }
#if defined(__FLT16_MAX__)
    const float via_f16 = static_cast<float>(static_cast<_Float16>(f));
    if (!same_bits(got, via_f16)) {
      FAIL("round_to_format(" << f << ", 5, 10) = " << got << ", _Float16 gives " << via_f16);
    }
#endif
    ++checked;
  };
  // Every float bit pattern with stride 1031 (4.2M samples, both signs, all
  // exponents), then the fp16 range at stride 7 (every rounding position and
  // tie pattern of the low 13 bits occurs).
  for (std::uint64_t u = 0; u <= 0xffffffffull; u += 1031) check(bitsf(static_cast<std::uint32_t>(u)));
  for (std::uint32_t u = 0x33000000u - 64; u <= 0x47800000u; u += 7) check(bitsf(u));
  for (std::uint32_t u = 0x33000000u; u <= 0x47800000u; u += 0x1000u) {  // exact ties +-1 ulp
    check(bitsf(u - 1));
    check(bitsf(u));
    check(bitsf(u + 1));
  }
  REQUIRE(checked > 5000000);
}

TEST_CASE("E5M10 edge cases: subnormals, overflow, ties to even, NaN, signed zero",
          "[float_emu]") {
  const float sub = std::ldexp(1.0f, -24);  // smallest fp16 subnormal
  CHECK(round_to_format(sub, 5, 10) == sub);
  CHECK(round_to_format(std::ldexp(1.0f, -25), 5, 10) == 0.0f);             // tie -> even (0)
  CHECK(round_to_format(std::ldexp(1.5f, -25), 5, 10) == sub);              // above the tie
  CHECK(round_to_format(std::ldexp(3.0f, -25), 5, 10) == 2 * sub);          // tie 1.5*sub -> 2*sub
  CHECK(round_to_format(std::ldexp(5.0f, -25), 5, 10) == 2 * sub);          // tie 2.5*sub -> 2*sub
  CHECK(round_to_format(std::ldexp(1023.5f, -24), 5, 10) == std::ldexp(1.0f, -14));  // to normal
  CHECK(round_to_format(65504.0f, 5, 10) == 65504.0f);
  CHECK(round_to_format(65519.0f, 5, 10) == 65504.0f);
  CHECK(std::isinf(round_to_format(65520.0f, 5, 10)));   // tie with 2^16 -> even -> overflow
  CHECK(round_to_format(-70000.0f, 5, 10) == -std::numeric_limits<float>::infinity());
  CHECK(round_to_format(1.0f + std::ldexp(1.0f, -11), 5, 10) == 1.0f);     // tie, 1 is even
  CHECK(round_to_format(1.0f + 3 * std::ldexp(1.0f, -11), 5, 10) ==
        1.0f + std::ldexp(1.0f, -9));                                       // tie, round up to even
  CHECK(std::signbit(round_to_format(-0.0f, 5, 10)));
  CHECK(std::signbit(round_to_format(-std::ldexp(1.0f, -30), 5, 10)));     // underflow keeps sign
  const float nan = bitsf(0x7fc01234u);
  CHECK(fbits(round_to_format(nan, 5, 10)) == 0x7fc01234u);               // NaN bits preserved
  CHECK(std::isnan(round_to_format(static_cast<double>(nan), 4, 3)));
  CHECK(round_to_format(std::numeric_limits<float>::infinity(), 3, 2) ==
        std::numeric_limits<float>::infinity());
}

TEST_CASE("E8M7 equals bfloat16 round-to-nearest-even, subnormals included", "[float_emu]") {
  std::uint64_t n = 0;
  for (std::uint64_t u = 0; u <= 0xffffffffull; u += 1031) {
    const float f = bitsf(static_cast<std::uint32_t>(u));
    if (std::isnan(f)) continue;
    const float got = round_to_format(f, 8, 7);
    if (!same_bits(got, bf16_rne(f))) {
      FAIL("round_to_format(0x" << std::hex << fbits(f) << ", 8, 7) = 0x" << fbits(got)
                                << ", bf16 RNE gives 0x" << fbits(bf16_rne(f)));
    }
    ++n;
  }
  // Ties and near-ties in the bf16 subnormal range and at the overflow edge.
  for (std::uint32_t u : {0x00008000u, 0x00018000u, 0x00007fffu, 0x00008001u, 0x7f7f8000u,
                          0x7f7fffffu, 0x7f7f7fffu, 0x3f808000u, 0x3f818000u}) {
    CHECK(same_bits(round_to_format(bitsf(u), 8, 7), bf16_rne(bitsf(u))));
  }
  CHECK(std::isinf(round_to_format(std::numeric_limits<float>::max(), 8, 7)));
  REQUIRE(n > 4000000);
}

TEST_CASE("E8M23 is the identity on floats", "[float_emu]") {
  for (std::uint64_t u = 0; u <= 0xffffffffull; u += 4099) {
    const float f = bitsf(static_cast<std::uint32_t>(u));
    if (std::isnan(f)) continue;
    REQUIRE(same_bits(round_to_format(f, 8, 23), f));
  }
}

TEST_CASE("small formats match a brute-force nearest-even search", "[float_emu]") {
  std::mt19937_64 rng(12345);
  for (int e = 2; e <= 5; ++e) {
    for (int m = 0; m <= 4; ++m) {
      const std::vector<double> vals = format_values(e, m);
      const int bias = (1 << (e - 1)) - 1;
      std::vector<double> inputs;
      // The values, the midpoints (ties), and points just off the midpoints.
      for (std::size_t k = 0; k + 1 < vals.size(); ++k) {
        const double mid = 0.5 * (vals[k] + vals[k + 1]);
        inputs.insert(inputs.end(), {vals[k], mid, std::nextafter(mid, 0.0),
                                     std::nextafter(mid, 1e300)});
      }
      const double top = vals.back(), above = std::ldexp(1.0, bias + 1);
      const double mid_top = 0.5 * (top + above);
      inputs.insert(inputs.end(), {top, mid_top, std::nextafter(mid_top, 0.0),
                                   std::nextafter(mid_top, 1e300), above, 4 * above});
      std::uniform_real_distribution<double> lg(static_cast<double>(1 - bias - m - 3),
                                                static_cast<double>(bias + 2));
      for (int t = 0; t < 2000; ++t) inputs.push_back(std::exp2(lg(rng)));
      for (double x : inputs) {
        const double want = brute_round(vals, e, x);
        const float got = round_to_format(x, e, m);
        const float got_neg = round_to_format(-x, e, m);
        if (static_cast<double>(got) != want || static_cast<double>(got_neg) != -want) {
          FAIL("E" << e << "M" << m << ": round(" << x << ") = " << got << " / " << got_neg
                   << ", brute force " << want);
        }
      }
    }
  }
}

TEST_CASE("E4M3 and E3M2 spot values", "[float_emu]") {
  // E4M3 (IEEE-like, with inf): bias 7, max (2 - 1/8) * 2^7 = 240, min subnormal 2^-9.
  CHECK(round_to_format(240.0f, 4, 3) == 240.0f);
  CHECK(round_to_format(247.0f, 4, 3) == 240.0f);
  CHECK(std::isinf(round_to_format(248.0f, 4, 3)));  // tie with 256 -> even -> inf
  CHECK(round_to_format(std::ldexp(1.0f, -9), 4, 3) == std::ldexp(1.0f, -9));
  CHECK(round_to_format(std::ldexp(1.0f, -10), 4, 3) == 0.0f);
  CHECK(round_to_format(0.3f, 4, 3) == 0.3125f);
  // E3M2: bias 3, max 1.75 * 8 = 14.
  CHECK(round_to_format(14.0f, 3, 2) == 14.0f);
  CHECK(round_to_format(14.9f, 3, 2) == 14.0f);
  CHECK(std::isinf(round_to_format(15.0f, 3, 2)));  // tie between 14 (odd) and 16 -> inf
}

TEST_CASE("the double overload rounds once (no double rounding)", "[float_emu]") {
  // 1 + 2^-11 + 2^-40: via float it first becomes the tie 1 + 2^-11 (-> 1.0);
  // rounded once it is above the tie and goes up to 1 + 2^-10.
  const double v = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  CHECK(round_to_format(v, 5, 10) == 1.0f + std::ldexp(1.0f, -10));
  CHECK(round_to_format(static_cast<float>(v), 5, 10) == 1.0f);
  // Doubles below every float subnormal round to signed zero.
  CHECK(round_to_format(1e-300, 8, 23) == 0.0f);
  CHECK(std::signbit(round_to_format(-1e-300, 8, 23)));
  CHECK(std::isinf(round_to_format(1e300, 8, 23)));
}

TEST_CASE("format validation throws sqllm::Error", "[float_emu]") {
  CHECK_THROWS_AS(sqllm::check_float_format(1, 3), sqllm::Error);
  CHECK_THROWS_AS(sqllm::check_float_format(9, 3), sqllm::Error);
  CHECK_THROWS_AS(sqllm::check_float_format(5, 24), sqllm::Error);
  CHECK_NOTHROW(sqllm::check_float_format(8, 23));
  PrecisionConfig p;
  p.mode = Precision::Emulated;
  p.acc_man = -1;
  CHECK_THROWS_WITH(sqllm::check_precision(p), Catch::Contains("accumulate format"));
}

TEST_CASE("policies: Emulated(8,23,8,23) == FP32 and Emulated(5,10,8,23) == FP16", "[float_emu]") {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  std::uniform_int_distribution<int> ex(-40, 40);
  const sqllm::ArithFP32 f32;
  const sqllm::ArithFP16 f16;
  const sqllm::ArithEmulated e32{8, 23, 8, 23}, e16{5, 10, 8, 23};
  for (int t = 0; t < 200000; ++t) {
    const float a = std::ldexp(u(rng), ex(rng)), b = std::ldexp(u(rng), ex(rng));
    REQUIRE(same_bits(e32.mul(e32.operand(a), e32.operand(b)), f32.mul(a, b)));
    REQUIRE(same_bits(e32.add(a, b), f32.add(a, b)));
    REQUIRE(same_bits(e16.mul(e16.operand(a), e16.operand(b)), f16.mul(f16.operand(a), f16.operand(b))));
    REQUIRE(same_bits(e16.add(a, b), f16.add(a, b)));
#if defined(__FLT16_MAX__)
    // FP16 mul is an fp16 multiply.
    const _Float16 ha = static_cast<_Float16>(a), hb = static_cast<_Float16>(b);
    REQUIRE(same_bits(f16.mul(f16.operand(a), f16.operand(b)), static_cast<float>(ha * hb)));
#endif
  }
}

// ---------------------------------------------------------------------------
// The precision-mode reference.
// ---------------------------------------------------------------------------
namespace {

struct Problem {
  std::int64_t batch, in, out;
  int bits;
  bool col;
  std::vector<float> x, tables, values;
  std::vector<std::uint32_t> codes;
  std::vector<std::int32_t> row_ptr, col_idx;

  std::vector<std::uint16_t> values_h;  // the sparse values as fp16 bits (values are fp16-exact)

  sqllm::reference::LutMatmulView view(bool sparse) const {
    sqllm::reference::LutMatmulView v;
    v.x = x.data();
    v.batch = batch;
    v.w.in = static_cast<std::size_t>(in);
    v.w.out = static_cast<std::size_t>(out);
    v.w.bits = bits;
    v.w.codes = codes.data();
    v.w.tables = tables.data();
    v.w.axis = col ? sqllm::GroupAxis::Column : sqllm::GroupAxis::Row;
    if (sparse) v.w.sparse = sqllm::CsrView{row_ptr.data(), col_idx.data(), values_h.data(), values_h.size()};
    return v;
  }
};

// integers=true: small integer tables/x (every fp32 sum exact).  Otherwise
// magnitudes in [1/64, 4] (fp16-normal operands and products).
Problem make_problem(std::int64_t batch, std::int64_t in, std::int64_t out, int bits, bool col,
                     bool integers, std::uint32_t seed) {
  std::mt19937 rng(seed);
  Problem p{batch, in, out, bits, col, {}, {}, {}, {}, {}, {}, {}};
  const std::int64_t K = std::int64_t{1} << bits;
  auto val = [&]() {
    if (integers) return static_cast<float>(std::uniform_int_distribution<int>(-8, 8)(rng));
    const float mag = std::exp2(std::uniform_real_distribution<float>(-6.0f, 2.0f)(rng));
    return std::uniform_int_distribution<int>(0, 1)(rng) ? mag : -mag;
  };
  p.x.resize(static_cast<std::size_t>(batch * in));
  for (auto& v : p.x) v = round_to_format(val(), 5, 10);  // fp16 activations
  p.tables.resize(static_cast<std::size_t>((col ? in : out) * K));
  for (auto& v : p.tables) v = val();
  std::vector<std::uint8_t> c(static_cast<std::size_t>(out * in));
  for (auto& v : c) v = static_cast<std::uint8_t>(std::uniform_int_distribution<int>(0, int(K) - 1)(rng));
  p.codes.resize(static_cast<std::size_t>(out) * sqllm::packed_words(static_cast<std::size_t>(in), bits));
  sqllm::pack_codes(c.data(), static_cast<std::size_t>(out), static_cast<std::size_t>(in), bits,
                    p.codes.data());
  p.row_ptr.push_back(0);
  for (std::int64_t o = 0; o < out; ++o) {
    // Sorted, distinct columns (the CSR layout of csr.hpp); fp16 values.
    const int n = std::uniform_int_distribution<int>(0, 5)(rng);
    std::vector<std::int32_t> cols;
    for (int k = 0; k < n; ++k) cols.push_back(std::uniform_int_distribution<int>(0, int(in) - 1)(rng));
    std::sort(cols.begin(), cols.end());
    cols.erase(std::unique(cols.begin(), cols.end()), cols.end());
    for (std::int32_t c : cols) {
      p.col_idx.push_back(c);
      p.values.push_back(round_to_format(val(), 5, 10));
      p.values_h.push_back(sqllm::float_to_half_bits(p.values.back()));
    }
    p.row_ptr.push_back(static_cast<std::int32_t>(p.col_idx.size()));
  }
  return p;
}

// max over outputs of |y - y64| / bound where bound = rel * sum|terms| + tiny.
double worst_ratio(const Problem& p, bool sparse, const PrecisionConfig& cfg, double rel) {
  const auto v = p.view(sparse);
  std::vector<float> y(static_cast<std::size_t>(p.batch * p.out));
  std::vector<double> y64(y.size()), a64(y.size());
  sqllm::reference::lut_matmul_precision(v, cfg, y.data());
  sqllm::reference::lut_matmul_f64(v, y64.data());
  sqllm::reference::lut_matmul_f64(v, a64.data(), /*absolute=*/true);
  double worst = 0;
  for (std::size_t k = 0; k < y.size(); ++k) {
    const double err = std::fabs(static_cast<double>(y[k]) - y64[k]);
    worst = std::max(worst, err / (rel * a64[k] + 1e-30));
  }
  return worst;
}

// Relative error bound of one term: each term of the sum is perturbed by at
// most (1 + u_m)^r (1 + u_a)^n - 1, r = number of roundings of the product
// (operands and product), n = additions it passes through: ceil(in/32) lane
// steps + 5 tree levels + the sparse entries of the row (<= 5 here).
double term_bound(double u_mul, int roundings, double u_acc, std::int64_t in) {
  const double n = std::ceil(static_cast<double>(in) / 32.0) + 5 + 5;
  return std::pow(1 + u_mul, roundings) * std::pow(1 + u_acc, n) - 1;
}

}  // namespace

TEST_CASE("reference, FP32 mode: exact on small integers, bounded otherwise", "[float_emu]") {
  PrecisionConfig fp32;
  for (int bits : {2, 3, 4}) {
    for (bool col : {false, true}) {
      for (bool sparse : {false, true}) {
        const Problem p = make_problem(3, 77, 9, bits, col, /*integers=*/true, 100 + bits);
        REQUIRE(worst_ratio(p, sparse, fp32, 1e-300) == 0.0);  // exact
        const Problem q = make_problem(2, 300, 7, bits, col, false, 200 + bits);
        // FP32: one rounding per product, fp32 accumulation (u = 2^-24).
        const double rel = term_bound(std::ldexp(1.0, -24), 1, std::ldexp(1.0, -24), q.in);
        CHECK(worst_ratio(q, sparse, fp32, rel) <= 1.0);
      }
    }
  }
}

TEST_CASE("reference, FP16 and Emulated modes within their epsilon bounds", "[float_emu]") {
  PrecisionConfig fp16;
  fp16.mode = Precision::FP16;
  PrecisionConfig e4m3;  // fp8-like multiply, bf16-like accumulate
  e4m3.mode = Precision::Emulated;
  e4m3.mul_exp = 5;
  e4m3.mul_man = 3;
  e4m3.acc_exp = 8;
  e4m3.acc_man = 7;
  for (int bits : {2, 3, 4}) {
    for (bool col : {false, true}) {
      const Problem p = make_problem(2, 333, 11, bits, col, false, 300 + bits);
      // FP16: operands and product rounded to fp16 (u = 2^-11, 3 roundings),
      // fp32 accumulation.  Magnitudes >= 2^-12 keep all of them normal.
      CHECK(worst_ratio(p, true, fp16, term_bound(std::ldexp(1.0, -11), 3, std::ldexp(1.0, -24), p.in)) <= 1.0);
      // E5M3 / E8M7: u_m = 2^-4, u_a = 2^-8.
      CHECK(worst_ratio(p, true, e4m3, term_bound(std::ldexp(1.0, -4), 3, std::ldexp(1.0, -8), p.in)) <= 1.0);
      // ...and the bound is not vacuous: the coarse mode is visibly inexact.
      CHECK(worst_ratio(p, true, e4m3, 1e-6) > 1.0);
    }
  }
}

TEST_CASE("reference: FP16 == Emulated(5,10,8,23) and FP32 == Emulated(8,23,8,23) bitwise",
          "[float_emu]") {
  const Problem p = make_problem(3, 129, 13, 3, false, false, 42);
  const auto v = p.view(true);
  std::vector<float> a(static_cast<std::size_t>(p.batch * p.out)), b(a.size());
  PrecisionConfig c1, c2;
  c1.mode = Precision::FP16;
  c2.mode = Precision::Emulated;  // defaults: E5M10 multiply, E8M23 accumulate
  sqllm::reference::lut_matmul_precision(v, c1, a.data());
  sqllm::reference::lut_matmul_precision(v, c2, b.data());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
  c1.mode = Precision::FP32;
  c2.mul_exp = 8;
  c2.mul_man = 23;
  sqllm::reference::lut_matmul_precision(v, c1, a.data());
  sqllm::reference::lut_matmul_precision(v, c2, b.data());
  CHECK(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

TEST_CASE("reference order equals a simulated 32-lane warp with a shfl_xor butterfly",
          "[float_emu]") {
  // A coarse accumulate format (E6M4) makes any change of order visible.
  const sqllm::ArithEmulated ar{5, 6, 6, 4};
  PrecisionConfig cfg;
  cfg.mode = Precision::Emulated;
  cfg.mul_exp = 5;
  cfg.mul_man = 6;
  cfg.acc_exp = 6;
  cfg.acc_man = 4;
  for (std::int64_t in : {1, 31, 32, 33, 100, 257}) {
    const Problem p = make_problem(2, in, 5, 4, true, false, static_cast<std::uint32_t>(in));
    const auto v = p.view(true);
    std::vector<float> y(static_cast<std::size_t>(p.batch * p.out));
    sqllm::reference::lut_matmul_precision(v, cfg, y.data());
    for (std::int64_t b = 0; b < p.batch; ++b) {
      for (std::int64_t o = 0; o < p.out; ++o) {
        float lane[32];
        for (int l = 0; l < 32; ++l) {
          lane[l] = 0.0f;
          for (std::int64_t i = l; i < in; i += 32) {
            lane[l] = ar.add(lane[l], ar.mul(ar.operand(sqllm::reference::lut_weight(v, o, i)),
                                             ar.operand(p.x[static_cast<std::size_t>(b * in + i)])));
          }
        }
        for (int off = 16; off >= 1; off /= 2) {  // butterfly: every lane updates
          float next[32];
          for (int l = 0; l < 32; ++l) next[l] = ar.add(lane[l], lane[l ^ off]);
          std::copy(next, next + 32, lane);
        }
        float s = lane[0];
        for (std::int32_t k = p.row_ptr[o]; k < p.row_ptr[o + 1]; ++k) {
          s = ar.add(s, ar.mul(ar.operand(p.values[k]),
                               ar.operand(p.x[static_cast<std::size_t>(b * in + p.col_idx[k])])));
        }
        REQUIRE(same_bits(s, y[static_cast<std::size_t>(b * p.out + o)]));
      }
    }
  }
}

TEST_CASE("reference rejects bad shapes and CSR with sqllm::Error", "[float_emu]") {
  Problem p = make_problem(1, 40, 3, 2, false, true, 1);
  auto v = p.view(true);
  std::vector<float> y(3);
  PrecisionConfig cfg;
  auto bad = v;
  bad.w.bits = 9;
  CHECK_THROWS_AS(sqllm::reference::lut_matmul_precision(bad, cfg, y.data()), sqllm::Error);
  bad = v;
  bad.w.in = 0;
  CHECK_THROWS_WITH(sqllm::reference::lut_matmul_precision(bad, cfg, y.data()),
                    Catch::Contains("in=0"));
  p.col_idx.assign(p.col_idx.size(), 40);
  if (!p.col_idx.empty()) {
    CHECK_THROWS_WITH(sqllm::reference::lut_matmul_precision(p.view(true), cfg, y.data()),
                      Catch::Contains("out of range"));
  }
}
