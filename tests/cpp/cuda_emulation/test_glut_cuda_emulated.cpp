// The CUDA glut kernels (cuda/glut_matmul.cu, compiled as C++ against the host
// emulator cuda/emulation) through their host API sqllm_cuda_glut.h, against a
// float64 decode written here from the layout (codes kept unpacked and packed
// bit by bit, entries s*q + t formed in double -- exact: an fp16 times an
// 8-bit integer plus an fp16 needs < 53 bits).  What is checked:
//   * the GEMV for fp16/bf16/fp32 activations, every bit width 1..8, group
//     sizes that are and are not multiples of 32 (1, 5, 7, 16, 24, 32, 33, 64,
//     70, 96, 100, 288, 576, larger than in), in not a multiple of 32 (partial
//     last chunk), in = 1, batch 1..9 (tiles of 1, 2, 4, 8 and a partial second
//     tile), several shared-memory tiles of x, strided x -- against float64
//     within the bound of an fp32 sum in any order (see gemv_bound);
//   * every output written exactly once and nothing outside y written;
//   * the dequantizer: its fp32 output equals the CPU glut_dequantize, the
//     scalar reference glut_dequantize_ref and the float64 decode rounded once
//     to fp32, bit for bit; its fp16/bf16 outputs are those values rounded
//     once (nearest even) -- the same weights on CPU, emulated CUDA and the
//     reference;
//   * corrupt tail bits are never read past (ASan) and give finite outputs;
//   * bad arguments raise sqllm::Error naming the problem before any launch;
//     launch failures raise sqllm::RuntimeFailure naming the launch.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sqllm/error.hpp"
#include "sqllm/glut.hpp"
#include "sqllm/half.hpp"
#include "sqllm_cuda.h"
#include "sqllm_cuda_glut.h"
#include "sqllm_emu.hpp"

using sqllm::GlutView;
using sqllm::cuda::DType;
using sqllm::cuda::GlutDequantizeArgs;
using sqllm::cuda::GlutMatmulArgs;

