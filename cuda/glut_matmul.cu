// glut_matmul.cu -- the CUDA kernels of the grouped-lookup-table ("glut")
// format and their host side (sqllm_cuda_glut.h).
//
// GEMV (small batches)
// --------------------
// A block has kWarps warps; warp w owns output row o = blockIdx.x * kWarps + w,
// blockIdx.y picks a tile of NB (1, 2, 4 or 8) batch rows.  The 32 codes
// 32c .. 32c+31 of a row (a "chunk") fill exactly BITS words (packing.hpp), so
// lane l takes the chunks l, l + 32, ... of the row: it loads the chunk's BITS
// words (adjacent lanes read adjacent runs of words), decodes the 32 codes in
// registers (decode32), and for each code gathers the uint8 table entry
// (__ldg: a row's tables are a few hundred bytes, L1 resident), decodes it
// with glut_entry(q, scale, offset) -- the fp32 FMA of the CPU path, scale and
// offset of the current group held in registers -- and accumulates NB fp32
// sums with FMAs.  When group_size is a multiple of 32 (ALIGNED) a chunk lies
// in one group: one scale/offset load per chunk; otherwise the lane steps to
// the next group where a group boundary falls inside the chunk.  The
// activation is staged per tile of tk columns (a multiple of 32) in shared
// memory as fp32, zero past `in` and past `batch`, transposed so that the 32
// lanes reading position k of their chunks hit 32 consecutive words:
//   xs[(k * NB + b) * pitch + cl]  for column t0 + 32 cl + k of batch row b,
// pitch = tk / 32 + 1 (odd for the staging writes).  A shfl_xor butterfly
// reduces each sum over the warp; lane 0 rounds it once to the output type.
// Past the last code of a row the words are not read (zero), and the codes
// there meet x = 0.  The kernel is a template on (BITS, NB, ALIGNED) only --
// 64 instantiations; the activation type is a run-time switch in the staging
// loop and the final store, which touch x and y once.  `#pragma unroll` is
// nvcc's; the emulator's g++ ignores it (compile time over host speed).
//
// Error: every output is an fp32 sum, in some order, of the `in` exact
// products x * Ŵ (FMAs), so |y - sum x Ŵ| <= gamma(in) * sum |x Ŵ| before the
// rounding to the output type, gamma(n) = n u / (1 - n u), u = 2^-24
// (tests/cpp/cuda_emulation/test_glut_cuda_emulated.cpp).
//
// Dequantize
// ----------
// One thread per weight (blockIdx.x = row, coalesced writes): code, table
// byte, glut_entry in fp32 -- the CPU glut_dequantize bit for bit -- rounded
// once to the output type.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <ostream>

#include "lut_kernels.cuh"
#include "sqllm/dispatch.hpp"
#include "sqllm/error.hpp"
#include "sqllm/format/glut.hpp"
#include "sqllm/packing.hpp"
#include "sqllm_cuda.h"
#include "sqllm_cuda_glut.h"

