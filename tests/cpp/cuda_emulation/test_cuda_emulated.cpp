// The CUDA LUT kernels (cuda/*.cu, compiled as C++ against the host emulator
// cuda/emulation) through their host API sqllm_cuda.h, against the CPU
// references -- so that the kernels' logic is tested on every CI run even
// though CI has no GPU.  What is checked:
//   * the fast GEMV (bits 2/3/4, fp16/bf16/fp32 activations, row and column
//     grouping, every batch tile, odd shapes, tails, the CSR part, strided x)
//     against float64 within the fp32 dot-product bound of its summation order;
//   * the exact kernel bit for bit against reference::lut_matmul_precision in
//     every precision mode and width 1..8;
//   * the dequantizer exactly;
//   * every output written once, nothing outside y written (AddressSanitizer
//     builds also catch any out-of-bounds read);
//   * launch errors surface as sqllm::RuntimeFailure naming the launch;
//   * the emulator itself: barriers and shuffles mean what they mean in CUDA,
//     and divergent barriers are reported.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "lut_kernels.cuh"
#include "sqllm/error.hpp"
#include "sqllm/half.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/reference/lut_matmul_precision.hpp"
#include "sqllm_cuda.h"

using sqllm::cuda::DType;
using sqllm::cuda::Kernel;
using sqllm::cuda::LutMatmulArgs;

namespace {

// ---------------------------------------------------------------------------
// Activations stored as fp16 / bf16 / fp32 bits, converted with the same
// round-to-nearest-even the device uses.
// ---------------------------------------------------------------------------
std::size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

float to_float(DType d, const unsigned char* p) {
  std::uint16_t h;
  switch (d) {
    case DType::F16:
      std::memcpy(&h, p, 2);
      return sqllm::half_bits_to_float(h);
    case DType::BF16: {
      std::memcpy(&h, p, 2);
      const std::uint32_t u = static_cast<std::uint32_t>(h) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
    case DType::F32:
    default: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
  }
}

void from_float(DType d, float f, unsigned char* p) {
  switch (d) {
    case DType::F16: {
      const std::uint16_t h = __float2half_rn(f).bits;
      std::memcpy(p, &h, 2);
      return;
    }
    case DType::BF16: {
      const std::uint16_t h = __float2bfloat16_rn(f).bits;
      std::memcpy(p, &h, 2);
      return;
    }
    case DType::F32:
    default:
      std::memcpy(p, &f, 4);
  }
}

/// Unit roundoff of the output type, and half its smallest subnormal.
double u_out(DType d) { return d == DType::F16 ? std::ldexp(1.0, -11) : d == DType::BF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -24); }
double u_abs(DType d) {
  return d == DType::F16 ? std::ldexp(1.0, -25) : d == DType::BF16 ? std::ldexp(1.0, -134) : std::ldexp(1.0, -150);
}
const char* dtype_name(DType d) { return d == DType::F16 ? "fp16" : d == DType::BF16 ? "bf16" : "fp32"; }

// ---------------------------------------------------------------------------
// A random problem.
// ---------------------------------------------------------------------------
struct Problem {
  std::int64_t batch, in, out, x_stride;
  int bits;
  bool col;
  DType dtype;
  std::vector<std::uint32_t> codes;
  std::vector<float> tables;
  std::vector<unsigned char> x;  // batch rows of x_stride elements of dtype
  std::vector<float> xf;         // the same values as floats
  std::vector<std::int32_t> row_ptr, col_idx;
  std::vector<std::uint16_t> values;  // fp16 bits
  std::vector<float> valuesf;

  bool sparse() const { return !row_ptr.empty(); }

  /// The layer (host pointers): taken by the references and, as device
  /// memory in the emulator, by the launchers.
  sqllm::LutView layer() const {
    sqllm::LutView v;
    v.in = static_cast<std::size_t>(in);
    v.out = static_cast<std::size_t>(out);
    v.bits = bits;
    v.codes = codes.data();
    v.tables = tables.data();
    v.axis = col ? sqllm::GroupAxis::Column : sqllm::GroupAxis::Row;
    if (sparse()) v.sparse = sqllm::CsrView{row_ptr.data(), col_idx.data(), values.data(), values.size()};
    return v;
  }