namespace {

std::size_t esize(DType d) { return d == DType::F32 ? 4 : 2; }

float load_as_float(DType d, const unsigned char* p) {
  if (d == DType::F32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  std::uint16_t h;
  std::memcpy(&h, p, 2);
  if (d == DType::F16) return sqllm::half_bits_to_float(h);
  const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void store_float(DType d, float f, unsigned char* p) {
  if (d == DType::F32) {
    std::memcpy(p, &f, 4);
  } else if (d == DType::F16) {
    const std::uint16_t h = __float2half_rn(f).bits;
    std::memcpy(p, &h, 2);
  } else {
    const std::uint16_t h = __float2bfloat16_rn(f).bits;
    std::memcpy(p, &h, 2);
  }
}

/// Unit roundoff of the output type (the one final rounding; 0 for fp32 output)
/// and half its smallest subnormal (the absolute error below the normal range).
double unit_out(DType d) {
  return d == DType::F16 ? std::ldexp(1.0, -11) : d == DType::BF16 ? std::ldexp(1.0, -8) : 0.0;
}
double abs_out(DType d) {
  return d == DType::F16 ? std::ldexp(1.0, -25) : d == DType::BF16 ? std::ldexp(1.0, -134) : 0.0;
}
double gamma_n(double n) {
  const double u = std::ldexp(1.0, -24);
  return n * u / (1.0 - n * u);
}

/// A random glut layer: codes kept unpacked for the reference, packed bit by
/// bit (stream bit i*bits + b is bit (i*bits + b) % 32 of word (i*bits + b) / 32).
struct GlutProblem {
  std::size_t out = 0, in = 0, G = 0, K = 0, words = 0;
  int bits = 0, g = 0;
  std::vector<std::uint8_t> codes;  // out x in
  std::vector<std::uint32_t> qweight;
  std::vector<std::uint8_t> tables;
  std::vector<std::uint16_t> scales, offsets;

  GlutView view() const {
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
  /// Ŵ[o, i] before any rounding (float64, exact).
  double w64(std::size_t o, std::size_t i) const {
    const std::size_t t = o * G + i / static_cast<std::size_t>(g);
    return static_cast<double>(sqllm::half_bits_to_float(scales[t])) * tables[t * K + codes[o * in + i]] +
           static_cast<double>(sqllm::half_bits_to_float(offsets[t]));
  }
};

/// wide: scales spread over 2^-22..2^2 (fp16 subnormals included) instead of 0..0.02.
GlutProblem make_glut(std::size_t out, std::size_t in, int bits, int g, unsigned seed, bool wide = false) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  GlutProblem p;
  p.out = out;
  p.in = in;
  p.bits = bits;
  p.g = g;
  p.K = std::size_t{1} << bits;
  p.G = (in + static_cast<std::size_t>(g) - 1) / static_cast<std::size_t>(g);
  p.words = (in * static_cast<std::size_t>(bits) + 31) / 32;
  std::uniform_int_distribution<int> code(0, static_cast<int>(p.K) - 1), byte(0, 255);
  p.codes.resize(out * in);
  p.qweight.assign(out * p.words, 0u);
  for (std::size_t o = 0; o < out; ++o) {
    for (std::size_t i = 0; i < in; ++i) {
      const auto c = static_cast<std::uint8_t>(code(rng));
      p.codes[o * in + i] = c;
      for (int b = 0; b < bits; ++b) {
        if ((c >> b) & 1u) {
          const std::size_t bit = i * static_cast<std::size_t>(bits) + static_cast<std::size_t>(b);
          p.qweight[o * p.words + bit / 32] |= 1u << (bit % 32);
        }
      }
    }
  }
  p.tables.resize(out * p.G * p.K);
  for (auto& q : p.tables) q = static_cast<std::uint8_t>(byte(rng));
  p.scales.resize(out * p.G);
  p.offsets.resize(out * p.G);
  for (std::size_t t = 0; t < out * p.G; ++t) {
    const float s = wide ? std::ldexp(ud(rng) + 0.5f, -22 + static_cast<int>(ud(rng) * 24.0f)) : 0.02f * ud(rng);
    p.scales[t] = sqllm::float_to_half_bits(s);
    p.offsets[t] = sqllm::float_to_half_bits(0.5f * nd(rng));
  }
  return p;
}

/// Runs the GEMV on random x; every output within the float64 bound.
void check_gemv(const GlutProblem& p, std::int64_t batch, DType dt, std::int64_t extra_stride, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const auto in = static_cast<std::int64_t>(p.in), out = static_cast<std::int64_t>(p.out);
  const std::int64_t stride = in + extra_stride;
  const std::size_t es = esize(dt);
  std::vector<unsigned char> x(static_cast<std::size_t>(batch * stride) * es);
  std::vector<double> xf(static_cast<std::size_t>(batch * stride));
  for (std::int64_t i = 0; i < batch * stride; ++i) {
    // The stride gap holds NaN, which must never be read.
    const float v = (i % stride) < in ? nd(rng) : std::numeric_limits<float>::quiet_NaN();
    store_float(dt, v, &x[static_cast<std::size_t>(i) * es]);
    xf[static_cast<std::size_t>(i)] = load_as_float(dt, &x[static_cast<std::size_t>(i) * es]);
  }
  const std::size_t ybytes = static_cast<std::size_t>(batch * out) * es, guard = 64;
  std::vector<unsigned char> ybuf(ybytes + 2 * guard, 0xA5);
  GlutMatmulArgs a;
  a.layer = p.view();
  a.x = x.data();
  a.y = ybuf.data() + guard;
  a.batch = batch;
  a.x_stride = extra_stride ? stride : 0;
  a.dtype = dt;
  sqllm::cuda::glut_matmul(a);
  for (std::size_t i = 0; i < guard; ++i) {
    REQUIRE(ybuf[i] == 0xA5);
    REQUIRE(ybuf[guard + ybytes + i] == 0xA5);
  }
  // The kernel sums the `in` exact products x * fl32(Ŵ) in fp32 in some order:
  // |y32 - sum x fl32(Ŵ)| <= gamma(in) sum |x fl32(Ŵ)|, and |fl32(Ŵ) - Ŵ| <= u |Ŵ|,
  // so |y32 - ref| <= (u + (1 + u) gamma(in)) mag <= gamma(in + 1) mag, then one
  // rounding to the output type.
  const double gam = gamma_n(static_cast<double>(in) + 1.0);
  std::vector<double> wrow(p.in);
  for (std::int64_t o = 0; o < out; ++o) {
    for (std::size_t i = 0; i < p.in; ++i) wrow[i] = p.w64(static_cast<std::size_t>(o), i);
    for (std::int64_t b = 0; b < batch; ++b) {
      double ref = 0.0, mag = 0.0;
      for (std::int64_t i = 0; i < in; ++i) {
        const double t = xf[static_cast<std::size_t>(b * stride + i)] * wrow[static_cast<std::size_t>(i)];
        ref += t;
        mag += std::fabs(t);
      }
      const double got = load_as_float(dt, &ybuf[guard + static_cast<std::size_t>(b * out + o) * es]);
      const double e32 = gam * mag;
      const double bound = e32 + unit_out(dt) * (std::fabs(ref) + e32) + abs_out(dt);
      INFO("b=" << b << " o=" << o << " ref=" << ref << " got=" << got << " bound=" << bound);
      REQUIRE(std::fabs(got - ref) <= bound);
    }
  }
}

/// The dequantizer's output in each dtype vs the CPU decodes and float64, bit for bit.
void check_dequant(const GlutProblem& p) {
  const GlutView v = p.view();
  sqllm::check_glut_view(v);
  std::vector<float> cpu(p.out * p.in), ref(p.out * p.in);
  sqllm::glut_dequantize(v, cpu.data(), 1);
  sqllm::glut_dequantize_ref(v, ref.data());
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    const std::size_t es = esize(dt);
    std::vector<unsigned char> w(p.out * p.in * es, 0xA5);
    GlutDequantizeArgs a;
    a.layer = v;
    a.w = w.data();
    a.dtype = dt;
    sqllm::cuda::glut_dequantize(a);
    for (std::size_t o = 0; o < p.out; ++o) {
      for (std::size_t i = 0; i < p.in; ++i) {
        const std::size_t k = o * p.in + i;
        const float exact32 = static_cast<float>(p.w64(o, i));  // the one fp32 rounding of s*q + t
        INFO("o=" << o << " i=" << i << " dtype=" << static_cast<int>(dt));
        REQUIRE(std::memcmp(&cpu[k], &exact32, 4) == 0);
        REQUIRE(std::memcmp(&ref[k], &exact32, 4) == 0);
        unsigned char want[4];
        store_float(dt, exact32, want);
        REQUIRE(std::memcmp(&w[k * es], want, es) == 0);
      }
    }
  }
}

const DType kTypes[] = {DType::F16, DType::BF16, DType::F32};

struct Cfg {
  std::size_t in, out;
  int bits, g;
};

}  // namespace

TEST_CASE("glut GEMV equals float64 within the fp32 bound: every width, aligned and unaligned groups",
          "[cuda_emu][glut]") {
  unsigned seed = 1;
  for (int bits = 1; bits <= 8; ++bits) {
    for (int g : {1, 24, 64, 100}) {  // 64: a multiple of 32 (one group per chunk)
      const GlutProblem p = make_glut(10, 150, bits, g, seed++);
      for (DType dt : kTypes) {
        for (std::int64_t batch : {1, 3, 8, 9}) {
          INFO("bits=" << bits << " g=" << g << " dtype=" << static_cast<int>(dt) << " batch=" << batch);
          check_gemv(p, batch, dt, 0, seed++);
        }
      }
    }
  }
}

TEST_CASE("glut GEMV: odd shapes, batch 1..9, strided x", "[cuda_emu][glut]") {
  const Cfg cfgs[] = {
      {37, 7, 1, 5},   {64, 5, 2, 64},   {100, 9, 3, 33},   {96, 4, 4, 32},  {129, 3, 5, 64},
      {45, 6, 6, 16},  {70, 2, 7, 70},   {50, 3, 8, 7},     {576, 11, 3, 576}, {200, 8, 4, 1000},
      {1, 3, 4, 1},    {33, 17, 3, 1},   {300, 20, 4, 96},  {65, 9, 8, 288},
  };
  unsigned seed = 1000;
  for (const Cfg& c : cfgs) {
    const GlutProblem p = make_glut(c.out, c.in, c.bits, c.g, seed++);
    for (DType dt : kTypes) {
      for (std::int64_t batch = 1; batch <= 9; ++batch) {
        INFO("in=" << c.in << " out=" << c.out << " bits=" << c.bits << " g=" << c.g
                   << " dtype=" << static_cast<int>(dt) << " batch=" << batch);
        check_gemv(p, batch, dt, batch == 3 ? 5 : 0, seed++);
      }
    }
  }
}

TEST_CASE("glut GEMV: several shared-memory tiles of x, wide scales, many rows", "[cuda_emu][glut]") {
  // batch 8 stages 1024 columns per tile: in = 2100 takes three tiles, the
  // groups of 288 straddle the tile boundaries; batch 1 stages 8192.
  const GlutProblem p = make_glut(9, 2100, 3, 288, 77);
  check_gemv(p, 8, DType::F32, 0, 78);
  check_gemv(p, 5, DType::F16, 3, 79);
  const GlutProblem q = make_glut(3, 9000, 2, 100, 80);
  check_gemv(q, 1, DType::BF16, 0, 81);
  check_gemv(q, 2, DType::F32, 0, 82);
  // scales down to fp16 subnormals; out spanning several blocks of 8 warps
  const GlutProblem r = make_glut(70, 75, 5, 20, 83, /*wide=*/true);
  for (DType dt : kTypes) check_gemv(r, 4, dt, 0, 84);
}

TEST_CASE("glut GEMV: an empty batch is a no-op", "[cuda_emu][glut]") {
  const GlutProblem p = make_glut(8, 16, 4, 8, 5);
  GlutMatmulArgs a;
  a.layer = p.view();
  a.batch = 0;
  a.dtype = DType::F32;
  const auto before = sqllm_emu::launches().size();
  sqllm::cuda::glut_matmul(a);  // null x/y allowed when nothing is computed
  CHECK(sqllm_emu::launches().size() == before);
}

TEST_CASE("glut dequantize: the same weights on CPU, emulated CUDA and the references", "[cuda_emu][glut]") {
  const Cfg cfgs[] = {
      {37, 7, 1, 5},  {64, 5, 2, 64},  {100, 9, 3, 33}, {96, 4, 4, 32}, {129, 3, 5, 64},
      {45, 6, 6, 16}, {70, 2, 7, 70},  {50, 3, 8, 7},   {600, 4, 3, 576}, {300, 3, 4, 1000},
      {1, 2, 8, 1},   {513, 2, 6, 128},
  };
  unsigned seed = 2000;
  for (const Cfg& c : cfgs) {
    INFO("in=" << c.in << " out=" << c.out << " bits=" << c.bits << " g=" << c.g);
    check_dequant(make_glut(c.out, c.in, c.bits, c.g, seed++));
    check_dequant(make_glut(c.out, c.in, c.bits, c.g, seed++, /*wide=*/true));
  }
}

TEST_CASE("glut kernels: corrupt tail bits are never read past", "[cuda_emu][glut]") {
  GlutProblem p = make_glut(5, 37, 3, 10, 300);  // 111 bits: 17 tail bits in word 3
  for (std::size_t o = 0; o < p.out; ++o) p.qweight[o * p.words + p.words - 1] |= 0xFFFF8000u;
  std::vector<float> x(37 * 9, 1.0f), y(5 * 9, 0.0f), w(5 * 37);
  GlutMatmulArgs a;
  a.layer = p.view();
  a.x = x.data();
  a.y = y.data();
  a.batch = 9;
  a.dtype = DType::F32;
  sqllm::cuda::glut_matmul(a);
  for (float v : y) CHECK(std::isfinite(v));
  GlutDequantizeArgs d;
  d.layer = p.view();
  d.w = w.data();
  d.dtype = DType::F32;
  sqllm::cuda::glut_dequantize(d);
  for (float v : w) CHECK(std::isfinite(v));
}

TEST_CASE("glut kernels: bad arguments raise sqllm::Error before any launch", "[cuda_emu][glut]") {
  const GlutProblem p = make_glut(7, 70, 4, 32, 9);
  std::vector<float> x(70 * 2), y(7 * 2), w(7 * 70);
  auto base = [&]() {
    GlutMatmulArgs a;
    a.layer = p.view();
    a.x = x.data();
    a.y = y.data();
    a.batch = 2;
    a.dtype = DType::F32;
    return a;
  };
  auto expect = [&](GlutMatmulArgs a, const char* what) {
    const auto before = sqllm_emu::launches().size();
    try {
      sqllm::cuda::glut_matmul(a);
      FAIL("no exception for " << what);
    } catch (const sqllm::Error& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(what) != std::string::npos);
    }
    CHECK(sqllm_emu::launches().size() == before);
  };
  GlutMatmulArgs a = base();
  a.layer.bits = 0;
  expect(a, "bits must be in 1..8, got 0");
  a = base();
  a.layer.bits = 9;
  expect(a, "bits must be in 1..8, got 9");
  a = base();
  a.layer.group_size = 0;
  expect(a, "group_size must be >= 1");
  a = base();
  a.layer.in = 0;
  expect(a, "must be non-empty");
  a = base();
  a.layer.out = 0;
  expect(a, "must be non-empty");
  a = base();
  a.layer.tables = nullptr;
  expect(a, "qweight, tables, scales and offsets are required");
  a = base();
  a.layer.offsets = nullptr;
  expect(a, "qweight, tables, scales and offsets are required");
  a = base();
  a.layer.in = std::size_t{1} << 31;
  expect(a, "in must be at most");
  a = base();
  a.batch = -1;
  expect(a, "batch must be in");
  a = base();
  a.batch = 65535LL * 8 + 1;
  expect(a, "batch must be in");
  a = base();
  a.x_stride = 60;
  expect(a, "x row stride 60 is smaller than in");
  a = base();
  a.y = nullptr;
  expect(a, "x and y must be device pointers");
  a = base();
  a.dtype = static_cast<DType>(7);
  expect(a, "unknown dtype");

