// The CUDA VQ kernels (cuda/vq_matmul.cu, compiled as C++ against the host
// emulator cuda/emulation) through their host API sqllm_cuda_vq.h, against a
// float64 decode written here from the layout (plain loops over the slots, not
// the packed stream).  What is checked:
//   * the GEMV for fp16/bf16/fp32 activations, v = 2..16 (every accumulator
//     width), residual codebooks, groups with a short last group, outlier
//     columns with their own v_o and k_o, perm and norm on and off, batch tiles
//     1/2/4 with partial tiles, several shared-memory tiles of x, strided x,
//     out not a multiple of v -- against float64 within the bound of an fp32
//     sum in any order (see boundary below);
//   * every output written exactly once and nothing outside y written;
//   * the dequantizer against float64 within its two roundings + the output's;
//   * corrupt outlier indices / perm entries are skipped, never read past;
//   * bad arguments raise sqllm::Error naming the problem before any launch, and
//     launch failures raise sqllm::RuntimeFailure naming the launch.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sqllm/error.hpp"
#include "sqllm/half.hpp"
#include "sqllm_cuda.h"
#include "sqllm_cuda_vq.h"
#include "sqllm_emu.hpp"

using sqllm::cuda::DType;
using sqllm::cuda::VqDequantizeArgs;
using sqllm::cuda::VqMatmulArgs;
using sqllm::cuda::VqWeights;