  sqllm::reference::LutMatmulView view() const {
    sqllm::reference::LutMatmulView v;
    v.w = layer();
    v.x = xf.data();
    v.batch = batch;
    v.x_stride = x_stride;
    return v;
  }

  LutMatmulArgs args(void* y) const {
    LutMatmulArgs a;
    a.layer = layer();
    a.x = x.data();
    a.y = y;
    a.batch = batch;
    a.x_stride = x_stride;
    a.dtype = dtype;
    return a;
  }
};

/// Values in +-[0.5, 2) with a random sign: fp16 operands and products stay
/// normal, so the precision modes are exercised without under/overflow.
float normalish(std::mt19937& rng) {
  std::uniform_real_distribution<float> mag(0.5f, 2.0f);
  std::bernoulli_distribution neg(0.5);
  const float v = mag(rng);
  return neg(rng) ? -v : v;
}

Problem make_problem(std::int64_t batch, std::int64_t in, std::int64_t out, int bits, bool col, DType dtype,
                     bool sparse, unsigned seed, std::int64_t extra_stride = 0) {
  std::mt19937 rng(seed);
  Problem p{batch, in, out, in + extra_stride, bits, col, dtype, {}, {}, {}, {}, {}, {}, {}, {}};
  const std::int64_t K = std::int64_t{1} << bits;
  const std::size_t W = sqllm::packed_words(static_cast<std::size_t>(in), bits);
  // Codes: random, with the padding bits of each row's last word set to ones
  // (a kernel that decodes padding positions would read those).
  std::vector<std::uint8_t> c(static_cast<std::size_t>(out * in));
  std::uniform_int_distribution<int> code(0, static_cast<int>(K) - 1);
  for (auto& v : c) v = static_cast<std::uint8_t>(code(rng));
  p.codes.assign(static_cast<std::size_t>(out) * W, 0u);
  sqllm::pack_codes(c.data(), static_cast<std::size_t>(out), static_cast<std::size_t>(in), bits, p.codes.data());
  const std::size_t used = static_cast<std::size_t>(in) * static_cast<std::size_t>(bits);
  if (used % 32 != 0) {
    const std::uint32_t pad = ~((std::uint32_t{1} << (used % 32)) - 1u);
    for (std::int64_t o = 0; o < out; ++o) p.codes[static_cast<std::size_t>(o) * W + W - 1] |= pad;
  }
  p.tables.resize(static_cast<std::size_t>((col ? in : out) * K));
  for (auto& t : p.tables) t = normalish(rng);
  const std::size_t es = dtype_size(dtype);
  p.x.assign(static_cast<std::size_t>(batch * p.x_stride) * es, 0);
  p.xf.assign(static_cast<std::size_t>(batch * p.x_stride), 0.0f);
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t i = 0; i < p.x_stride; ++i) {
      // Past `in` (the stride gap): NaN, which must never be read.
      const float v = i < in ? normalish(rng) : std::numeric_limits<float>::quiet_NaN();
      const std::size_t k = static_cast<std::size_t>(b * p.x_stride + i);
      from_float(dtype, v, &p.x[k * es]);
      p.xf[k] = to_float(dtype, &p.x[k * es]);
    }
  }
  if (sparse) {
    // Rows with 0..40 entries (some beyond a warp's 32 lanes), sorted columns,
    // a few rows empty.
    std::uniform_int_distribution<int> count(0, 40);
    std::uniform_int_distribution<std::int64_t> column(0, in - 1);
    p.row_ptr.push_back(0);
    for (std::int64_t o = 0; o < out; ++o) {
      const int n = o % 5 == 3 ? 0 : count(rng);
      std::vector<std::int32_t> cols;
      for (int k = 0; k < n; ++k) cols.push_back(static_cast<std::int32_t>(column(rng)));
      std::sort(cols.begin(), cols.end());
      cols.erase(std::unique(cols.begin(), cols.end()), cols.end());
      for (std::int32_t cc : cols) {
        p.col_idx.push_back(cc);
        const std::uint16_t h = sqllm::float_to_half_bits(normalish(rng));
        p.values.push_back(h);
        p.valuesf.push_back(sqllm::half_bits_to_float(h));
      }
      p.row_ptr.push_back(static_cast<std::int32_t>(p.col_idx.size()));
    }
  }
  return p;
}

