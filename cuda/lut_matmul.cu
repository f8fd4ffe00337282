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

// The layer's sizes as the signed integers the launch arithmetic uses.
template <class Args>
std::int64_t in64(const Args& a) {
  return static_cast<std::int64_t>(a.layer.in);
}
template <class Args>
std::int64_t out64(const Args& a) {
  return static_cast<std::int64_t>(a.layer.out);
}
template <class Args>
std::int64_t nnz64(const Args& a) {
  return a.layer.sparse.row_ptr != nullptr ? static_cast<std::int64_t>(a.layer.sparse.nnz) : 0;
}

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
  const std::int64_t K = (a.layer.bits >= 1 && a.layer.bits <= 8) ? (std::int64_t{1} << a.layer.bits) : 0;
  const std::int64_t W =
      (a.layer.bits >= 1 && a.layer.bits <= 8 && in64(a) > 0) ? static_cast<std::int64_t>(packed_words(in64(a), a.layer.bits)) : 0;
  return os << "x[" << a.batch << ", " << in64(a) << "] " << dtype_name(a.dtype) << ", codes[" << out64(a) << ", " << W
            << "] bits=" << a.layer.bits << ", tables[" << (a.layer.column_grouping() ? in64(a) : out64(a)) << ", " << K << "] "
            << (a.layer.column_grouping() ? "column" : "row") << " grouping, y[" << a.batch << ", " << out64(a)
            << "], nnz=" << nnz64(a) << ", precision=" << precision_name(a.precision.mode);
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
  const std::int64_t K = (a.layer.bits >= 1 && a.layer.bits <= 8) ? (std::int64_t{1} << a.layer.bits) : 0;
  return os << "codes[" << out64(a) << ", W] bits=" << a.layer.bits << ", tables[" << (a.layer.column_grouping() ? in64(a) : out64(a))
            << ", " << K << "], W_out[" << out64(a) << ", " << in64(a) << "] " << dtype_name(a.dtype) << ", nnz=" << nnz64(a);
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

/// The layer through check_lut_view (the one validation of the format; the
/// CSR contents are on the device), with the problem named in the message.
template <class Context>
void check_layer(const LutView& layer, const char* what, const Context& ctx) {
  try {
    check_lut_view(layer, /*check_sparse_contents=*/false);
  } catch (const Error& e) {
    throw Error(::sqllm::detail::concat(what, ": ", e.what(), " (", ctx, ")"));
  }
  SQLLM_CHECK(layer.in <= static_cast<std::size_t>(std::numeric_limits<int>::max()) &&
                  layer.out <= static_cast<std::size_t>(std::numeric_limits<int>::max()) &&
                  layer.sparse.nnz <= static_cast<std::size_t>(std::numeric_limits<int>::max()),
              what, ": in, out and nnz must be below 2^31 (", ctx, ")");
}

void validate(const LutMatmulArgs& a) {
  const Describe ctx{a};
  check_layer(a.layer, "lut_matmul", ctx);
  SQLLM_CHECK(a.batch >= 0, "lut_matmul: batch must be >= 0 (", ctx, ")");
  SQLLM_CHECK(a.x_stride == 0 || a.x_stride >= in64(a), "lut_matmul: x row stride ", a.x_stride,
              " is smaller than in (", ctx, ")");
  SQLLM_CHECK(a.dtype == DType::F16 || a.dtype == DType::BF16 || a.dtype == DType::F32,
              "lut_matmul: unknown dtype ", static_cast<int>(a.dtype));
  SQLLM_CHECK(a.kernel == Kernel::Auto || a.kernel == Kernel::Exact || a.kernel == Kernel::Tiled ||
                  a.kernel == Kernel::Warp,
              "lut_matmul: unknown kernel ", static_cast<int>(a.kernel));
  SQLLM_CHECK(a.batch == 0 || (a.x != nullptr && a.y != nullptr),
              "lut_matmul: x and y must be device pointers, got null (", ctx, ")");
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
  p.x_stride = a.x_stride == 0 ? in64(a) : a.x_stride;
  p.batch = a.batch;
  p.in = in64(a);
  p.out = out64(a);
  p.words = static_cast<std::int64_t>(packed_words(in64(a), a.layer.bits));
  p.bits = a.layer.bits;
  p.col = a.layer.column_grouping();
  p.codes = a.layer.codes;
  p.tables = a.layer.tables;
  p.row_ptr = a.layer.sparse.row_ptr;
  p.col_idx = a.layer.sparse.col_idx;
  p.values = reinterpret_cast<const __half*>(a.layer.sparse.values);
  p.nnz = nnz64(a);
  const unsigned grid = static_cast<unsigned>((out64(a) + detail::kExactWarps - 1) / detail::kExactWarps);
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
  const std::int64_t x_stride = a.x_stride == 0 ? in64(a) : a.x_stride;
  const std::size_t esize = dtype_size(a.dtype);
  detail::FastParams p{};
  p.x = static_cast<const char*>(a.x) + static_cast<std::size_t>(b0 * x_stride) * esize;
  p.y = static_cast<char*>(a.y) + static_cast<std::size_t>(b0 * out64(a)) * esize;
  p.x_stride = x_stride;
  p.y_stride = out64(a);
  p.batch = static_cast<int>(rows);
  p.in = static_cast<int>(in64(a));
  p.out = static_cast<int>(out64(a));
  p.words = static_cast<int>(packed_words(in64(a), a.layer.bits));
  p.codes = a.layer.codes;
  p.tables = a.layer.tables;
  p.row_ptr = a.layer.sparse.row_ptr;
  p.col_idx = a.layer.sparse.col_idx;
  p.values = reinterpret_cast<const __half*>(a.layer.sparse.values);
  p.nnz = nnz64(a);
  return p;
}