namespace {

std::size_t esize(DType d) { return d == DType::F32 ? 4 : 2; }

float load_as_float(DType d, const unsigned char* p) {
  std::uint16_t h;
  if (d == DType::F32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
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

int ilog2(int k) {
  int b = 0;
  while ((1 << b) < k) ++b;
  return b;
}

struct Shape {
  std::int64_t in, out;
  int v, k, k_res, groups;
  std::int64_t outliers;
  int v_out, k_out;
  bool perm, norm, bias;
};

/// A random VQ weight: slots kept unpacked for the reference, packed LSB-first for the kernel.
struct VqProblem {
  Shape s;
  std::int64_t gs = 0, rows = 0, words = 0;
  std::vector<std::uint32_t> slots;  // [G, rows, gs] (0 past the last group's columns)
  std::vector<std::uint32_t> indices;
  std::vector<float> C, R, OC, scale, wbias, bias;
  std::vector<std::uint16_t> oidx;
  std::vector<std::int32_t> perm;

  VqWeights weights() const {
    VqWeights w;
    w.in = s.in;
    w.out = s.out;
    w.v = s.v;
    w.k = s.k;
    w.k_res = s.k_res;
    w.group_num = s.groups;
    w.group_size = gs;
    w.indices = indices.data();
    w.centroids = C.data();
    w.res_centroids = s.k_res ? R.data() : nullptr;
    w.outlier_size = s.outliers;
    w.v_out = s.v_out;
    w.k_out = s.k_out;
    w.outlier_indices = s.outliers ? oidx.data() : nullptr;
    w.outlier_centroids = s.outliers ? OC.data() : nullptr;
    w.perm = s.perm ? perm.data() : nullptr;
    w.weight_scale = s.norm ? scale.data() : nullptr;
    w.weight_bias = s.norm ? wbias.data() : nullptr;
    return w;
  }

  /// W'[o, j] (permuted position j, before norm) in float64, from the slots.
  double wprime(std::int64_t o, std::int64_t j) const {
    if (j < s.outliers) {
      const std::uint16_t id = oidx[static_cast<std::size_t>((o / s.v_out) * s.outliers + j)];
      if (id >= s.k_out) return 0.0;  // corrupt: the kernel skips it
      return OC[static_cast<std::size_t>(id * s.v_out + o % s.v_out)];
    }
    const std::int64_t jj = j - s.outliers, g = jj / gs, c = jj % gs, r = o / s.v, e = o % s.v;
    const std::uint32_t slot = slots[static_cast<std::size_t>((g * rows + r) * gs + c)];
    const int mb = ilog2(s.k);
    double val = C[static_cast<std::size_t>((g * s.k + (slot & ((1u << mb) - 1u))) * s.v + e)];
    if (s.k_res) val += R[static_cast<std::size_t>((g * s.k_res + (slot >> mb)) * s.v + e)];
    return val;
  }
  std::int64_t column(std::int64_t j) const { return s.perm ? perm[static_cast<std::size_t>(j)] : j; }
  double sc(std::int64_t c) const { return s.norm ? scale[static_cast<std::size_t>(c)] : 1.0; }
  double tb(std::int64_t c) const { return s.norm ? wbias[static_cast<std::size_t>(c)] : 0.0; }
};

VqProblem make_vq(const Shape& s, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  VqProblem p;
  p.s = s;
  const std::int64_t rest = s.in - s.outliers;
  p.gs = (rest + s.groups - 1) / s.groups;
  p.rows = (s.out + s.v - 1) / s.v;
  const int B = ilog2(s.k) + (s.k_res ? ilog2(s.k_res) : 0);
  p.words = (p.gs * B + 31) / 32;
  p.slots.assign(static_cast<std::size_t>(s.groups * p.rows * p.gs), 0u);
  p.indices.assign(static_cast<std::size_t>(s.groups * p.rows * p.words), 0u);
  std::uniform_int_distribution<std::uint32_t> mainc(0, static_cast<std::uint32_t>(s.k - 1));
  std::uniform_int_distribution<std::uint32_t> resc(0, static_cast<std::uint32_t>(std::max(s.k_res, 1) - 1));
  for (std::int64_t g = 0; g < s.groups; ++g) {
    const std::int64_t n = std::min(p.gs, rest - g * p.gs);
    for (std::int64_t r = 0; r < p.rows; ++r) {
      std::uint32_t* words = &p.indices[static_cast<std::size_t>((g * p.rows + r) * p.words)];
      for (std::int64_t c = 0; c < n; ++c) {
        std::uint32_t slot = mainc(rng);
        if (s.k_res) slot |= resc(rng) << ilog2(s.k);
        p.slots[static_cast<std::size_t>((g * p.rows + r) * p.gs + c)] = slot;
        for (int b = 0; b < B; ++b) {  // bit by bit: stream bit c*B + b
          if ((slot >> b) & 1u) {
            const std::int64_t bit = c * B + b;
            words[bit / 32] |= 1u << (bit % 32);
          }
        }
      }
    }
  }
  p.C.resize(static_cast<std::size_t>(s.groups) * s.k * s.v);
  for (auto& c : p.C) c = nd(rng);
  if (s.k_res) {
    p.R.resize(static_cast<std::size_t>(s.groups) * s.k_res * s.v);
    for (auto& c : p.R) c = 0.1f * nd(rng);
  }
  if (s.outliers) {
    const std::int64_t orow = (s.out + s.v_out - 1) / s.v_out;
    std::uniform_int_distribution<int> oc(0, s.k_out - 1);
    p.oidx.resize(static_cast<std::size_t>(orow * s.outliers));
    for (auto& i : p.oidx) i = static_cast<std::uint16_t>(oc(rng));
    p.OC.resize(static_cast<std::size_t>(s.k_out) * s.v_out);
    for (auto& c : p.OC) c = 3.0f * nd(rng);
  }
  if (s.perm) {
    p.perm.resize(static_cast<std::size_t>(s.in));
    std::iota(p.perm.begin(), p.perm.end(), 0);
    std::shuffle(p.perm.begin(), p.perm.end(), rng);
  }
  if (s.norm) {
    std::uniform_real_distribution<float> us(0.05f, 0.3f);
    p.scale.resize(static_cast<std::size_t>(s.in));
    p.wbias.resize(static_cast<std::size_t>(s.in));
    for (auto& c : p.scale) c = us(rng);
    for (auto& c : p.wbias) c = 0.05f * nd(rng);
  }
  if (s.bias) {
    p.bias.resize(static_cast<std::size_t>(s.out));
    for (auto& c : p.bias) c = nd(rng);
  }
  return p;
}

/// Runs the GEMV on random x and checks every output against float64.
void check_gemv(const VqProblem& p, std::int64_t batch, DType dt, std::int64_t extra_stride, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const std::int64_t in = p.s.in, out = p.s.out, stride = in + extra_stride;
  const std::size_t es = esize(dt);
  std::vector<unsigned char> x(static_cast<std::size_t>(std::max<std::int64_t>(batch, 1) * stride) * es);
  std::vector<double> xf(static_cast<std::size_t>(std::max<std::int64_t>(batch, 1) * stride));
  for (std::int64_t i = 0; i < batch * stride; ++i) {
    // The stride gap holds NaN, which must never be read.
    const float v = (i % stride) < in ? nd(rng) : std::numeric_limits<float>::quiet_NaN();
    store_float(dt, v, &x[static_cast<std::size_t>(i) * es]);
    xf[static_cast<std::size_t>(i)] = load_as_float(dt, &x[static_cast<std::size_t>(i) * es]);
  }
  // y with a guard band on both sides, filled with a sentinel pattern.
  const std::size_t ybytes = static_cast<std::size_t>(batch * out) * es, guard = 64;
  std::vector<unsigned char> ybuf(ybytes + 2 * guard, 0xA5);
  VqMatmulArgs a;
  a.w = p.weights();
  a.x = x.data();
  a.y = ybuf.data() + guard;
  a.bias = p.s.bias ? p.bias.data() : nullptr;
  a.batch = batch;
  a.x_stride = extra_stride ? stride : 0;
  a.dtype = dt;
  sqllm::cuda::vq_matmul(a);
  for (std::size_t i = 0; i < guard; ++i) {
    REQUIRE(ybuf[i] == 0xA5);
    REQUIRE(ybuf[guard + ybytes + i] == 0xA5);
  }
  const double gam = gamma_n(static_cast<double>(in) + 10.0);
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t o = 0; o < out; ++o) {
      double ref = 0.0, mag = 0.0;
      for (std::int64_t j = 0; j < in; ++j) {
        const std::int64_t c = p.column(j);
        const double xv = xf[static_cast<std::size_t>(b * stride + c)];
        const double t1 = xv * p.sc(c) * p.wprime(o, j), t2 = xv * p.tb(c);
        ref += t1 + t2;
        mag += std::fabs(t1) + std::fabs(t2);
      }
      if (p.s.bias) {
        ref += p.bias[static_cast<std::size_t>(o)];
        mag += std::fabs(p.bias[static_cast<std::size_t>(o)]);
      }
      const double got = load_as_float(dt, &ybuf[guard + static_cast<std::size_t>(b * out + o) * es]);
      const double bound = gam * mag + unit_out(dt) * (std::fabs(ref) + gam * mag) + abs_out(dt);
      INFO("b=" << b << " o=" << o << " ref=" << ref << " got=" << got << " bound=" << bound);
      REQUIRE(std::fabs(got - ref) <= bound);
    }
  }
}

void check_dequant(const VqProblem& p, DType dt) {
  const std::int64_t in = p.s.in, out = p.s.out;
  const std::size_t es = esize(dt);
  std::vector<unsigned char> w(static_cast<std::size_t>(in * out) * es, 0xA5);
  VqDequantizeArgs a;
  a.w = p.weights();
  a.out_w = w.data();
  a.dtype = dt;
  sqllm::cuda::vq_dequantize(a);
  const double u = std::ldexp(1.0, -24);
  for (std::int64_t o = 0; o < out; ++o) {
    for (std::int64_t j = 0; j < in; ++j) {
      const std::int64_t c = p.column(j);
      const double wp = p.wprime(o, j);
      const double ref = wp * p.sc(c) + p.tb(c);
      // fl(C + R), one fma, then the rounding to dtype.
      const double e32 = 3.0 * u * (std::fabs(wp) * p.sc(c) + std::fabs(p.tb(c)));
      const double bound = e32 + unit_out(dt) * (std::fabs(ref) + e32) + abs_out(dt);
      const double got = load_as_float(dt, &w[static_cast<std::size_t>(o * in + c) * es]);
      INFO("o=" << o << " col=" << c << " ref=" << ref << " got=" << got);
      REQUIRE(std::fabs(got - ref) <= bound);
    }
  }
}

const DType kTypes[] = {DType::F16, DType::BF16, DType::F32};

}  // namespace

