// sqllm_cuda.h -- host API of the CUDA LUT kernels (library target sqllm_cuda).
//
// Framework free: raw device pointers, shapes and a stream (cudaStream_t
// passed as void*, nullptr = the legacy default stream).  Every function
// validates its arguments and throws sqllm::Error with the shapes in the
// message; launch errors (cudaGetLastError) are thrown the same way.  Calls
// are asynchronous with respect to the host.
//
// The format (docs/formats.md): the layer is a sqllm::LutView
// (sqllm/format/lut.hpp, the same struct the CPU kernel and the references
// take) whose pointers are device pointers:
//   y[b, o] = sum_i x[b, i] * W[o, i]  (+ sum_{k in CSR row o} values[k] * x[b, col_idx[k]])
//   codes   uint32 [out, W], W = packed_words(in, bits), row-major;
//   tables  float32 [out, 2^bits] (row grouping) or [in, 2^bits] (column grouping);
//   CSR     optional: row_ptr int32 [out + 1], col_idx int32 [nnz], values fp16 [nnz];
//   x       [batch, in] with row stride x_stride (elements, >= in), y [batch, out]
//           contiguous, both of `dtype`.
// The CSR contents live on the device and are not walked here: validate them
// on the host once (check_csr) before the first launch.
#pragma once

#include <cstdint>

#include "sqllm/float_emu.hpp"
#include "sqllm/format/lut.hpp"

namespace sqllm {
namespace cuda {

/// Element type of activations and outputs.
enum class DType : int { F16 = 0, BF16 = 1, F32 = 2 };

/// Which kernel computes the product.
///   Auto  -- the tuned kernel ("fast") when precision.mode == FP32 and bits
///            is 2, 3 or 4 (and its shared memory fits), any dtype;
///            otherwise the exact kernel (FP32 arithmetic for mode FP32).
///            The fast kernel accumulates in fp32 with FMAs in an unspecified
///            order; its error is that of an fp32 dot product.
///   Exact -- the reproducible kernel: bit for bit the CPU reference
///            sqllm::reference::lut_matmul_precision in every precision mode.
///   Tiled, Warp -- force one of the two fast kernels (precision FP32, bits
///            2..4; benchmarks and tests).  Tiled: x staged per block in
///            shared memory, any shape, both groupings.  Warp: one warp per
///            block and per pair of rows, x read straight from global memory;
///            row grouping, in % 32 == 0 and 16-byte aligned x rows only
///            (warp_kernel_applies).  Auto takes Warp where it applies and
///            batch <= kWarpAutoMaxBatch, else Tiled (measured on an H200:
///            Warp is 1.3-1.6x faster than Tiled at batch 1-4 and slower at
///            8-16, docs/benchmarks.md).  Both sum in the same order (the
///            same error bound).
enum class Kernel : int { Auto = 0, Exact = 1, Tiled = 2, Warp = 3 };

struct LutMatmulArgs {
  LutView layer;            ///< codes, tables, grouping, bits (1..8; fast kernel 2..4), CSR
  const void* x = nullptr;  ///< [batch, in], dtype, row stride x_stride
  void* y = nullptr;        ///< [batch, out], dtype, contiguous
  std::int64_t batch = 0;   ///< 0 is a no-op
  std::int64_t x_stride = 0;  ///< 0 means `in`
  DType dtype = DType::F16;
  PrecisionConfig precision{};  ///< FP32 / FP16 / Emulated{mul, acc formats}
  Kernel kernel = Kernel::Auto;
  void* stream = nullptr;  ///< cudaStream_t
};

/// y = x * W^T (+ sparse part).  Batches above 16 are processed in launches of
/// 16 rows by the fast kernel (callers with large batches should prefer
/// dequantize + a GEMM).  CSR entries whose column index is outside [0, in)
/// are ignored on the device (validate them on the host once).
void lut_matmul(const LutMatmulArgs& args);

struct DequantizeArgs {
  /// The layer (bits 1..8).  Its optional sparse part is added to W; the sum
  /// is formed in fp32 and rounded once.  Column indices of a row must be
  /// distinct or adjacent (sorted CSR); of non-adjacent duplicates the last run wins.
  LutView layer;
  void* w = nullptr;  ///< [out, in] of dtype, contiguous
  DType dtype = DType::F16;
  void* stream = nullptr;
};

/// W[o, i] = table value of code (o, i), rounded to dtype (nearest even).
void dequantize(const DequantizeArgs& args);

/// Number of CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();

/// Largest batch the fast kernel handles in one launch.
constexpr int kFastMaxBatch = 16;

/// Whether the Warp fast kernel can run this problem (see Kernel): row
/// grouping, bits 2..4, precision FP32, in a multiple of 32, x and its row
/// stride 16-byte aligned.
bool warp_kernel_applies(const LutMatmulArgs& args);

/// Largest batch for which Kernel::Auto prefers the warp kernel.
constexpr int kWarpAutoMaxBatch = 4;

}  // namespace cuda
}  // namespace sqllm
