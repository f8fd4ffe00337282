// vq_matmul.cu -- the CUDA VQ (VPTQ) kernels and their host side (sqllm_cuda_vq.h).
//
// GEMV (small batches)
// --------------------
// A block has kVqWarps warps; warp w owns vector row r = blockIdx.x * kVqWarps + w,
// i.e. the v outputs r*v .. r*v+v-1; blockIdx.y picks a tile of NB <= 4 batch rows.
// The activation is staged per tile of tk positions in shared memory as fp32,
// already permuted and scaled: xs[b][j - t0] = x[b, perm[j]] * scale[perm[j]]
// (zero past `batch`).  Lane l walks the positions l, l + 32, ... of the tile:
// it reads the B-bit slot of (r, position) from the LSB-first stream (adjacent
// lanes read adjacent bits: coalesced), gathers the centroid (+ residual)
// vector from the fp32 codebooks (L1/L2 resident) and accumulates NB x v fp32
// sums with FMAs.  Outlier positions (< outlier_size) take their weight from
// the outlier codebook, one output at a time.  A shfl_xor butterfly reduces
// each sum over the warp.  The norm's bias term sum_c x[b, c] weight_bias[c]
// is accumulated by every thread while staging, reduced in a fixed order by
// warp 0 and added once per output, with the layer bias.  Every (b, o) is
// written by exactly one lane.
//
// Error: each output is an fp32 sum, in some order, of the products
// x*scale*(C + R) and x*t plus the bias; with u = 2^-24 and n = in its error is
// at most gamma(n + 4) * (sum |x s (C+R)| + sum |x t| + |bias|) before the final
// rounding to the output type (tests/cpp/cuda_emulation/test_vq_cuda_emulated.cpp).
//
// Dequantize
// ----------
// One thread per (vector row, position): decodes the slot once and writes the
// v elements W[o, perm[j]] = fma(C + R, scale, bias) rounded to dtype.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <ostream>

#include "lut_kernels.cuh"
#include "sqllm/error.hpp"
#include "sqllm_cuda.h"
#include "sqllm_cuda_vq.h"