TEST_CASE("VQ GEMV equals float64 within the fp32 bound: widths, codebooks, perm/norm, types", "[cuda_emu][vq]") {
  const Shape shapes[] = {
      // in, out, v, k, k_res, groups, outliers, v_out, k_out, perm, norm, bias
      {70, 37, 4, 16, 0, 1, 0, 0, 0, false, false, false},
      {70, 37, 4, 16, 4, 1, 0, 0, 0, true, true, true},
      {97, 30, 2, 8, 0, 2, 0, 0, 0, true, false, false},
      {65, 35, 7, 32, 8, 3, 5, 3, 6, true, true, true},  // v=7: the 8-wide accumulator
      {40, 33, 16, 64, 2, 1, 3, 2, 5, false, true, false},
      {130, 20, 12, 65536, 0, 1, 0, 0, 0, true, true, false},  // 16-bit slots
      {60, 24, 8, 65536, 65536, 1, 0, 0, 0, false, false, true},  // 32-bit slots
  };
  unsigned seed = 1;
  for (const Shape& s : shapes) {
    const VqProblem p = make_vq(s, seed++);
    for (DType dt : kTypes) {
      for (std::int64_t batch : {1, 2, 3, 5}) {
        INFO("in=" << s.in << " out=" << s.out << " v=" << s.v << " k=" << s.k << " k_res=" << s.k_res
                   << " dtype=" << static_cast<int>(dt) << " batch=" << batch);
        check_gemv(p, batch, dt, batch == 3 ? 5 : 0, seed++);
      }
    }
  }
}