  GlutDequantizeArgs d;
  d.layer = p.view();
  d.dtype = DType::F16;
  CHECK_THROWS_WITH(sqllm::cuda::glut_dequantize(d), Catch::Contains("w must be a device pointer"));
  d.w = w.data();
  d.layer.bits = 12;
  CHECK_THROWS_WITH(sqllm::cuda::glut_dequantize(d), Catch::Contains("bits must be in 1..8"));
  d.layer = p.view();
  d.dtype = static_cast<DType>(-1);
  CHECK_THROWS_WITH(sqllm::cuda::glut_dequantize(d), Catch::Contains("unknown dtype"));
}

TEST_CASE("glut kernels: launch failures raise RuntimeFailure naming the launch", "[cuda_emu][glut]") {
  const GlutProblem p = make_glut(8, 16, 4, 8, 11);
  std::vector<float> x(16), y(8), w(16 * 8);
  GlutMatmulArgs a;
  a.layer = p.view();
  a.x = x.data();
  a.y = y.data();
  a.batch = 1;
  a.dtype = DType::F32;
  sqllm_emu::fail_next_launch(cudaErrorLaunchOutOfResources);
  CHECK_THROWS_WITH(sqllm::cuda::glut_matmul(a), Catch::Contains("glut GEMV launch failed") &&
                                                     Catch::Contains("cudaErrorLaunchOutOfResources") &&
                                                     Catch::Contains("W[8, 16] bits=4 group_size=8"));
  GlutDequantizeArgs d;
  d.layer = p.view();
  d.w = w.data();
  d.dtype = DType::F32;
  sqllm_emu::fail_next_launch(cudaErrorLaunchFailure);
  CHECK_THROWS_AS(sqllm::cuda::glut_dequantize(d), sqllm::RuntimeFailure);
}