namespace sqllm {
namespace cuda {
namespace vq {

using detail::Act;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kDequantThreads = 256;
/// Shared memory per GEMV block for the staged activation (floats per batch row * NB).
constexpr int kStageFloats = 8192;

struct Weights {
  int in, out, v, rows, main_bits, res_bits, k, k_res, G, gs, words;
  int osz, vo, ko;
  const std::uint32_t* idx;
  const float* C;
  const float* R;
  const std::uint16_t* oidx;
  const float* OC;
  const std::int32_t* perm;
  const float* scale;
  const float* wbias;
};

struct GemvParams {
  Weights w;
  const void* x;
  void* y;
  const float* bias;
  int batch;
  long long x_stride;
  int tk;
};

/// Slot c of one LSB-first stream of B-bit slots (1 <= B <= 32).
__device__ __forceinline__ std::uint32_t read_slot(const std::uint32_t* row, int c, int B) {
  const long long bit = static_cast<long long>(c) * B;
  const int word = static_cast<int>(bit >> 5);
  const int off = static_cast<int>(bit & 31);
  std::uint32_t v = __ldg(row + word) >> off;
  if (off + B > 32) v |= __ldg(row + word + 1) << (32 - off);
  return B == 32 ? v : (v & ((1u << B) - 1u));
}

template <class T, int VM, int NB>
__global__ void __launch_bounds__(kThreads) gemv_kernel(GemvParams p) {
  SQLLM_DYNAMIC_SHARED(float, smem);
  const Weights& w = p.w;
  float* xs = smem;                    // [NB][tk]
  float* part = smem + NB * p.tk;      // [NB][kThreads] partial norm-bias sums
  float* nbias = part + NB * kThreads; // [NB] their totals
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int r = static_cast<int>(blockIdx.x) * kWarps + warp;
  const int b0 = static_cast<int>(blockIdx.y) * NB;
  const int nb = min(NB, p.batch - b0);
  const T* x = static_cast<const T*>(p.x);
  const int B = w.main_bits + w.res_bits;
  const std::uint32_t kmask = (1u << w.main_bits) - 1u;

  float acc[NB][VM];
  float tsum[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    tsum[b] = 0.f;
#pragma unroll
    for (int e = 0; e < VM; ++e) acc[b][e] = 0.f;
  }

  for (int t0 = 0; t0 < w.in; t0 += p.tk) {
    const int t1 = min(w.in, t0 + p.tk);
    __syncthreads();  // the previous tile is consumed
    for (int j = t0 + tid; j < t1; j += kThreads) {
      const int col = w.perm != nullptr ? __ldg(w.perm + j) : j;
      const bool ok = col >= 0 && col < w.in;
      const float s = (w.scale != nullptr && ok) ? __ldg(w.scale + col) : 1.f;
      const float t = (w.wbias != nullptr && ok) ? __ldg(w.wbias + col) : 0.f;
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const float xv = (b < nb && ok) ? Act<T>::load(x + (b0 + b) * p.x_stride + col) : 0.f;
        xs[b * p.tk + (j - t0)] = xv * s;
        tsum[b] = fmaf(xv, t, tsum[b]);
      }
    }
    __syncthreads();
    if (r < w.rows) {
      // Outlier positions of this tile: one output at a time.
      const int oend = min(t1, w.osz);
      for (int c = t0 + lane; c < oend; c += 32) {
#pragma unroll
        for (int e = 0; e < VM; ++e) {
          const int o = r * w.v + e;
          if (e < w.v && o < w.out) {
            const unsigned id = __ldg(w.oidx + static_cast<long long>(o / w.vo) * w.osz + c);
            if (id < static_cast<unsigned>(w.ko)) {
              const float wt = __ldg(w.OC + static_cast<long long>(id) * w.vo + o % w.vo);
#pragma unroll
              for (int b = 0; b < NB; ++b) acc[b][e] = fmaf(xs[b * p.tk + (c - t0)], wt, acc[b][e]);
            }
          }
        }
      }
      // Codebook positions.
      for (int j = max(t0, w.osz) + lane; j < t1; j += 32) {
        const int jj = j - w.osz;
        const int g = jj / w.gs;
        const int c = jj - g * w.gs;
        const std::uint32_t* row = w.idx + (static_cast<long long>(g) * w.rows + r) * w.words;
        const std::uint32_t slot = read_slot(row, c, B);
        const float* cv = w.C + (static_cast<long long>(g) * w.k + (slot & kmask)) * w.v;
        const float* rv = w.R != nullptr
                              ? w.R + (static_cast<long long>(g) * w.k_res + (slot >> w.main_bits)) * w.v
                              : nullptr;
        float xv[NB];
#pragma unroll
        for (int b = 0; b < NB; ++b) xv[b] = xs[b * p.tk + (j - t0)];
#pragma unroll
        for (int e = 0; e < VM; ++e) {
          if (e < w.v) {
            float wt = __ldg(cv + e);
            if (rv != nullptr) wt += __ldg(rv + e);
#pragma unroll
            for (int b = 0; b < NB; ++b) acc[b][e] = fmaf(xv[b], wt, acc[b][e]);
          }
        }
      }
    }
  }