TEST_CASE("VQ GEMV: several shared-memory tiles of x and many vector rows", "[cuda_emu][vq]") {
  // batch 4 stages 2048 positions per tile: in = 4200 takes three tiles; the outliers
  // straddle nothing, the groups straddle tile boundaries.
  const VqProblem p = make_vq({4200, 19, 6, 256, 4, 3, 7, 4, 9, true, true, true}, 77);
  check_gemv(p, 4, DType::F32, 0, 78);
  check_gemv(p, 1, DType::F16, 3, 79);
  // out spanning several blocks of 8 warps
  const VqProblem q = make_vq({50, 150, 2, 4, 0, 1, 0, 0, 0, true, true, true}, 80);
  check_gemv(q, 2, DType::BF16, 0, 81);
}

TEST_CASE("VQ GEMV: an empty batch is a no-op", "[cuda_emu][vq]") {
  const VqProblem p = make_vq({16, 8, 4, 4, 0, 1, 0, 0, 0, false, false, false}, 5);
  VqMatmulArgs a;
  a.w = p.weights();
  a.batch = 0;
  a.dtype = DType::F32;
  const auto before = sqllm_emu::launches().size();
  sqllm::cuda::vq_matmul(a);  // null x/y allowed when nothing is computed
  CHECK(sqllm_emu::launches().size() == before);
}

TEST_CASE("VQ dequantize equals float64 up to its roundings", "[cuda_emu][vq]") {
  const Shape shapes[] = {
      {70, 37, 4, 16, 4, 1, 0, 0, 0, true, true, true},
      {65, 35, 7, 32, 8, 3, 5, 3, 6, true, true, false},
      {300, 9, 3, 8, 0, 2, 0, 0, 0, false, false, false},
  };
  unsigned seed = 100;
  for (const Shape& s : shapes) {
    const VqProblem p = make_vq(s, seed++);
    for (DType dt : kTypes) check_dequant(p, dt);
  }
}

TEST_CASE("VQ kernels skip corrupt outlier indices and perm entries (no out-of-bounds reads)", "[cuda_emu][vq]") {
  VqProblem p = make_vq({33, 12, 4, 16, 0, 1, 4, 2, 5, true, false, false}, 200);
  p.oidx[3] = 9;        // >= k_out = 5: treated as weight 0 by the reference too
  p.oidx[7] = 0xFFFF;
  check_gemv(p, 2, DType::F32, 0, 201);
  check_dequant(p, DType::F32);
  VqProblem q = make_vq({20, 8, 4, 16, 0, 1, 0, 0, 0, true, false, false}, 202);
  q.perm[5] = 1000;  // outside [0, in): position skipped
  std::vector<float> x(20, 1.0f), y(8, 0.0f);
  VqMatmulArgs a;
  a.w = q.weights();
  a.x = x.data();
  a.y = y.data();
  a.batch = 1;
  a.dtype = DType::F32;
  sqllm::cuda::vq_matmul(a);
  for (float v : y) CHECK(std::isfinite(v));
}