/// y buffer of batch*out elements of dtype, pre-filled with a NaN sentinel.
std::vector<unsigned char> sentinel_y(const Problem& p) {
  std::vector<unsigned char> y(static_cast<std::size_t>(p.batch * p.out) * dtype_size(p.dtype));
  for (std::size_t k = 0; k < y.size() / dtype_size(p.dtype); ++k) {
    from_float(p.dtype, std::numeric_limits<float>::quiet_NaN(), &y[k * dtype_size(p.dtype)]);
  }
  return y;
}

bool launched_fast_kernel(std::size_t since) {
  const auto& l = sqllm_emu::launches();
  bool any = false;
  for (std::size_t k = since; k < l.size(); ++k) {
    if (l[k].smem == 0) return false;  // the exact kernel uses no dynamic shared memory
    any = true;
  }
  return any;
}

const char* kernel_name(Kernel k) {
  return k == Kernel::Warp ? "warp" : k == Kernel::Tiled ? "tiled" : "auto";
}

/// One fast kernel (Auto, Tiled or Warp) against float64 within the bound of
/// their common summation order.
void check_fast_kernel(const Problem& p, Kernel kernel) {
  INFO("batch=" << p.batch << " in=" << p.in << " out=" << p.out << " stride=" << p.x_stride << " bits=" << p.bits
                << (p.col ? " column" : " row") << " " << dtype_name(p.dtype) << (p.sparse() ? " sparse" : "")
                << " kernel=" << kernel_name(kernel));
  auto y = sentinel_y(p);
  const std::size_t before = sqllm_emu::launches().size();
  LutMatmulArgs a = p.args(y.data());
  a.kernel = kernel;
  sqllm::cuda::lut_matmul(a);
  REQUIRE(launched_fast_kernel(before));
  if (kernel == Kernel::Auto) {  // Auto takes the warp kernel exactly where it applies, up to 4 rows
    const bool warp = sqllm::cuda::warp_kernel_applies(a) && p.batch <= sqllm::cuda::kWarpAutoMaxBatch;
    for (std::size_t k = before; k < sqllm_emu::launches().size(); ++k) {
      CHECK((sqllm_emu::launches()[k].block.x == 32) == warp);
    }
  }
  const auto v = p.view();
  std::vector<double> ref(static_cast<std::size_t>(p.batch * p.out)), absref(ref.size());
  sqllm::reference::lut_matmul_f64(v, ref.data());
  sqllm::reference::lut_matmul_f64(v, absref.data(), /*absolute=*/true);
  // Lane l sums its 32-column chunks l, l+32, ... with one FMA per column
  // (at most 32 * ceil(chunks / 32) roundings), then its share of the CSR row
  // (ceil(nnz_row / 32)), then 5 butterfly additions; then one rounding to
  // the output type.
  const std::int64_t chunks = (p.in + 31) / 32;
  const double u32 = std::ldexp(1.0, -24);
  const double uo = u_out(p.dtype), ua = u_abs(p.dtype);
  int bad = 0;
  for (std::int64_t o = 0; o < p.out; ++o) {
    const std::int64_t nnz_row = p.sparse() ? p.row_ptr[static_cast<std::size_t>(o + 1)] - p.row_ptr[static_cast<std::size_t>(o)] : 0;
    const double n = static_cast<double>(32 * ((chunks + 31) / 32) + (nnz_row + 31) / 32 + 5);
    const double gamma = n * u32 / (1 - n * u32);
    for (std::int64_t b = 0; b < p.batch; ++b) {
      const std::size_t k = static_cast<std::size_t>(b * p.out + o);
      const double got = to_float(p.dtype, &y[k * dtype_size(p.dtype)]);
      const double tol = uo * std::fabs(ref[k]) + (1 + uo) * gamma * absref[k] + ua;
      if (!(std::fabs(got - ref[k]) <= tol)) {
        if (++bad <= 5) {
          UNSCOPED_INFO("y[" << b << ", " << o << "] = " << got << ", float64 " << ref[k] << ", bound " << tol);
        }
      }
    }
  }
  CHECK(bad == 0);
}