  // The norm's bias term: per-thread partials, reduced by warp 0 in a fixed order.
#pragma unroll
  for (int b = 0; b < NB; ++b) part[b * kThreads + tid] = tsum[b];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float s = 0.f;
      for (int i = lane; i < kThreads; i += 32) s += part[b * kThreads + i];
#pragma unroll
      for (int m = 16; m >= 1; m >>= 1) s += __shfl_xor_sync(detail::kFullMask, s, m);
      if (lane == 0) nbias[b] = s;
    }
  }
  __syncthreads();
  if (r >= w.rows) return;
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int b = 0; b < NB; ++b) {
#pragma unroll
    for (int e = 0; e < VM; ++e) {
      float s = acc[b][e];
#pragma unroll
      for (int m = 16; m >= 1; m >>= 1) s += __shfl_xor_sync(detail::kFullMask, s, m);
      const int o = r * w.v + e;
      if (lane == e && e < w.v && o < w.out && b < nb) {
        float out = s + nbias[b];
        if (p.bias != nullptr) out += __ldg(p.bias + o);
        y[static_cast<long long>(b0 + b) * w.out + o] = Act<T>::from_float(out);
      }
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kDequantThreads) dequant_kernel(Weights w, T* out) {
  const int r = static_cast<int>(blockIdx.x);
  const int j = static_cast<int>(blockIdx.y) * kDequantThreads + static_cast<int>(threadIdx.x);
  if (j >= w.in) return;
  const int col = w.perm != nullptr ? __ldg(w.perm + j) : j;
  if (col < 0 || col >= w.in) return;
  const float s = w.scale != nullptr ? __ldg(w.scale + col) : 1.f;
  const float t = w.wbias != nullptr ? __ldg(w.wbias + col) : 0.f;
  if (j < w.osz) {
    for (int e = 0; e < w.v; ++e) {
      const int o = r * w.v + e;
      if (o >= w.out) break;
      const unsigned id = __ldg(w.oidx + static_cast<long long>(o / w.vo) * w.osz + j);
      const float val = id < static_cast<unsigned>(w.ko)
                            ? __ldg(w.OC + static_cast<long long>(id) * w.vo + o % w.vo)
                            : 0.f;
      out[static_cast<long long>(o) * w.in + col] = Act<T>::from_float(fmaf(val, s, t));
    }
    return;
  }
  const int jj = j - w.osz;
  const int g = jj / w.gs;
  const int c = jj - g * w.gs;
  const std::uint32_t slot =
      read_slot(w.idx + (static_cast<long long>(g) * w.rows + r) * w.words, c, w.main_bits + w.res_bits);
  const float* cv = w.C + (static_cast<long long>(g) * w.k + (slot & ((1u << w.main_bits) - 1u))) * w.v;
  const float* rv = w.R != nullptr
                        ? w.R + (static_cast<long long>(g) * w.k_res + (slot >> w.main_bits)) * w.v
                        : nullptr;
  for (int e = 0; e < w.v; ++e) {
    const int o = r * w.v + e;
    if (o >= w.out) break;
    float val = __ldg(cv + e);
    if (rv != nullptr) val += __ldg(rv + e);
    out[static_cast<long long>(o) * w.in + col] = Act<T>::from_float(fmaf(val, s, t));
  }
}

}  // namespace vq

