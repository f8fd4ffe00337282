// sqllm_cuda_vq.h -- host API of the CUDA VQ (VPTQ) kernels (library target sqllm_cuda).
//
// Framework free like sqllm_cuda.h: raw device pointers, shapes and a stream
// (cudaStream_t as void*, nullptr = the legacy default stream).  Every
// function validates its arguments and throws sqllm::Error naming the problem;
// launch errors are thrown as sqllm::RuntimeFailure.  Calls are asynchronous.
//
// The format is upstream VPTQ's packed layout (docs/formats.md, "vq";
// python/sqllm/nn_vq.py), with G = group_num, B = log2 k + log2 k_res:
//   indices           uint32 [G, ceil(out/v), ceil(group_size*B/32)]: per group and
//                     vector row one LSB-first stream of B-bit slots main | (res << log2 k)
//   centroids         float32 [G, k*v];  res_centroids float32 [G, k_res*v] (k_res = 0: none)
//   outlier_indices   uint16 [ceil(out/v_o), outlier_size]; outlier_centroids float32 [k_o*v_o]
//   perm              int32 [in] (null: identity): position j holds column perm[j]
//   weight_scale/bias float32 [in] (null: no norm)
// Decode: W'[r*v+e, osz + g*gs + c] = C_g[main][e] + R_g[res][e]; W'[o, c < osz] =
// OC[oidx[o/v_o, c]][o%v_o]; W[:, perm[j]] = W'[:, j]; W = W*scale + bias (per column).
//
// Codebooks, scales and perm are passed in float32/int32 (the Python layer
// converts the stored fp16/bf16/int16 once and caches them on the device).
// Perm and norm are folded into the activation inside the kernel: the GEMV
// stages x'[b, j] = x[b, perm[j]] * scale[perm[j]] (fp32) and adds the
// per-row constant sum_c x[b, c] * weight_bias[c] once per output, which is
// y = x W^T exactly in real arithmetic (W[o, perm[j]] = W'[o, j] s + t).
//
// Outlier indices >= k_o and perm entries outside [0, in) are skipped on the
// device (memory safety only): validate them on the host once (nn_vq does).
#pragma once

#include <cstdint>

#include "sqllm_cuda.h"

namespace sqllm {
namespace cuda {

/// The quantized weight [out, in] (device pointers, see the header comment).
struct VqWeights {
  std::int64_t in = 0;
  std::int64_t out = 0;
  int v = 0;       ///< vector length, 2..16
  int k = 0;       ///< centroids per group, a power of two 2..65536
  int k_res = 0;   ///< residual centroids, 0 or a power of two 2..65536
  int group_num = 1;
  std::int64_t group_size = 0;  ///< columns per group (the last group may be shorter)
  const std::uint32_t* indices = nullptr;
  const float* centroids = nullptr;
  const float* res_centroids = nullptr;
  std::int64_t outlier_size = 0;  ///< leading positions with the outlier codebook
  int v_out = 0;                  ///< outlier vector length, 2..16
  int k_out = 0;                  ///< outlier centroids, 1..65536
  const std::uint16_t* outlier_indices = nullptr;
  const float* outlier_centroids = nullptr;
  const std::int32_t* perm = nullptr;
  const float* weight_scale = nullptr;
  const float* weight_bias = nullptr;
};

struct VqMatmulArgs {
  VqWeights w;
  const void* x = nullptr;     ///< [batch, in], dtype, row stride x_stride
  void* y = nullptr;           ///< [batch, out], dtype, contiguous
  const float* bias = nullptr; ///< [out] or null
  std::int64_t batch = 0;      ///< 0 is a no-op
  std::int64_t x_stride = 0;   ///< 0 means in
  DType dtype = DType::F16;
  void* stream = nullptr;
};

/// y = x W^T (+ bias): the fused gather GEMV (no weight materialised).  Meant for
/// small batches (it reads the indices once per kVqBatchTile rows); larger batches
/// should dequantize once and call a GEMM (nn_vq does above kVqGemvMaxBatch).
/// fp32 accumulation with FMAs in an unspecified order.
void vq_matmul(const VqMatmulArgs& args);

struct VqDequantizeArgs {
  VqWeights w;
  void* out_w = nullptr;  ///< [out, in] of dtype, contiguous
  DType dtype = DType::F16;
  void* stream = nullptr;
};

/// W[o, i] decoded as above, formed in fp32 ((C + R) * scale + bias with one fma)
/// and rounded once to dtype.
void vq_dequantize(const VqDequantizeArgs& args);

/// Batch rows per block of the GEMV.
constexpr int kVqBatchTile = 4;
/// Largest batch for which nn_vq calls the GEMV (above: dequantize + GEMM).
constexpr int kVqGemvMaxBatch = 8;

}  // namespace cuda
}  // namespace sqllm