namespace sqllm {
namespace cuda {
namespace glut {

using detail::Act;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kDequantThreads = 256;
/// Floats of staged activation per GEMV block (NB * tk); with the padding
/// column the shared memory stays below 34 KiB (no opt-in needed).
constexpr int kStageFloats = 8192;
/// "No next group" (a column index never reached).
constexpr int kNoNext = 0x7fffffff;
/// Largest in: chunk positions i0 + 31 stay below kNoNext.
constexpr std::int64_t kMaxIn = kNoNext - 1024;

struct Layer {
  const std::uint32_t* codes;
  const std::uint8_t* tables;
  const std::uint16_t* scales;
  const std::uint16_t* offsets;
  int out, in, words, G, g;
};

struct GemvParams {
  Layer w;
  const void* x;
  void* y;
  long long x_stride;
  DType dtype;  // of x and y (a run-time switch: staging and the final store only)
  int batch;
  int tk;     // columns per staged tile (multiple of 32)
  int pitch;  // tk / 32 + 1
};

__device__ __forceinline__ float half_at(const std::uint16_t* p) {
  return __half2float(__ushort_as_half(__ldg(p)));
}

__device__ __forceinline__ float load_x(const void* x, long long k, DType d) {
  switch (d) {
    case DType::F16:
      return Act<__half>::load(static_cast<const __half*>(x) + k);
    case DType::BF16:
      return Act<__nv_bfloat16>::load(static_cast<const __nv_bfloat16*>(x) + k);
    default:
      return Act<float>::load(static_cast<const float*>(x) + k);
  }
}

__device__ __forceinline__ void store_y(void* y, long long k, DType d, float v) {
  switch (d) {
    case DType::F16:
      static_cast<__half*>(y)[k] = Act<__half>::from_float(v);
      break;
    case DType::BF16:
      static_cast<__nv_bfloat16*>(y)[k] = Act<__nv_bfloat16>::from_float(v);
      break;
    default:
      static_cast<float*>(y)[k] = v;
  }
}

/// First column of the group after group j, or a position never reached when
/// group j is the row's last.
__device__ __forceinline__ int next_group_start(int j, const Layer& w) {
  const long long n = static_cast<long long>(j + 1) * w.g;
  return n < w.in ? static_cast<int>(n) : kNoNext;
}

template <int BITS, int NB, bool ALIGNED>
__global__ void __launch_bounds__(kThreads) gemv_kernel(GemvParams p) {
  SQLLM_DYNAMIC_SHARED(float, xs);
  constexpr int K = 1 << BITS;
  const Layer& w = p.w;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int o = static_cast<int>(blockIdx.x) * kWarps + (tid >> 5);
  const int b0 = static_cast<int>(blockIdx.y) * NB;
  const int nb = min(NB, p.batch - b0);
  const int ct = p.tk >> 5;
  const int chunks = (w.in + 31) >> 5;
  const int orow = min(o, w.out - 1);  // rows past `out` only stage and synchronise
  const std::uint32_t* row = w.codes + static_cast<long long>(orow) * w.words;
  const long long tbase = static_cast<long long>(orow) * w.G;

  float acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.f;

  for (int t0 = 0; t0 < w.in; t0 += p.tk) {
    __syncthreads();  // the previous tile is consumed
    for (int jj = tid; jj < p.tk; jj += kThreads) {
      const int col = t0 + jj;
      float* dst = xs + (jj & 31) * NB * p.pitch + (jj >> 5);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        dst[b * p.pitch] =
            (b < nb && col < w.in) ? load_x(p.x, static_cast<long long>(b0 + b) * p.x_stride + col, p.dtype) : 0.f;
      }
    }
    __syncthreads();
    if (o < w.out) {
      const int c0 = t0 >> 5;
      const int c1 = min(chunks, c0 + ct);
      for (int c = c0 + lane; c < c1; c += 32) {
        std::uint32_t wd[BITS];
        const int w0 = c * BITS;
#pragma unroll
        for (int q = 0; q < BITS; ++q) wd[q] = w0 + q < w.words ? __ldg(row + w0 + q) : 0u;
        std::uint32_t code[32];
        decode32<BITS>(wd, 0, code);
        const float* xc = xs + (c - c0);
        const int i0 = c << 5;
        int j = i0 / w.g;
        const std::uint8_t* tab = w.tables + (tbase + j) * K;
        float s = half_at(w.scales + tbase + j);
        float off = half_at(w.offsets + tbase + j);
        if constexpr (ALIGNED) {  // the chunk lies in group j
#pragma unroll
          for (int k = 0; k < 32; ++k) {
            const float wt = glut_entry(__ldg(tab + code[k]), s, off);
#pragma unroll
            for (int b = 0; b < NB; ++b) acc[b] = fmaf(xc[(k * NB + b) * p.pitch], wt, acc[b]);
          }
        } else {
          int next = next_group_start(j, w);
#pragma unroll
          for (int k = 0; k < 32; ++k) {
            if (i0 + k == next) {  // a group boundary inside the chunk (before `in`)
              ++j;
              next = next_group_start(j, w);
              tab += K;
              s = half_at(w.scales + tbase + j);
              off = half_at(w.offsets + tbase + j);
            }
            const float wt = glut_entry(__ldg(tab + code[k]), s, off);
#pragma unroll
            for (int b = 0; b < NB; ++b) acc[b] = fmaf(xc[(k * NB + b) * p.pitch], wt, acc[b]);
          }
        }
      }
    }
  }
  if (o >= w.out) return;  // warp-uniform; no barrier follows
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    float v = acc[b];
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(detail::kFullMask, v, m);
    if (lane == 0 && b < nb) store_y(p.y, static_cast<long long>(b0 + b) * w.out + o, p.dtype, v);
  }
}

template <class T>
__global__ void __launch_bounds__(kDequantThreads) dequant_kernel(Layer w, int bits, T* out) {
  const int o = static_cast<int>(blockIdx.x);
  const int i = static_cast<int>(blockIdx.y) * kDequantThreads + static_cast<int>(threadIdx.x);
  if (i >= w.in) return;
  const std::uint32_t c = get_code(w.codes + static_cast<long long>(o) * w.words, static_cast<std::size_t>(i), bits);
  const long long t = static_cast<long long>(o) * w.G + i / w.g;
  const float v = glut_entry(__ldg(w.tables + (t << bits) + c), half_at(w.scales + t), half_at(w.offsets + t));
  out[static_cast<long long>(o) * w.in + i] = Act<T>::from_float(v);
}

}  // namespace glut