/// Launch the fast kernel for all batch rows (tiles of <= 16); returns false
/// (nothing launched) if its shared memory does not fit this device.
bool try_launch_fast(const LutMatmulArgs& a, const Describe& ctx) {
  const int K = 1 << a.layer.bits;
  const int optin = max_smem_optin();
  const int nb_max = batch_tile(a.batch);
  const int tk_max = detail::fast_tile_columns(in64(a), nb_max, a.layer.column_grouping(), K);
  if (detail::fast_smem_bytes(nb_max, a.layer.column_grouping(), K, tk_max) > static_cast<std::size_t>(optin)) {
    return false;
  }
  for (std::int64_t b0 = 0; b0 < a.batch; b0 += kFastMaxBatch) {
    const std::int64_t rows = std::min<std::int64_t>(kFastMaxBatch, a.batch - b0);
    const int nb = batch_tile(rows);
    detail::FastParams p = fast_params(a, b0, rows);
    p.tk = detail::fast_tile_columns(in64(a), nb, a.layer.column_grouping(), K);
    const std::size_t smem = detail::fast_smem_bytes(nb, a.layer.column_grouping(), K, p.tk);
    const auto stream = static_cast<cudaStream_t>(a.stream);
    cudaError_t err = cudaSuccess;
    SQLLM_DISPATCH_FAST_BITS(a.layer.bits, BITS, {
      err = detail::launch_fast_bits<BITS>(p, a.dtype, a.layer.column_grouping(), nb, smem, stream);
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
    SQLLM_DISPATCH_FAST_BITS(a.layer.bits, BITS, { err = detail::launch_warp_bits<BITS>(p, a.dtype, nb, stream); });
    check_cuda(err, "warp LUT GEMV launch", ctx);
  }
}

}  // namespace

bool warp_kernel_applies(const LutMatmulArgs& a) {
  if (a.layer.column_grouping() || a.layer.bits < 2 || a.layer.bits > 4 || a.precision.mode != Precision::FP32) return false;
  if (in64(a) < 32 || in64(a) % 32 != 0) return false;
  if (reinterpret_cast<std::uintptr_t>(a.x) % 16 != 0) return false;
  const std::int64_t x_stride = a.x_stride == 0 ? in64(a) : a.x_stride;
  return a.batch <= 1 || (static_cast<std::size_t>(x_stride) * dtype_size(a.dtype)) % 16 == 0;
}

void lut_matmul(const LutMatmulArgs& a) {
  validate(a);
  if (a.batch == 0) return;
  const Describe ctx{a};
  const bool fast_ok = a.precision.mode == Precision::FP32 && a.layer.bits >= 2 && a.layer.bits <= 4;
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
  check_layer(a.layer, "dequantize", ctx);
  SQLLM_CHECK(a.w != nullptr, "dequantize: w must be a device pointer, got null (", ctx, ")");
  SQLLM_CHECK(a.dtype == DType::F16 || a.dtype == DType::BF16 || a.dtype == DType::F32,
              "dequantize: unknown dtype ", static_cast<int>(a.dtype));
  detail::DequantParams p{};
  p.codes = a.layer.codes;
  p.tables = a.layer.tables;
  p.in = in64(a);
  p.out = out64(a);
  p.words = static_cast<std::int64_t>(packed_words(in64(a), a.layer.bits));
  p.bits = a.layer.bits;
  p.col = a.layer.column_grouping();
  p.vec = in64(a) % 8 == 0 && reinterpret_cast<std::uintptr_t>(a.w) % 16 == 0;
  p.row_ptr = a.layer.sparse.row_ptr;
  p.col_idx = a.layer.sparse.col_idx;
  p.values = reinterpret_cast<const __half*>(a.layer.sparse.values);
  p.nnz = nnz64(a);
  p.w = a.w;
  const auto stream = static_cast<cudaStream_t>(a.stream);
  const std::int64_t total = out64(a) * ((in64(a) + 7) / 8);
  const unsigned grid = static_cast<unsigned>(std::min<std::int64_t>((total + 255) / 256, 1 << 20));
  const unsigned sgrid = static_cast<unsigned>((out64(a) + 255) / 256);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto dense_kernel = detail::dequantize_kernel<T>;
    SQLLM_KERNEL_LAUNCH(dense_kernel, grid, 256, 0, stream, p);
    check_cuda(cudaGetLastError(), "dequantize launch", ctx);
    if (a.layer.sparse.row_ptr != nullptr && nnz64(a) > 0) {
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
