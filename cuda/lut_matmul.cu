// lut_matmul.cu -- host side of the CUDA LUT kernels: validation, kernel
// choice, dispatch and launch (sqllm_cuda.h).  Kernels: lut_kernels.cuh.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <ostream>
#include <string>
#include <type_traits>

#include "lut_kernels.cuh"
#include "sqllm/error.hpp"
#include "sqllm/packing.hpp"
#include "sqllm_cuda.h"

namespace sqllm {
namespace cuda {
namespace {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F16:
      return "float16";
    case DType::BF16:
      return "bfloat16";
    case DType::F32:
      return "float32";
  }
  return "invalid";
}

/// The problem in words, for error messages; streamed only when a message
/// is built (calls that succeed format nothing).
struct Describe {
  const LutMatmulArgs& a;
};
std::ostream& operator<<(std::ostream& os, const Describe& d) {
  const LutMatmulArgs& a = d.a;
  const std::int64_t K = (a.bits >= 1 && a.bits <= 8) ? (std::int64_t{1} << a.bits) : 0;
  const std::int64_t W =
      (a.bits >= 1 && a.bits <= 8 && a.in > 0) ? static_cast<std::int64_t>(packed_words(a.in, a.bits)) : 0;
  return os << "x[" << a.batch << ", " << a.in << "] " << dtype_name(a.dtype) << ", codes[" << a.out << ", " << W
            << "] bits=" << a.bits << ", tables[" << (a.column_grouping ? a.in : a.out) << ", " << K << "] "
            << (a.column_grouping ? "column" : "row") << " grouping, y[" << a.batch << ", " << a.out
            << "], nnz=" << a.nnz << ", precision=" << precision_name(a.precision.mode);
}

/// One fast-kernel launch: the problem plus the launch's tiling.
struct DescribeFast {
  Describe problem;
  int nb, tk;
  std::size_t smem;
};
std::ostream& operator<<(std::ostream& os, const DescribeFast& d) {
  return os << d.problem << ", batch tile " << d.nb << ", tile columns " << d.tk << ", shared memory " << d.smem
            << " B";
}

struct DescribeDequant {
  const DequantizeArgs& a;
};
std::ostream& operator<<(std::ostream& os, const DescribeDequant& d) {
  const DequantizeArgs& a = d.a;
  const std::int64_t K = (a.bits >= 1 && a.bits <= 8) ? (std::int64_t{1} << a.bits) : 0;
  return os << "codes[" << a.out << ", W] bits=" << a.bits << ", tables[" << (a.column_grouping ? a.in : a.out)
            << ", " << K << "], W_out[" << a.out << ", " << a.in << "] " << dtype_name(a.dtype) << ", nnz=" << a.nnz;
}

template <class Context>
void check_cuda(cudaError_t e, const char* what, const Context& context) {
  if (e != cudaSuccess) {
    throw RuntimeFailure(::sqllm::detail::concat("sqllm CUDA: ", what, " failed: ", cudaGetErrorName(e), " (",
                                                 cudaGetErrorString(e), ") for ", context));
  }
}

/// Opt-in shared memory per block of the current device (cached).
int max_smem_optin() {
  static std::atomic<int> cache[detail::kMaxDevices] = {};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice", "querying shared memory");
  if (dev >= 0 && dev < detail::kMaxDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  check_cuda(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute", "querying shared memory");
  if (dev >= 0 && dev < detail::kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

int batch_tile(std::int64_t rows) {
  for (int nb : {1, 2, 4, 8, 16}) {
    if (rows <= nb) return nb;
  }
  return kFastMaxBatch;
}

std::size_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

void validate(const LutMatmulArgs& a) {
  const Describe ctx{a};
  SQLLM_CHECK(a.bits >= kMinBits && a.bits <= kMaxBits, "lut_matmul: bits must be in 1..8, got ",
              a.bits, " (", ctx, ")");
  SQLLM_CHECK(a.batch >= 0, "lut_matmul: batch must be >= 0 (", ctx, ")");
  SQLLM_CHECK(a.in >= 1 && a.in <= std::numeric_limits<int>::max() && a.out >= 1 &&
                  a.out <= std::numeric_limits<int>::max(),
              "lut_matmul: in and out must be in 1..2^31-1 (", ctx, ")");
  SQLLM_CHECK(a.x_stride == 0 || a.x_stride >= a.in, "lut_matmul: x row stride ", a.x_stride,
              " is smaller than in (", ctx, ")");
  SQLLM_CHECK(a.dtype == DType::F16 || a.dtype == DType::BF16 || a.dtype == DType::F32,
              "lut_matmul: unknown dtype ", static_cast<int>(a.dtype));
  SQLLM_CHECK(a.kernel == Kernel::Auto || a.kernel == Kernel::Exact || a.kernel == Kernel::Tiled ||
                  a.kernel == Kernel::Warp,
              "lut_matmul: unknown kernel ", static_cast<int>(a.kernel));
  SQLLM_CHECK(a.codes != nullptr && a.tables != nullptr,
              "lut_matmul: codes and tables must be device pointers, got null (", ctx, ")");
  SQLLM_CHECK(a.batch == 0 || (a.x != nullptr && a.y != nullptr),
              "lut_matmul: x and y must be device pointers, got null (", ctx, ")");
  const bool any_csr = a.csr_row_ptr != nullptr || a.csr_col_idx != nullptr || a.csr_values != nullptr;
  if (any_csr) {
    SQLLM_CHECK(a.csr_row_ptr != nullptr && a.nnz >= 0 && a.nnz <= std::numeric_limits<int>::max() &&
                    (a.nnz == 0 || (a.csr_col_idx != nullptr && a.csr_values != nullptr)),
                "lut_matmul: CSR needs row_ptr[out+1] and, for nnz > 0, col_idx and values (", ctx,
                ")");
  }
  try {
    check_precision(a.precision);
  } catch (const Error& e) {
    throw Error(::sqllm::detail::concat("lut_matmul: ", e.what(), " (", ctx, ")"));
  }
}

template <class T>
void launch_exact_typed(const LutMatmulArgs& a, const Describe& ctx) {
  detail::ExactParams p{};
  p.x = a.x;
  p.y = a.y;
  p.x_stride = a.x_stride == 0 ? a.in : a.x_stride;
  p.batch = a.batch;
  p.in = a.in;
  p.out = a.out;
  p.words = static_cast<std::int64_t>(packed_words(a.in, a.bits));
  p.bits = a.bits;
  p.col = a.column_grouping;
  p.codes = a.codes;
  p.tables = a.tables;
  p.row_ptr = a.csr_row_ptr;
  p.col_idx = a.csr_col_idx;
  p.values = static_cast<const __half*>(a.csr_values);
  p.nnz = a.csr_row_ptr != nullptr ? a.nnz : 0;
  const unsigned grid = static_cast<unsigned>((a.out + detail::kExactWarps - 1) / detail::kExactWarps);
  const auto stream = static_cast<cudaStream_t>(a.stream);
  visit_precision(a.precision, [&](const auto& ar) {
    using Arith = std::decay_t<decltype(ar)>;
    auto kernel = detail::lut_matmul_exact_kernel<T, Arith>;
    SQLLM_KERNEL_LAUNCH(kernel, grid, detail::kExactWarps * 32, 0, stream, p, ar);
  });
  check_cuda(cudaGetLastError(), "exact LUT matmul launch", ctx);
}

void launch_exact(const LutMatmulArgs& a, const Describe& ctx) {
  switch (a.dtype) {
    case DType::F16:
      return launch_exact_typed<__half>(a, ctx);
    case DType::BF16:
      return launch_exact_typed<__nv_bfloat16>(a, ctx);
    case DType::F32:
      return launch_exact_typed<float>(a, ctx);
  }
}

/// The fast kernels' parameters for batch rows b0 .. b0 + rows - 1 (both
/// fast kernels take the same struct; the tiled one also sets tk).
detail::FastParams fast_params(const LutMatmulArgs& a, std::int64_t b0, std::int64_t rows) {
  const std::int64_t x_stride = a.x_stride == 0 ? a.in : a.x_stride;
  const std::size_t esize = dtype_size(a.dtype);
  detail::FastParams p{};
  p.x = static_cast<const char*>(a.x) + static_cast<std::size_t>(b0 * x_stride) * esize;
  p.y = static_cast<char*>(a.y) + static_cast<std::size_t>(b0 * a.out) * esize;
  p.x_stride = x_stride;
  p.y_stride = a.out;
  p.batch = static_cast<int>(rows);
  p.in = static_cast<int>(a.in);
  p.out = static_cast<int>(a.out);
  p.words = static_cast<int>(packed_words(a.in, a.bits));
  p.codes = a.codes;
  p.tables = a.tables;
  p.row_ptr = a.csr_row_ptr;
  p.col_idx = a.csr_col_idx;
  p.values = static_cast<const __half*>(a.csr_values);
  p.nnz = a.csr_row_ptr != nullptr ? a.nnz : 0;
  return p;
}

/// Launch the fast kernel for all batch rows (tiles of <= 16); returns false
/// (nothing launched) if its shared memory does not fit this device.
bool try_launch_fast(const LutMatmulArgs& a, const Describe& ctx) {
  const int K = 1 << a.bits;
  const int optin = max_smem_optin();
  const int nb_max = batch_tile(a.batch);
  const int tk_max = detail::fast_tile_columns(a.in, nb_max, a.column_grouping, K);
  if (detail::fast_smem_bytes(nb_max, a.column_grouping, K, tk_max) > static_cast<std::size_t>(optin)) {
    return false;
  }
  for (std::int64_t b0 = 0; b0 < a.batch; b0 += kFastMaxBatch) {
    const std::int64_t rows = std::min<std::int64_t>(kFastMaxBatch, a.batch - b0);
    const int nb = batch_tile(rows);
    detail::FastParams p = fast_params(a, b0, rows);
    p.tk = detail::fast_tile_columns(a.in, nb, a.column_grouping, K);
    const std::size_t smem = detail::fast_smem_bytes(nb, a.column_grouping, K, p.tk);
    const auto stream = static_cast<cudaStream_t>(a.stream);
    cudaError_t err = cudaSuccess;
    SQLLM_DISPATCH_FAST_BITS(a.bits, BITS, {
      err = detail::launch_fast_bits<BITS>(p, a.dtype, a.column_grouping, nb, smem, stream);
    });
    check_cuda(err, "fast LUT GEMV launch", DescribeFast{ctx, nb, p.tk, smem});
  }
  return true;
}

/// Launch the warp kernel for all batch rows (tiles of <= 8).
void launch_warp_all(const LutMatmulArgs& a, const Describe& ctx) {
  for (std::int64_t b0 = 0; b0 < a.batch; b0 += detail::kWarpMaxBatch) {
    const std::int64_t rows = std::min<std::int64_t>(detail::kWarpMaxBatch, a.batch - b0);
    const int nb = batch_tile(rows);
    detail::FastParams p = fast_params(a, b0, rows);
    const auto stream = static_cast<cudaStream_t>(a.stream);
    cudaError_t err = cudaSuccess;
    SQLLM_DISPATCH_FAST_BITS(a.bits, BITS, { err = detail::launch_warp_bits<BITS>(p, a.dtype, nb, stream); });
    check_cuda(err, "warp LUT GEMV launch", ctx);
  }
}

}  // namespace

bool warp_kernel_applies(const LutMatmulArgs& a) {
  if (a.column_grouping || a.bits < 2 || a.bits > 4 || a.precision.mode != Precision::FP32) return false;
  if (a.in < 32 || a.in % 32 != 0) return false;
  if (reinterpret_cast<std::uintptr_t>(a.x) % 16 != 0) return false;
  const std::int64_t x_stride = a.x_stride == 0 ? a.in : a.x_stride;
  return a.batch <= 1 || (static_cast<std::size_t>(x_stride) * dtype_size(a.dtype)) % 16 == 0;
}

void lut_matmul(const LutMatmulArgs& a) {
  validate(a);
  if (a.batch == 0) return;
  const Describe ctx{a};
  const bool fast_ok = a.precision.mode == Precision::FP32 && a.bits >= 2 && a.bits <= 4;
  if (a.kernel == Kernel::Tiled || a.kernel == Kernel::Warp) {
    SQLLM_CHECK(fast_ok, "lut_matmul: the ", a.kernel == Kernel::Tiled ? "tiled" : "warp",
                " kernel needs precision fp32 and bits 2..4 (", ctx, ")");
    if (a.kernel == Kernel::Warp) {
      SQLLM_CHECK(warp_kernel_applies(a),
                  "lut_matmul: the warp kernel needs row grouping, in a multiple of 32 and 16-byte "
                  "aligned x rows (",
                  ctx, ")");
      launch_warp_all(a, ctx);
    } else {
      SQLLM_CHECK(try_launch_fast(a, ctx), "lut_matmul: the tiled kernel's shared memory does not fit "
                                           "this device (", ctx, ")");
    }
    return;
  }
  if (a.kernel == Kernel::Auto && fast_ok) {
    if (a.batch <= kWarpAutoMaxBatch && warp_kernel_applies(a)) return launch_warp_all(a, ctx);
    if (try_launch_fast(a, ctx)) return;
  }
  launch_exact(a, ctx);
}

void dequantize(const DequantizeArgs& a) {
  const DescribeDequant ctx{a};
  SQLLM_CHECK(a.bits >= kMinBits && a.bits <= kMaxBits, "dequantize: bits must be in 1..8, got ",
              a.bits, " (", ctx, ")");
  SQLLM_CHECK(a.in >= 1 && a.out >= 1, "dequantize: in and out must be >= 1 (", ctx, ")");
  SQLLM_CHECK(a.codes != nullptr && a.tables != nullptr && a.w != nullptr,
              "dequantize: codes, tables and w must be device pointers, got null (", ctx, ")");
  SQLLM_CHECK(a.dtype == DType::F16 || a.dtype == DType::BF16 || a.dtype == DType::F32,
              "dequantize: unknown dtype ", static_cast<int>(a.dtype));
  const bool any_csr = a.csr_row_ptr != nullptr || a.csr_col_idx != nullptr || a.csr_values != nullptr;
  if (any_csr) {
    SQLLM_CHECK(a.csr_row_ptr != nullptr && a.nnz >= 0 &&
                    (a.nnz == 0 || (a.csr_col_idx != nullptr && a.csr_values != nullptr)),
                "dequantize: CSR needs row_ptr[out+1] and, for nnz > 0, col_idx and values (", ctx, ")");
  }
  detail::DequantParams p{};
  p.codes = a.codes;
  p.tables = a.tables;
  p.in = a.in;
  p.out = a.out;
  p.words = static_cast<std::int64_t>(packed_words(a.in, a.bits));
  p.bits = a.bits;
  p.col = a.column_grouping;
  p.vec = a.in % 8 == 0 && reinterpret_cast<std::uintptr_t>(a.w) % 16 == 0;
  p.row_ptr = a.csr_row_ptr;
  p.col_idx = a.csr_col_idx;
  p.values = static_cast<const __half*>(a.csr_values);
  p.nnz = a.nnz;
  p.w = a.w;
  const auto stream = static_cast<cudaStream_t>(a.stream);
  const std::int64_t total = a.out * ((a.in + 7) / 8);
  const unsigned grid = static_cast<unsigned>(std::min<std::int64_t>((total + 255) / 256, 1 << 20));
  const unsigned sgrid = static_cast<unsigned>((a.out + 255) / 256);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto dense_kernel = detail::dequantize_kernel<T>;
    SQLLM_KERNEL_LAUNCH(dense_kernel, grid, 256, 0, stream, p);
    check_cuda(cudaGetLastError(), "dequantize launch", ctx);
    if (a.csr_row_ptr != nullptr && a.nnz > 0) {
      auto sparse_kernel = detail::dequantize_sparse_kernel<T>;
      SQLLM_KERNEL_LAUNCH(sparse_kernel, sgrid, 256, 0, stream, p);
      check_cuda(cudaGetLastError(), "dequantize (sparse part) launch", ctx);
    }
  };
  switch (a.dtype) {
    case DType::F16:
      return run(__half{});
    case DType::BF16:
      return run(__nv_bfloat16{});
    case DType::F32:
      return run(float{});
  }
}

int device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the non-sticky error
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace sqllm