namespace {

const char* glut_dtype_name(DType d) {
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

struct DescribeGlut {
  const GlutView& v;
};
std::ostream& operator<<(std::ostream& os, const DescribeGlut& d) {
  return os << "W[" << d.v.out << ", " << d.v.in << "] bits=" << d.v.bits << " group_size=" << d.v.group_size;
}

void glut_cuda_check(cudaError_t e, const char* what, const DescribeGlut& ctx) {
  if (e != cudaSuccess) {
    throw RuntimeFailure(::sqllm::detail::concat("sqllm CUDA: ", what, " failed: ", cudaGetErrorName(e), " (",
                                                 cudaGetErrorString(e), ") for ", ctx));
  }
}

glut::Layer check_layer(const GlutView& v, const char* fn) {
  check_glut_layout(v);
  const DescribeGlut ctx{v};
  SQLLM_CHECK(static_cast<std::int64_t>(v.in) <= glut::kMaxIn &&
                  v.out <= static_cast<std::size_t>(std::numeric_limits<int>::max()),
              fn, ": in must be at most ", glut::kMaxIn, " and out at most 2^31-1 (", ctx, ")");
  glut::Layer d{};
  d.codes = v.qweight;
  d.tables = v.tables;
  d.scales = v.scales;
  d.offsets = v.offsets;
  d.out = static_cast<int>(v.out);
  d.in = static_cast<int>(v.in);
  d.words = static_cast<int>(v.words());
  d.G = static_cast<int>(v.groups());
  d.g = v.group_size;
  return d;
}

template <int BITS, int NB>
cudaError_t launch_gemv(const glut::GemvParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.w.out + glut::kWarps - 1) / glut::kWarps),
                  static_cast<unsigned>((p.batch + NB - 1) / NB));
  const std::size_t smem = sizeof(float) * 32 * NB * static_cast<std::size_t>(p.pitch);
  if (p.w.g % 32 == 0) {
    auto kernel = glut::gemv_kernel<BITS, NB, true>;
    SQLLM_KERNEL_LAUNCH(kernel, grid, dim3(glut::kThreads), smem, stream, p);
  } else {
    auto kernel = glut::gemv_kernel<BITS, NB, false>;
    SQLLM_KERNEL_LAUNCH(kernel, grid, dim3(glut::kThreads), smem, stream, p);
  }
  return cudaGetLastError();
}

template <int BITS>
cudaError_t launch_gemv_nb(const glut::GemvParams& p, int nb, cudaStream_t stream) {
  switch (nb) {
    case 1:
      return launch_gemv<BITS, 1>(p, stream);
    case 2:
      return launch_gemv<BITS, 2>(p, stream);
    case 4:
      return launch_gemv<BITS, 4>(p, stream);
    default:
      return launch_gemv<BITS, 8>(p, stream);
  }
}

}  // namespace