TEST_CASE("VQ kernels: bad arguments raise sqllm::Error before any launch", "[cuda_emu][vq]") {
  const VqProblem p = make_vq({70, 37, 4, 16, 4, 1, 0, 0, 0, true, true, true}, 9);
  std::vector<float> x(70 * 2), y(37 * 2);
  auto base = [&]() {
    VqMatmulArgs a;
    a.w = p.weights();
    a.x = x.data();
    a.y = y.data();
    a.batch = 2;
    a.dtype = DType::F32;
    return a;
  };
  auto expect = [&](VqMatmulArgs a, const char* what) {
    const auto before = sqllm_emu::launches().size();
    try {
      sqllm::cuda::vq_matmul(a);
      FAIL("no exception for " << what);
    } catch (const sqllm::Error& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(what) != std::string::npos);
    }
    CHECK(sqllm_emu::launches().size() == before);
  };
  VqMatmulArgs a = base();
  a.w.v = 1;
  expect(a, "v must be in 2..16");
  a = base();
  a.w.v = 17;
  expect(a, "v must be in 2..16");
  a = base();
  a.w.k = 1000;
  expect(a, "k must be a power of two");
  a = base();
  a.w.k_res = 3;
  expect(a, "k_res must be 0 or a power of two");
  a = base();
  a.w.group_num = 3;
  a.w.group_size = 10;
  expect(a, "do not cover");
  a = base();
  a.w.indices = nullptr;
  expect(a, "indices and centroids must be device pointers");
  a = base();
  a.w.res_centroids = nullptr;
  expect(a, "k_res > 0 needs res_centroids");
  a = base();
  a.w.weight_bias = nullptr;
  expect(a, "weight_scale and weight_bias go together");
  a = base();
  a.w.outlier_size = 3;
  expect(a, "outliers need");
  a = base();
  a.w.outlier_size = 70;
  expect(a, "outlier_size must be in 0..in-1");
  a = base();
  a.w.in = 0;
  expect(a, "in and out must be in");
  a = base();
  a.batch = -1;
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

  VqDequantizeArgs d;
  d.w = p.weights();
  d.dtype = DType::F16;
  CHECK_THROWS_WITH(sqllm::cuda::vq_dequantize(d), Catch::Contains("out_w must be a device pointer"));
  std::vector<std::uint16_t> wbuf(70 * 37);
  d.out_w = wbuf.data();
  d.w.k = 6;
  CHECK_THROWS_WITH(sqllm::cuda::vq_dequantize(d), Catch::Contains("k must be a power of two"));
}

TEST_CASE("VQ kernels: launch failures raise RuntimeFailure naming the launch", "[cuda_emu][vq]") {
  const VqProblem p = make_vq({16, 8, 4, 4, 0, 1, 0, 0, 0, false, false, false}, 11);
  std::vector<float> x(16), y(8), w(16 * 8);
  VqMatmulArgs a;
  a.w = p.weights();
  a.x = x.data();
  a.y = y.data();
  a.batch = 1;
  a.dtype = DType::F32;
  sqllm_emu::fail_next_launch(cudaErrorLaunchOutOfResources);
  CHECK_THROWS_WITH(sqllm::cuda::vq_matmul(a), Catch::Contains("VQ GEMV launch failed") &&
                                                   Catch::Contains("cudaErrorLaunchOutOfResources"));
  VqDequantizeArgs d;
  d.w = p.weights();
  d.out_w = w.data();
  d.dtype = DType::F32;
  sqllm_emu::fail_next_launch(cudaErrorLaunchFailure);
  CHECK_THROWS_AS(sqllm::cuda::vq_dequantize(d), sqllm::RuntimeFailure);
}