namespace {

const char* vq_dtype_name(DType d) {
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

struct DescribeVq {
  const VqWeights& w;
};
std::ostream& operator<<(std::ostream& os, const DescribeVq& d) {
  const VqWeights& w = d.w;
  return os << "W[" << w.out << ", " << w.in << "] v=" << w.v << " k=" << w.k << " k_res=" << w.k_res
            << " groups=" << w.group_num << "x" << w.group_size << " outliers=" << w.outlier_size
            << " (v=" << w.v_out << ", k=" << w.k_out << ")" << (w.perm ? " perm" : "")
            << (w.weight_scale ? " norm" : "");
}

bool pow2_in(int k, int lo, int hi) { return k >= lo && k <= hi && (k & (k - 1)) == 0; }
int log2i(int k) {
  int b = 0;
  while ((1 << b) < k) ++b;
  return b;
}

void vq_cuda_check(cudaError_t e, const char* what, const DescribeVq& ctx) {
  if (e != cudaSuccess) {
    throw RuntimeFailure(::sqllm::detail::concat("sqllm CUDA: ", what, " failed: ", cudaGetErrorName(e), " (",
                                                 cudaGetErrorString(e), ") for ", ctx));
  }
}

vq::Weights check_weights(const VqWeights& w, const char* fn) {
  const DescribeVq ctx{w};
  constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();
  SQLLM_CHECK(w.in >= 1 && w.in <= kIntMax && w.out >= 1 && w.out <= kIntMax, fn,
              ": in and out must be in 1..2^31-1 (", ctx, ")");
  SQLLM_CHECK(w.v >= 2 && w.v <= 16, fn, ": v must be in 2..16, got ", w.v, " (", ctx, ")");
  SQLLM_CHECK(pow2_in(w.k, 2, 65536), fn, ": k must be a power of two in 2..65536, got ", w.k, " (", ctx, ")");
  SQLLM_CHECK(w.k_res == 0 || pow2_in(w.k_res, 2, 65536), fn,
              ": k_res must be 0 or a power of two in 2..65536, got ", w.k_res, " (", ctx, ")");
  SQLLM_CHECK(w.outlier_size >= 0 && w.outlier_size < w.in, fn, ": outlier_size must be in 0..in-1 (", ctx,
              ")");
  const std::int64_t rest = w.in - w.outlier_size;
  SQLLM_CHECK(w.group_num >= 1 && w.group_size >= 1 && (w.group_num - 1) * w.group_size < rest &&
                  w.group_num * w.group_size >= rest,
              fn, ": ", w.group_num, " groups of ", w.group_size, " columns do not cover the ", rest,
              " non-outlier columns (", ctx, ")");
  SQLLM_CHECK(w.indices != nullptr && w.centroids != nullptr, fn,
              ": indices and centroids must be device pointers, got null (", ctx, ")");
  SQLLM_CHECK(w.k_res == 0 || w.res_centroids != nullptr, fn, ": k_res > 0 needs res_centroids (", ctx, ")");
  if (w.outlier_size > 0) {
    SQLLM_CHECK(w.v_out >= 2 && w.v_out <= 16 && w.k_out >= 1 && w.k_out <= 65536 &&
                    w.outlier_indices != nullptr && w.outlier_centroids != nullptr,
                fn, ": outliers need v_out in 2..16, k_out in 1..65536, outlier_indices and "
                    "outlier_centroids (", ctx, ")");
  }
  SQLLM_CHECK((w.weight_scale == nullptr) == (w.weight_bias == nullptr), fn,
              ": weight_scale and weight_bias go together (", ctx, ")");
  vq::Weights d{};
  d.in = static_cast<int>(w.in);
  d.out = static_cast<int>(w.out);
  d.v = w.v;
  d.rows = static_cast<int>((w.out + w.v - 1) / w.v);
  d.main_bits = log2i(w.k);
  d.res_bits = w.k_res > 0 ? log2i(w.k_res) : 0;
  d.k = w.k;
  d.k_res = w.k_res;
  d.G = w.group_num;
  d.gs = static_cast<int>(w.group_size);
  d.words = static_cast<int>((w.group_size * (d.main_bits + d.res_bits) + 31) / 32);
  d.osz = static_cast<int>(w.outlier_size);
  d.vo = w.outlier_size > 0 ? w.v_out : 1;
  d.ko = w.outlier_size > 0 ? w.k_out : 0;
  d.idx = w.indices;
  d.C = w.centroids;
  d.R = w.k_res > 0 ? w.res_centroids : nullptr;
  d.oidx = w.outlier_size > 0 ? w.outlier_indices : nullptr;
  d.OC = w.outlier_size > 0 ? w.outlier_centroids : nullptr;
  d.perm = w.perm;
  d.scale = w.weight_scale;
  d.wbias = w.weight_bias;
  return d;
}

template <class T, int VM, int NB>
cudaError_t launch_gemv(const vq::GemvParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.w.rows + vq::kWarps - 1) / vq::kWarps),
                  static_cast<unsigned>((p.batch + NB - 1) / NB));
  const std::size_t smem = sizeof(float) * (static_cast<std::size_t>(NB) * p.tk + NB * vq::kThreads + NB);
  auto kernel = vq::gemv_kernel<T, VM, NB>;
  SQLLM_KERNEL_LAUNCH(kernel, grid, dim3(vq::kThreads), smem, stream, p);
  return cudaGetLastError();
}

template <class T, int VM>
cudaError_t launch_gemv_nb(const vq::GemvParams& p, int nb, cudaStream_t stream) {
  if (nb == 1) return launch_gemv<T, VM, 1>(p, stream);
  if (nb == 2) return launch_gemv<T, VM, 2>(p, stream);
  return launch_gemv<T, VM, 4>(p, stream);
}

template <class T>
cudaError_t launch_gemv_typed(const vq::GemvParams& p, int nb, cudaStream_t stream) {
  if (p.w.v <= 4) return launch_gemv_nb<T, 4>(p, nb, stream);
  if (p.w.v <= 8) return launch_gemv_nb<T, 8>(p, nb, stream);
  return launch_gemv_nb<T, 16>(p, nb, stream);
}

}  // namespace