void glut_matmul(const GlutMatmulArgs& a) {
  const glut::Layer w = check_layer(a.layer, "glut_matmul");
  const DescribeGlut ctx{a.layer};
  SQLLM_CHECK(a.dtype == DType::F16 || a.dtype == DType::BF16 || a.dtype == DType::F32,
              "glut_matmul: unknown dtype ", static_cast<int>(a.dtype));
  SQLLM_CHECK(a.batch >= 0 && a.batch <= 65535LL * kGlutBatchTile, "glut_matmul: batch must be in 0..",
              65535LL * kGlutBatchTile, ", got ", a.batch, " (", ctx, ")");
  SQLLM_CHECK(a.x_stride == 0 || a.x_stride >= static_cast<std::int64_t>(a.layer.in), "glut_matmul: x row stride ",
              a.x_stride, " is smaller than in (", ctx, ")");
  if (a.batch == 0) return;
  SQLLM_CHECK(a.x != nullptr && a.y != nullptr, "glut_matmul: x and y must be device pointers, got null (", ctx,
              ", x ", glut_dtype_name(a.dtype), ")");
  const int nb = a.batch == 1 ? 1 : a.batch == 2 ? 2 : a.batch <= 4 ? 4 : kGlutBatchTile;
  glut::GemvParams p{};
  p.w = w;
  p.x = a.x;
  p.y = a.y;
  p.x_stride = a.x_stride == 0 ? static_cast<long long>(a.layer.in) : a.x_stride;
  p.batch = static_cast<int>(a.batch);
  const int chunk_cols = ((w.in + 31) / 32) * 32;
  p.tk = std::min(glut::kStageFloats / nb, chunk_cols);
  p.pitch = p.tk / 32 + 1;
  p.dtype = a.dtype;
  const auto stream = static_cast<cudaStream_t>(a.stream);
  cudaError_t err = cudaSuccess;
  SQLLM_DISPATCH_BITS(a.layer.bits, BITS, err = launch_gemv_nb<BITS>(p, nb, stream);)
  glut_cuda_check(err, "glut GEMV launch", ctx);
}

void glut_dequantize(const GlutDequantizeArgs& a) {
  const glut::Layer w = check_layer(a.layer, "glut_dequantize");
  const DescribeGlut ctx{a.layer};
  SQLLM_CHECK(a.dtype == DType::F16 || a.dtype == DType::BF16 || a.dtype == DType::F32,
              "glut_dequantize: unknown dtype ", static_cast<int>(a.dtype));
  SQLLM_CHECK(a.w != nullptr, "glut_dequantize: w must be a device pointer, got null (", ctx, ")");
  SQLLM_CHECK((w.in + glut::kDequantThreads - 1) / glut::kDequantThreads <= 65535,
              "glut_dequantize: in is too large for one launch (", ctx, ")");
  const dim3 grid(static_cast<unsigned>(w.out),
                  static_cast<unsigned>((w.in + glut::kDequantThreads - 1) / glut::kDequantThreads));
  const auto stream = static_cast<cudaStream_t>(a.stream);
  const int bits = a.layer.bits;
  switch (a.dtype) {
    case DType::F16:
      SQLLM_KERNEL_LAUNCH(glut::dequant_kernel<__half>, grid, dim3(glut::kDequantThreads), 0, stream, w, bits,
                          static_cast<__half*>(a.w));
      break;
    case DType::BF16:
      SQLLM_KERNEL_LAUNCH(glut::dequant_kernel<__nv_bfloat16>, grid, dim3(glut::kDequantThreads), 0, stream, w,
                          bits, static_cast<__nv_bfloat16*>(a.w));
      break;
    case DType::F32:
      SQLLM_KERNEL_LAUNCH(glut::dequant_kernel<float>, grid, dim3(glut::kDequantThreads), 0, stream, w, bits,
                          static_cast<float*>(a.w));
      break;
  }
  glut_cuda_check(cudaGetLastError(), "glut dequantize launch", ctx);
}

}  // namespace cuda
}  // namespace sqllm
