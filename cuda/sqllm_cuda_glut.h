// sqllm_cuda_glut.h -- host API of the CUDA kernels of the grouped-lookup-table
// ("glut") format (library target sqllm_cuda).
//
// Framework free like sqllm_cuda.h: the layer is a sqllm::GlutView
// (sqllm/format/glut.hpp, the struct the CPU kernels, the references and the
// bindings take) whose pointers are device pointers; activations are raw
// device pointers of `dtype`, the stream a cudaStream_t as void* (nullptr =
// the legacy default stream).  Every function validates its arguments
// (check_glut_layout: bits 1..8, group_size >= 1, non-empty, non-null arrays)
// and throws sqllm::Error naming the problem before any launch; launch errors
// are thrown as sqllm::RuntimeFailure.  Calls are asynchronous.
//
// The arrays' contents are not validated on the device (finite entries, zero
// tail bits): check them on the host once (check_glut_view; GlutQuantLinear
// does).  Whatever the contents, the kernels read only inside the arrays.
//
//   qweight  uint32 [out, packed_words(in, bits)]   packed codes (packing.hpp)
//   tables   uint8  [out, G * 2^bits]               G = ceil(in / group_size)
//   scales, offsets  fp16 bits (uint16) [out, G]
//   Ŵ[o, i] = glut_entry(tables[o, (i / g) K + code(o, i)], scales[o, i / g], offsets[o, i / g])
#pragma once

#include <cstdint>

#include "sqllm/format/glut.hpp"
#include "sqllm_cuda.h"

namespace sqllm {
namespace cuda {

struct GlutMatmulArgs {
  GlutView layer;              ///< device pointers
  const void* x = nullptr;     ///< [batch, in] of dtype, row stride x_stride
  void* y = nullptr;           ///< [batch, out] of dtype, contiguous
  std::int64_t batch = 0;      ///< 0 is a no-op
  std::int64_t x_stride = 0;   ///< elements between rows of x; 0 means in
  DType dtype = DType::F16;
  void* stream = nullptr;
};

/// y = x Ŵ^T: the fused GEMV (the weight is never materialised; every entry is
/// decoded in registers with glut_entry).  fp32 accumulation with FMAs in an
/// unspecified order, rounded once to dtype.  Meant for small batches: it
/// reads the packed weight once per kGlutBatchTile rows of x; larger batches
/// should dequantize once and call a GEMM (GlutQuantLinear does above
/// kGlutGemvMaxBatch rows).
void glut_matmul(const GlutMatmulArgs& args);

struct GlutDequantizeArgs {
  GlutView layer;         ///< device pointers
  void* w = nullptr;      ///< [out, in] of dtype, contiguous
  DType dtype = DType::F16;
  void* stream = nullptr;
};

/// W[o, i] = glut_entry(...) in fp32 -- bit for bit the CPU glut_dequantize
/// and glut_dequantize_ref -- rounded once to dtype (nearest even; F32: as is).
void glut_dequantize(const GlutDequantizeArgs& args);

/// Largest number of batch rows one GEMV block handles (batch tiles of 1, 2, 4, 8).
constexpr int kGlutBatchTile = 8;
/// Largest batch for which GlutQuantLinear calls the GEMV (above: dequantize + GEMM).
constexpr int kGlutGemvMaxBatch = 8;

}  // namespace cuda
}  // namespace sqllm