void vq_matmul(const VqMatmulArgs& a) {
  vq::Weights w = check_weights(a.w, "vq_matmul");
  const DescribeVq ctx{a.w};
  SQLLM_CHECK(a.dtype == DType::F16 || a.dtype == DType::BF16 || a.dtype == DType::F32,
              "vq_matmul: unknown dtype ", static_cast<int>(a.dtype));
  SQLLM_CHECK(a.batch >= 0 && a.batch <= 65535LL * kVqBatchTile, "vq_matmul: batch must be in 0..",
              65535LL * kVqBatchTile, ", got ", a.batch, " (", ctx, ")");
  SQLLM_CHECK(a.x_stride == 0 || a.x_stride >= a.w.in, "vq_matmul: x row stride ", a.x_stride,
              " is smaller than in (", ctx, ")");
  if (a.batch == 0) return;
  SQLLM_CHECK(a.x != nullptr && a.y != nullptr, "vq_matmul: x and y must be device pointers, got null (",
              ctx, ", x ", vq_dtype_name(a.dtype), ")");
  vq::GemvParams p{};
  p.w = w;
  p.x = a.x;
  p.y = a.y;
  p.bias = a.bias;
  p.batch = static_cast<int>(a.batch);
  p.x_stride = a.x_stride == 0 ? a.w.in : a.x_stride;
  const int nb = a.batch == 1 ? 1 : a.batch == 2 ? 2 : kVqBatchTile;
  const int tk_max = vq::kStageFloats / nb;
  p.tk = static_cast<int>(std::min<std::int64_t>(a.w.in, tk_max));
  const auto stream = static_cast<cudaStream_t>(a.stream);
  cudaError_t err = cudaSuccess;
  switch (a.dtype) {
    case DType::F16:
      err = launch_gemv_typed<__half>(p, nb, stream);
      break;
    case DType::BF16:
      err = launch_gemv_typed<__nv_bfloat16>(p, nb, stream);
      break;
    case DType::F32:
      err = launch_gemv_typed<float>(p, nb, stream);
      break;
  }
  vq_cuda_check(err, "VQ GEMV launch", ctx);
}

void vq_dequantize(const VqDequantizeArgs& a) {
  vq::Weights w = check_weights(a.w, "vq_dequantize");
  const DescribeVq ctx{a.w};
  SQLLM_CHECK(a.dtype == DType::F16 || a.dtype == DType::BF16 || a.dtype == DType::F32,
              "vq_dequantize: unknown dtype ", static_cast<int>(a.dtype));
  SQLLM_CHECK(a.out_w != nullptr, "vq_dequantize: out_w must be a device pointer, got null (", ctx, ")");
  SQLLM_CHECK((a.w.in + vq::kDequantThreads - 1) / vq::kDequantThreads <= 65535,
              "vq_dequantize: in is too large for one launch (", ctx, ")");
  const dim3 grid(static_cast<unsigned>(w.rows),
                  static_cast<unsigned>((w.in + vq::kDequantThreads - 1) / vq::kDequantThreads));
  const auto stream = static_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case DType::F16:
      SQLLM_KERNEL_LAUNCH(vq::dequant_kernel<__half>, grid, dim3(vq::kDequantThreads), 0, stream, w,
                          static_cast<__half*>(a.out_w));
      break;
    case DType::BF16:
      SQLLM_KERNEL_LAUNCH(vq::dequant_kernel<__nv_bfloat16>, grid, dim3(vq::kDequantThreads), 0, stream, w,
                          static_cast<__nv_bfloat16*>(a.out_w));
      break;
    case DType::F32:
      SQLLM_KERNEL_LAUNCH(vq::dequant_kernel<float>, grid, dim3(vq::kDequantThreads), 0, stream, w,
                          static_cast<float*>(a.out_w));
      break;
  }
  vq_cuda_check(cudaGetLastError(), "VQ dequantize launch", ctx);
}

}  // namespace cuda
}  // namespace sqllm