/// Every fast kernel that applies: Auto, the tiled one, and the warp one
/// where its conditions hold (and a clear error where they do not).
void check_fast(const Problem& p) {
  check_fast_kernel(p, Kernel::Auto);
  check_fast_kernel(p, Kernel::Tiled);
  auto y = sentinel_y(p);
  LutMatmulArgs a = p.args(y.data());
  a.kernel = Kernel::Warp;
  if (sqllm::cuda::warp_kernel_applies(a)) {
    check_fast_kernel(p, Kernel::Warp);
  } else if (p.batch > 0) {
    CHECK_THROWS_WITH(sqllm::cuda::lut_matmul(a), Catch::Contains("warp kernel needs row grouping"));
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// The emulator itself.
// ---------------------------------------------------------------------------
namespace emu_selftest {

__global__ void butterfly_kernel(const float* in, float* out) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  float v = in[t];
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[t] = v;
}

__global__ void reverse_kernel(const int* in, int* out) {
  SQLLM_DYNAMIC_SHARED(int, buf);
  const int n = static_cast<int>(blockDim.x);
  const int t = static_cast<int>(threadIdx.x);
  buf[t] = in[blockIdx.x * n + t];
  __syncthreads();
  out[blockIdx.x * n + t] = buf[n - 1 - t];
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

}  // namespace emu_selftest

TEST_CASE("emulator: shuffles, shared memory and barriers mean what they mean in CUDA", "[cuda_emu]") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> d(-1000, 1000);
  std::vector<float> in(3 * 64), out(in.size(), -1.0f);
  for (auto& v : in) v = static_cast<float>(d(rng));
  auto k1 = emu_selftest::butterfly_kernel;
  SQLLM_KERNEL_LAUNCH(k1, 3, 64, 0, nullptr, in.data(), out.data());
  REQUIRE(cudaGetLastError() == cudaSuccess);
  for (std::size_t w = 0; w < in.size() / 32; ++w) {
    float s = 0.0f;  // small integers: exact in any order
    for (std::size_t l = 0; l < 32; ++l) s += in[w * 32 + l];
    for (std::size_t l = 0; l < 32; ++l) CHECK(out[w * 32 + l] == s);
  }

  std::vector<int> a(5 * 96), r(a.size(), 0);
  for (auto& v : a) v = d(rng);
  auto k2 = emu_selftest::reverse_kernel;
  SQLLM_KERNEL_LAUNCH(k2, 5, 96, 96 * sizeof(int), nullptr, a.data(), r.data());
  REQUIRE(cudaGetLastError() == cudaSuccess);
  for (std::size_t blk = 0; blk < 5; ++blk) {
    for (std::size_t t = 0; t < 96; ++t) CHECK(r[blk * 96 + t] == a[blk * 96 + 95 - t]);
  }
}

TEST_CASE("emulator: divergent barriers and bad configurations are launch errors", "[cuda_emu]") {
  std::vector<int> out(64, 0);
  auto k = emu_selftest::divergent_barrier_kernel;
  SQLLM_KERNEL_LAUNCH(k, 1, 64, 0, nullptr, out.data());
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  CHECK(sqllm_emu::last_message().find("barrier divergence") != std::string::npos);
  CHECK(cudaGetLastError() == cudaSuccess);  // non-sticky here

  std::vector<int> a(64), r(64);
  auto k2 = emu_selftest::reverse_kernel;
  SQLLM_KERNEL_LAUNCH(k2, 1, 2048, 0, nullptr, a.data(), r.data());
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  SQLLM_KERNEL_LAUNCH(k2, 1, 64, 64 * 1024, nullptr, a.data(), r.data());  // > 48 KiB without opt-in
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
}

// ---------------------------------------------------------------------------
// The fast kernel.
// ---------------------------------------------------------------------------
TEST_CASE("fast kernel equals float64 within the fp32 bound: every width, type, grouping, tile", "[cuda_emu]") {
  unsigned seed = 1;
  for (int bits : {2, 3, 4}) {
    for (DType dt : {DType::F16, DType::BF16, DType::F32}) {
      for (bool col : {false, true}) {
        for (std::int64_t batch : {1, 2, 3, 4, 7, 8, 13, 16}) {
          // Odd in (partial chunk and partial tile), out not a multiple of a
          // block's rows; sparse on every other case.
          check_fast(make_problem(batch, 1000 + 7 * bits, 37, bits, col, dt, batch % 2 == 1, seed++));
        }
      }
    }
  }
}

TEST_CASE("warp kernel equals float64 within the same bound: every width, type, batch tile", "[cuda_emu]") {
  unsigned seed = 500;
  for (int bits : {2, 3, 4}) {
    for (DType dt : {DType::F16, DType::BF16, DType::F32}) {
      for (std::int64_t batch : {1, 2, 3, 4, 5, 8, 9, 16}) {
        // in: one chunk per lane and a partial last step (1056 = 33 chunks);
        // out odd (a half-filled last block of rows); sparse on odd batches.
        const std::int64_t in = batch % 3 == 0 ? 1056 : 96;
        check_fast(make_problem(batch, in, 37, bits, false, dt, batch % 2 == 1, seed++));
      }
    }
  }
}

TEST_CASE("fast kernel: shapes at and around chunk, step and tile boundaries", "[cuda_emu]") {
  unsigned seed = 100;
  for (std::int64_t in : {1, 31, 32, 33, 1023, 1024, 1025, 2048 + 65, 4096}) {
    for (std::int64_t out : {1, 16, 17}) {
      for (int bits : {2, 3, 4}) {
        check_fast(make_problem(in % 3 + 1, in, out, bits, in % 2 == 1, DType::F16, true, seed++));
      }
    }
  }
  // More columns than one shared-memory tile holds: several tiles.
  for (bool col : {false, true}) {
    const int K = 16;
    const int tk = sqllm::cuda::detail::fast_tile_columns(40000, 16, col, K);
    INFO("tile columns " << tk);
    REQUIRE(tk < 40000);
    check_fast(make_problem(16, 40000 - 3, 9, 4, col, DType::BF16, true, seed++));
    check_fast(make_problem(1, 3 * tk + 5, 9, 3, col, DType::F16, false, seed++));
  }
}

TEST_CASE("fast kernel: strided x, batches above 16 and an empty batch", "[cuda_emu]") {
  check_fast(make_problem(5, 300, 20, 3, false, DType::F16, true, 200, /*extra_stride=*/13));
  check_fast(make_problem(16, 300, 20, 4, true, DType::BF16, false, 201, /*extra_stride=*/1));
  // 37 rows = tiles of 16 + 16 + 5 (the last launched with tile 8).
  const std::size_t before = sqllm_emu::launches().size();
  check_fast_kernel(make_problem(37, 513, 33, 2, false, DType::F16, true, 202, 3), Kernel::Auto);
  CHECK(sqllm_emu::launches().size() - before == 3);
  // The warp kernel takes batch tiles of 8: 37 rows = 8 + 8 + 8 + 8 + 5.
  const std::size_t before_w = sqllm_emu::launches().size();
  check_fast_kernel(make_problem(37, 512, 33, 3, false, DType::BF16, true, 204, 8), Kernel::Warp);
  CHECK(sqllm_emu::launches().size() - before_w == 5);
  check_fast(make_problem(13, 1024, 20, 4, false, DType::F16, true, 205, 8));
  check_fast(make_problem(9, 2048, 7, 2, false, DType::F32, false, 206, 4));
  Problem p = make_problem(1, 64, 8, 3, false, DType::F16, false, 203);
  p.batch = 0;
  const std::size_t n0 = sqllm_emu::launches().size();
  sqllm::cuda::lut_matmul(p.args(nullptr));
  CHECK(sqllm_emu::launches().size() == n0);
}

TEST_CASE("fast kernel: infinities and NaN in x propagate like the float64 sum", "[cuda_emu]") {
  Problem p = make_problem(2, 100, 6, 3, false, DType::F16, false, 300);
  from_float(p.dtype, std::numeric_limits<float>::infinity(), &p.x[17 * 2]);  // row 0, column 17
  from_float(p.dtype, std::numeric_limits<float>::quiet_NaN(), &p.x[(100 + 5) * 2]);  // row 1, column 5
  auto y = sentinel_y(p);
  sqllm::cuda::lut_matmul(p.args(y.data()));
  for (std::int64_t o = 0; o < p.out; ++o) {
    CHECK(std::isinf(to_float(p.dtype, &y[static_cast<std::size_t>(o) * 2])));
    CHECK(std::isnan(to_float(p.dtype, &y[static_cast<std::size_t>(p.out + o) * 2])));
  }
}

// ---------------------------------------------------------------------------
// The exact kernel: bit for bit the CPU reference, every precision mode.
// ---------------------------------------------------------------------------
TEST_CASE("exact kernel equals reference::lut_matmul_precision bit for bit", "[cuda_emu]") {
  std::vector<sqllm::PrecisionConfig> modes(5);
  modes[0].mode = sqllm::Precision::FP32;
  modes[1].mode = sqllm::Precision::FP16;
  modes[2] = {sqllm::Precision::Emulated, 5, 10, 8, 23};
  modes[3] = {sqllm::Precision::Emulated, 4, 3, 5, 10};
  modes[4] = {sqllm::Precision::Emulated, 8, 7, 8, 7};
  unsigned seed = 400;
  for (const auto& mode : modes) {
    for (int bits = 1; bits <= 8; ++bits) {
      for (DType dt : {DType::F16, DType::BF16, DType::F32}) {
        const bool col = (bits + static_cast<int>(dt)) % 2 == 0;
        Problem p = make_problem(bits % 3 + 1, 70 + 13 * bits, 11, bits, col, dt, bits % 2 == 0, seed++, bits % 2);
        INFO("mode " << sqllm::precision_name(mode.mode) << " " << mode.mul_exp << "/" << mode.mul_man << "/"
                     << mode.acc_exp << "/" << mode.acc_man << " bits=" << bits << " " << dtype_name(dt)
                     << (col ? " column" : " row"));
        auto y = sentinel_y(p);
        LutMatmulArgs a = p.args(y.data());
        a.precision = mode;
        a.kernel = Kernel::Exact;
        const std::size_t before = sqllm_emu::launches().size();
        sqllm::cuda::lut_matmul(a);
        REQUIRE(sqllm_emu::launches().size() == before + 1);
        CHECK(sqllm_emu::launches().back().smem == 0);
        std::vector<float> ref(static_cast<std::size_t>(p.batch * p.out));
        sqllm::reference::lut_matmul_precision(p.view(), mode, ref.data());
        int bad = 0;
        for (std::size_t k = 0; k < ref.size(); ++k) {
          std::vector<unsigned char> want(dtype_size(dt));
          from_float(dt, ref[k], want.data());
          if (std::memcmp(want.data(), &y[k * dtype_size(dt)], dtype_size(dt)) != 0) ++bad;
        }
        CHECK(bad == 0);
      }
    }
  }
}

TEST_CASE("Kernel::Auto takes the exact kernel where the fast one does not apply", "[cuda_emu]") {
  for (int bits : {1, 5, 8}) {
    Problem p = make_problem(3, 200, 10, bits, false, DType::F16, true, 500 + static_cast<unsigned>(bits));
    auto y = sentinel_y(p);
    sqllm::cuda::lut_matmul(p.args(y.data()));
    CHECK(sqllm_emu::launches().back().smem == 0);
    std::vector<float> ref(static_cast<std::size_t>(p.batch * p.out));
    sqllm::reference::lut_matmul_precision(p.view(), sqllm::PrecisionConfig{}, ref.data());
    for (std::size_t k = 0; k < ref.size(); ++k) {
      CHECK(to_float(p.dtype, &y[k * 2]) == sqllm::half_bits_to_float(sqllm::float_to_half_bits(ref[k])));
    }
  }
}

// ---------------------------------------------------------------------------
// Dequantize.
// ---------------------------------------------------------------------------
TEST_CASE("dequantize equals the table values (plus the sparse part) rounded once", "[cuda_emu]") {
  unsigned seed = 600;
  for (int bits : {1, 2, 3, 4, 6, 8}) {
    for (DType dt : {DType::F16, DType::BF16, DType::F32}) {
      for (bool col : {false, true}) {
        for (std::int64_t in : {1, 8, 61, 128}) {
          Problem p = make_problem(1, in, 7, bits, col, dt, in > 1, seed++);
          const auto v = p.view();
          const std::size_t es = dtype_size(dt);
          std::vector<unsigned char> w(static_cast<std::size_t>(p.out * p.in) * es + 16);
          // The 16-byte-store path needs a 16-byte aligned destination; the
          // scalar path is taken for odd `in` or a misaligned one.
          unsigned char* dst = w.data();
          sqllm::cuda::DequantizeArgs a;
          a.layer = p.layer();
          a.w = dst;
          a.dtype = dt;
          sqllm::cuda::dequantize(a);
          INFO("bits=" << bits << " " << dtype_name(dt) << (col ? " column" : " row") << " in=" << in);
          int bad = 0;
          for (std::int64_t o = 0; o < p.out; ++o) {
            for (std::int64_t i = 0; i < p.in; ++i) {
              float want = sqllm::reference::lut_weight(v, o, i);
              if (p.sparse()) {
                for (std::int32_t k = p.row_ptr[static_cast<std::size_t>(o)]; k < p.row_ptr[static_cast<std::size_t>(o + 1)]; ++k) {
                  if (p.col_idx[static_cast<std::size_t>(k)] == i) want += p.valuesf[static_cast<std::size_t>(k)];
                }
              }
              std::vector<unsigned char> wb(es);
              from_float(dt, want, wb.data());
              if (std::memcmp(wb.data(), dst + static_cast<std::size_t>(o * p.in + i) * es, es) != 0) ++bad;
            }
          }
          CHECK(bad == 0);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------
TEST_CASE("launch failures raise RuntimeFailure naming the launch and the problem", "[cuda_emu]") {
  Problem p = make_problem(2, 64, 8, 3, false, DType::F16, false, 700);
  auto y = sentinel_y(p);
  for (Kernel k : {Kernel::Tiled, Kernel::Auto}) {  // Auto takes the warp kernel here (2 rows)
    LutMatmulArgs a = p.args(y.data());
    a.kernel = k;
    sqllm_emu::fail_next_launch(cudaErrorLaunchOutOfResources);
    try {
      sqllm::cuda::lut_matmul(a);
      FAIL("no exception");
    } catch (const sqllm::RuntimeFailure& e) {
      const std::string m = e.what();
      CHECK(m.find(k == Kernel::Tiled ? "fast LUT GEMV launch failed" : "warp LUT GEMV launch failed") !=
            std::string::npos);
      CHECK(m.find("cudaErrorLaunchOutOfResources") != std::string::npos);
      CHECK(m.find("bits=3") != std::string::npos);
    }
  }
  LutMatmulArgs a = p.args(y.data());
  a.kernel = Kernel::Exact;
  sqllm_emu::fail_next_launch(cudaErrorLaunchFailure);
  CHECK_THROWS_AS(sqllm::cuda::lut_matmul(a), sqllm::RuntimeFailure);
  // The next call works again.
  sqllm::cuda::lut_matmul(p.args(y.data()));
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("bad arguments raise sqllm::Error before any launch", "[cuda_emu]") {
  Problem p = make_problem(2, 64, 8, 3, false, DType::F16, false, 800);
  auto y = sentinel_y(p);
  const std::size_t n0 = sqllm_emu::launches().size();
  LutMatmulArgs a = p.args(y.data());
  a.layer.bits = 9;
  CHECK_THROWS_AS(sqllm::cuda::lut_matmul(a), sqllm::Error);
  a = p.args(y.data());
  a.layer.codes = nullptr;
  CHECK_THROWS_AS(sqllm::cuda::lut_matmul(a), sqllm::Error);
  a = p.args(y.data());
  a.x_stride = 10;
  CHECK_THROWS_AS(sqllm::cuda::lut_matmul(a), sqllm::Error);
  a = p.args(y.data());
  a.precision.mode = sqllm::Precision::Emulated;
  a.precision.mul_exp = 1;
  CHECK_THROWS_AS(sqllm::cuda::lut_matmul(a), sqllm::Error);
  a = p.args(y.data());
  const std::int32_t some_columns[1] = {0};
  a.layer.sparse.col_idx = some_columns;  // CSR pieces without row_ptr
  CHECK_THROWS_AS(sqllm::cuda::lut_matmul(a), sqllm::Error);
  CHECK(sqllm_emu::launches().size() == n0);
}
