// lut_kernels.cuh -- the CUDA LUT kernels: one templated implementation each
// of the fast GEMV, the reproducible ("exact") matmul and the dequantizer.
// Internal to the sqllm_cuda library (included by the .cu files only).
//
// Fast kernel (batch <= 16, bits 2/3/4, fp16/bf16/fp32, row or column grouping)
// -----------------------------------------------------------------------
// Memory bound: every code word is read once for all batch rows.
//   * A block has NW warps; warp w owns R consecutive output rows.  The codes
//     of a row form 32-code chunks of BITS words (packing.hpp).  In step g,
//     lane l decodes chunk l + 32 g of each of its R rows; the warp's loads of
//     a step cover 32*BITS consecutive words per row (coalesced), and the
//     next step's words are prefetched into registers.
//   * x is staged per tile of tk columns (multiple of 1024) in shared memory
//     as fp32, zero-padded past `in` and past `batch`, laid out so that the
//     32 lanes of a warp read consecutive float4s (no bank conflicts):
//       NB <= 2: float4 = 4 consecutive columns of one batch row,
//                index ((q * NB + b) * ct + cl), q = column/4 within the chunk;
//       NB >= 4: float4 = one column of 4 batch rows,
//                index ((j * NB/4 + bq) * ct + cl), j = column within the chunk;
//     where ct = tk / 32 and cl = chunk index within the tile.
//   * Row grouping: the K-entry tables of the warp's R rows live in shared
//     memory; the lanes of a warp index the same K <= 16 consecutive floats,
//     which never conflicts.  Column grouping: the tile's tables are staged as
//     tab[(j * K + k) * ct + cl], so lanes read consecutive words.
//   * Each lane accumulates R x NB fp32 sums with FMAs; the CSR entries of
//     row o are walked by the warp owning row o (lane-strided) into the same
//     sums; a shfl_xor butterfly reduces them and the result is rounded once
//     to the output type.
//
// Exact kernel (any bits, fp16/bf16/fp32, every precision mode)
// -------------------------------------------------------------
// One warp per output row, looping over the batch; the summation order is the
// one documented in sqllm/reference/lut_matmul_precision.hpp and the
// arithmetic is the policy object of sqllm/float_emu.hpp, so results equal the
// CPU reference bit for bit.  Compiled without --use_fast_math: no FTZ, no
// approximate division; __fmul_rn/__fadd_rn keep the FP32 policy from being
// contracted into FMAs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "sqllm/dispatch.hpp"
#include "sqllm/float_emu.hpp"
#include "sqllm/packing.hpp"
#include "sqllm_cuda.h"

// Kernel launches and dynamic shared memory go through these two macros so
// that the same sources also compile as plain C++ against the host emulator
// in cuda/emulation (the CPU-side tests of these kernels, see
// tests/cpp/cuda_emulation).
#if defined(SQLLM_CUDA_EMULATION)
#define SQLLM_KERNEL_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::sqllm_emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#define SQLLM_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::sqllm_emu::dynamic_shared())
#else
#define SQLLM_KERNEL_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define SQLLM_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace sqllm {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxDevices = 64;

// ---------------------------------------------------------------------------
// Activation types.
// ---------------------------------------------------------------------------
template <class T>
struct Act;
template <>
struct Act<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(__ldg(p)); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float f) { return __float2half_rn(f); }
};
template <>
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
    return __bfloat162float(__ldg(p));
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float f) {
    return __float2bfloat16_rn(f);
  }
};
template <>
struct Act<float> {
  static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float f) { return f; }
};

// ---------------------------------------------------------------------------
// Fast kernel.
// ---------------------------------------------------------------------------

/// Warps per block and rows per warp of the fast kernel for a batch tile NB
/// (the one tuning table; host and device read it).
__host__ __device__ constexpr int fast_warps(int nb) { return nb <= 2 ? 8 : 4; }
__host__ __device__ constexpr int fast_rows(int nb) { return nb <= 2 ? 2 : 4; }

/// Columns per shared-memory tile: a multiple of 1024 (one 32-code chunk per
/// lane per step), at most what a 64 KiB budget allows, at least 1024.
inline int fast_tile_columns(std::int64_t in, int nb, bool col, int K) {
  const std::int64_t need = (in + 1023) / 1024 * 1024;
  const std::int64_t per_col = 4 * nb + (col ? 4 * K : 0);
  std::int64_t tk = (64 * 1024 / per_col) / 1024 * 1024;
  if (tk < 1024) tk = 1024;
  return static_cast<int>(tk < need ? tk : need);
}

/// Dynamic shared memory of the fast kernel.
inline std::size_t fast_smem_bytes(int nb, bool col, int K, int tk) {
  const std::size_t x_bytes = static_cast<std::size_t>(nb) * tk * 4;
  const std::size_t t_bytes = col ? static_cast<std::size_t>(K) * tk * 4
                                  : static_cast<std::size_t>(fast_warps(nb)) * fast_rows(nb) * K * 4;
  return x_bytes + t_bytes;
}

struct FastParams {
  const void* x;
  void* y;
  std::int64_t x_stride;  // elements between batch rows of x
  std::int64_t y_stride;  // elements between batch rows of y
  int batch;              // valid batch rows in this launch (<= NB)
  int in, out, words;     // words = packed_words(in, BITS)
  const std::uint32_t* codes;
  const float* tables;
  const std::int32_t* row_ptr;  // null: no sparse part
  const std::int32_t* col_idx;
  const __half* values;
  std::int64_t nnz;
  int tk;  // fast_tile_columns(...)
};

/// Code j (compile-time after unrolling) of a 32-code chunk held in BITS words.
template <int BITS>
__device__ __forceinline__ std::uint32_t extract_code(const std::uint32_t* w, int j) {
  const int bit = j * BITS;
  const int wi = bit >> 5;
  const int off = bit & 31;
  std::uint32_t v;
  if (off + BITS <= 32) {
    v = w[wi] >> off;
  } else {
    v = __funnelshift_r(w[wi], w[wi + 1], off);
  }
  return v & ((1u << BITS) - 1u);
}

/// The end shared by both fast kernels: the warp owning rows row0 .. row0+R-1
/// adds their CSR entries (lane-strided) into its sums, reduces each sum over
/// the warp with a butterfly and stores it, rounded once to T.
template <class T, int R, int NB>
__device__ __forceinline__ void sparse_reduce_store(const FastParams& p, float (&acc)[R][NB], int row0,
                                                    int lane) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  if (p.row_ptr != nullptr) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int o = row0 + r;
      if (o < p.out) {
        const std::int64_t k0 = __ldg(p.row_ptr + o);
        std::int64_t k1 = __ldg(p.row_ptr + o + 1);
        if (k1 > p.nnz) k1 = p.nnz;
        for (std::int64_t k = k0 + lane; k < k1; k += 32) {
          const int col = __ldg(p.col_idx + k);
          if (col >= 0 && col < p.in) {
            const float v = __half2float(__ldg(p.values + k));
#pragma unroll
            for (int b = 0; b < NB; ++b) {
              if (b < p.batch) acc[r][b] = fmaf(v, Act<T>::load(x + b * p.x_stride + col), acc[r][b]);
            }
          }
        }
      }
    }
  }

  // ---- reduce across the warp and store ----
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float v = acc[r][b];
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
      const int o = row0 + r;
      if (lane == ((r * NB + b) & 31) && o < p.out && b < p.batch) {
        static_cast<T*>(p.y)[b * p.y_stride + o] = Act<T>::from_float(v);
      }
    }
  }
}

template <int BITS, class T, bool COL, int NB>
__global__ void __launch_bounds__(fast_warps(NB) * 32)
    lut_gemv_fast_kernel(const FastParams p) {
  constexpr int NW = fast_warps(NB);
  constexpr int R = fast_rows(NB);
  constexpr int K = 1 << BITS;
  constexpr int NT = NW * 32;
  constexpr bool BQ = NB >= 4;  // float4 of x = 4 batch rows of one column
  static_assert(!BQ || NB % 4 == 0, "batch tile must be 1, 2 or a multiple of 4");

  SQLLM_DYNAMIC_SHARED(float4, fast_smem);
  float4* xs = fast_smem;  // NB * tk floats
  float* tab = reinterpret_cast<float*>(fast_smem) + static_cast<std::size_t>(NB) * p.tk;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int ct = p.tk >> 5;
  const int block_row0 = blockIdx.x * NW * R;
  const int row0 = block_row0 + warp * R;

  // Row grouping: the block's row tables (rows past `out` are clamped; their
  // results are never stored).
  if constexpr (!COL) {
    for (int t = threadIdx.x; t < NW * R * K; t += NT) {
      const int o = min(block_row0 + t / K, p.out - 1);
      tab[t] = __ldg(p.tables + static_cast<std::int64_t>(o) * K + (t % K));
    }
  }

  const std::uint32_t* crow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    crow[r] = p.codes + static_cast<std::int64_t>(min(row0 + r, p.out - 1)) * p.words;
  }

  const int nchunks = (p.in + 31) >> 5;
  const int full = p.in >> 5;
  const int nsteps = (nchunks + 31) >> 5;
  const int spt = ct >> 5;  // steps per tile

  auto load_chunk = [&](std::uint32_t (&w)[R][BITS], int c) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int k = 0; k < BITS; ++k) {
        const int idx = c * BITS + k;
        w[r][k] = (c < nchunks && idx < p.words) ? __ldg(crow[r] + idx) : 0u;
      }
    }
  };
  auto xval = [&](int b, int i) -> float {
    return (b < p.batch && i < p.in) ? Act<T>::load(x + b * p.x_stride + i) : 0.0f;
  };

  float acc[R][NB];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = 0.0f;
  }

  std::uint32_t wc[R][BITS];
  load_chunk(wc, lane);

  // Decode one full 32-code chunk of each of the R rows held in wc and
  // accumulate (fully unrolled: code positions are compile-time constants).
  const float* lut = tab + warp * R * K;
  auto chunk = [&](int cl) {
    [[maybe_unused]] float4 quad[BQ ? 1 : NB];  // NB <= 2: the current 4 columns per batch row
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      float xj[NB];
      if constexpr (!BQ) {
        if ((j & 3) == 0) {
#pragma unroll
          for (int b = 0; b < NB; ++b) quad[b] = xs[((j >> 2) * NB + b) * ct + cl];
        }
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const float4 q4 = quad[b];
          xj[b] = (j & 3) == 0 ? q4.x : (j & 3) == 1 ? q4.y : (j & 3) == 2 ? q4.z : q4.w;
        }
      } else {
#pragma unroll
        for (int bq = 0; bq < NB / 4; ++bq) {
          const float4 q4 = xs[(j * (NB / 4) + bq) * ct + cl];
          xj[4 * bq + 0] = q4.x;
          xj[4 * bq + 1] = q4.y;
          xj[4 * bq + 2] = q4.z;
          xj[4 * bq + 3] = q4.w;
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int code = static_cast<int>(extract_code<BITS>(wc[r], j));
        float w;
        if constexpr (COL) {
          w = tab[(j * K + code) * ct + cl];
        } else {
          w = lut[r * K + code];
        }
#pragma unroll
        for (int b = 0; b < NB; ++b) acc[r][b] = fmaf(w, xj[b], acc[r][b]);
      }
    }
  };
  // The last, partial chunk (nvalid < 32 codes): a compact loop that reads the
  // codes again through get_code, so that padding codes are never used (their
  // table entries need not be finite).
  auto tail_chunk = [&](int cl, int c, int nvalid) {
    const float* xf = reinterpret_cast<const float*>(xs);
#pragma unroll 1
    for (int j = 0; j < nvalid; ++j) {
      float xj[NB];
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        xj[b] = BQ ? xf[((j * (NB / 4) + b / 4) * ct + cl) * 4 + (b & 3)]
                   : xf[(((j >> 2) * NB + b) * ct + cl) * 4 + (j & 3)];
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int code = static_cast<int>(get_code(crow[r], static_cast<std::size_t>(32 * c + j), BITS));
        const float w = COL ? tab[(j * K + code) * ct + cl] : lut[r * K + code];
#pragma unroll
        for (int b = 0; b < NB; ++b) acc[r][b] = fmaf(w, xj[b], acc[r][b]);
      }
    }
  };

  int g = 0;
  for (int i0 = 0; i0 < p.in; i0 += p.tk) {
    // ---- stage the x tile (and the column tables) ----
    __syncthreads();
    const int n4 = NB * 8 * ct;
    for (int e = threadIdx.x; e < n4; e += NT) {
      const int cl = e % ct;
      const int rest = e / ct;
      float4 v;
      if constexpr (!BQ) {
        const int b = rest % NB;
        const int i = i0 + 32 * cl + 4 * (rest / NB);
        v = make_float4(xval(b, i), xval(b, i + 1), xval(b, i + 2), xval(b, i + 3));
      } else {
        constexpr int NQ = NB / 4;
        const int b = 4 * (rest % NQ);
        const int i = i0 + 32 * cl + rest / NQ;
        v = make_float4(xval(b, i), xval(b + 1, i), xval(b + 2, i), xval(b + 3, i));
      }
      xs[e] = v;
    }
    if constexpr (COL) {
      for (int e = threadIdx.x; e < K * p.tk; e += NT) {
        const int cl = e % ct;
        const int rest = e / ct;
        const int i = i0 + 32 * cl + rest / K;
        tab[e] = i < p.in ? __ldg(p.tables + static_cast<std::int64_t>(i) * K + (rest % K)) : 0.0f;
      }
    }
    __syncthreads();

    // ---- this tile's chunks ----
    for (int s = 0; s < spt && g < nsteps; ++s, ++g) {
      const int c = lane + 32 * g;  // global chunk index
      const int cl = lane + 32 * s;  // chunk index within the tile
      std::uint32_t wn[R][BITS];
      load_chunk(wn, c + 32);  // prefetch the next step
      if (c < full) {
        chunk(cl);
      } else if (c < nchunks) {
        tail_chunk(cl, c, p.in - 32 * c);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < BITS; ++k) wc[r][k] = wn[r][k];
      }
    }
  }

  sparse_reduce_store<T, R, NB>(p, acc, row0, lane);
}

// ---------------------------------------------------------------------------
// Warp kernel: the fast GEMV for row grouping when in % 32 == 0 and x rows
// are 16-byte aligned (every LLM layer).  Profiling the tiled kernel above on
// an H200 showed it bound by instruction issue, about 10 instructions per
// code (shared-memory staging of x, table addresses relative to a per-warp
// base), not by DRAM.  Here a block is one warp owning WR rows:
//   * the rows' tables sit at the start of dynamic shared memory, so a
//     table read is one LDS at a constant offset from the code;
//   * x is not staged: lane l reads the 32 columns of its chunk straight
//     from global memory with 16-byte loads (all warps of an SM read the same
//     x, so these hit L1), converts them once and uses them for all WR rows;
//   * the chunk order, the per-lane FMA chain, the CSR walk and the butterfly
//     are those of the tiled kernel, so both have the same error bound.
// Batch rows: tiles of WNB <= 8 (the host launches ceil(batch / 8) times).
// ---------------------------------------------------------------------------
__host__ __device__ constexpr int warp_rows(int nb) { return nb <= 4 ? 2 : 1; }
constexpr int kWarpMaxBatch = 8;

/// 16-byte vector of activations converted to float.
template <class T>
__device__ __forceinline__ void load_vec16(const T* p, float (&v)[16 / sizeof(T)]) {
  constexpr int N = 16 / sizeof(T);
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  T t[N];
  static_assert(sizeof(t) == sizeof(raw), "16-byte vector");
  memcpy(t, &raw, sizeof(raw));
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = Act<T>::to_float(t[k]);
}

template <int BITS, class T, int NB>
__global__ void __launch_bounds__(32) lut_gemv_warp_kernel(const FastParams p) {
  constexpr int R = warp_rows(NB);
  constexpr int K = 1 << BITS;
  constexpr int VN = 16 / static_cast<int>(sizeof(T));  // x values per 16-byte load

  SQLLM_DYNAMIC_SHARED(float4, warp_smem);
  float* lut = reinterpret_cast<float*>(warp_smem);  // R * K floats
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int lane = static_cast<int>(threadIdx.x);
  const int row0 = static_cast<int>(blockIdx.x) * R;

  for (int t = lane; t < R * K; t += 32) {
    const int o = min(row0 + t / K, p.out - 1);
    lut[t] = __ldg(p.tables + static_cast<std::int64_t>(o) * K + (t % K));
  }
  __syncthreads();

  // Pointers advance by one step (32 chunks) per iteration: no 64-bit index
  // arithmetic per load.  cp[r] points at this lane's current chunk of row r.
  const int nchunks = p.in >> 5;  // in % 32 == 0
  const std::uint32_t* cp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    cp[r] = p.codes + static_cast<std::int64_t>(min(row0 + r, p.out - 1)) * p.words + lane * BITS;
  }
  const T* xp = x + 32 * lane;
  auto load_chunk = [&](std::uint32_t (&w)[R][BITS], bool valid, int ahead) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int k = 0; k < BITS; ++k) w[r][k] = valid ? __ldg(cp[r] + ahead + k) : 0u;
    }
  };

  float acc[R][NB];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = 0.0f;
  }
  std::uint32_t wc[R][BITS];
  load_chunk(wc, lane < nchunks, 0);
  for (int c = lane; c < nchunks; c += 32) {
    std::uint32_t wn[R][BITS];
    load_chunk(wn, c + 32 < nchunks, 32 * BITS);  // prefetch the next chunk of this lane
#pragma unroll
    for (int q = 0; q < 32 / VN; ++q) {
      float xv[NB][VN];
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        if (b < p.batch) {
          load_vec16<T>(xp + b * p.x_stride + VN * q, xv[b]);
        } else {
#pragma unroll
          for (int k = 0; k < VN; ++k) xv[b][k] = 0.0f;
        }
      }
#pragma unroll
      for (int jj = 0; jj < VN; ++jj) {
        const int j = q * VN + jj;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float w = lut[r * K + static_cast<int>(extract_code<BITS>(wc[r], j))];
#pragma unroll
          for (int b = 0; b < NB; ++b) acc[r][b] = fmaf(w, xv[b][jj], acc[r][b]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      cp[r] += 32 * BITS;
#pragma unroll
      for (int k = 0; k < BITS; ++k) wc[r][k] = wn[r][k];
    }
    xp += 32 * 32;
  }

  sparse_reduce_store<T, R, NB>(p, acc, row0, lane);
}

template <int BITS, class T, int NB>
cudaError_t launch_warp(const FastParams& p, cudaStream_t stream) {
  constexpr int R = warp_rows(NB);
  auto kernel = lut_gemv_warp_kernel<BITS, T, NB>;
  const unsigned grid = static_cast<unsigned>((p.out + R - 1) / R);
  SQLLM_KERNEL_LAUNCH(kernel, grid, 32, static_cast<std::size_t>(R) * (1 << BITS) * sizeof(float), stream, p);
  return cudaGetLastError();
}

template <int BITS, class T>
cudaError_t launch_warp_tile(const FastParams& p, int nb, cudaStream_t stream) {
  switch (nb) {
    case 1:
      return launch_warp<BITS, T, 1>(p, stream);
    case 2:
      return launch_warp<BITS, T, 2>(p, stream);
    case 4:
      return launch_warp<BITS, T, 4>(p, stream);
    case 8:
      return launch_warp<BITS, T, 8>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

/// Per-width entry point of the warp kernel (instantiated in lut_fast_b<BITS>.cu).
template <int BITS>
cudaError_t launch_warp_bits(const FastParams& p, DType dtype, int nb, cudaStream_t stream);
template <>
cudaError_t launch_warp_bits<2>(const FastParams&, DType, int, cudaStream_t);
template <>
cudaError_t launch_warp_bits<3>(const FastParams&, DType, int, cudaStream_t);
template <>
cudaError_t launch_warp_bits<4>(const FastParams&, DType, int, cudaStream_t);

/// Launch one fast-kernel instantiation (smem from fast_smem_bytes).
template <int BITS, class T, bool COL, int NB>
cudaError_t launch_fast(const FastParams& p, std::size_t smem, cudaStream_t stream) {
  auto kernel = lut_gemv_fast_kernel<BITS, T, COL, NB>;
  if (smem > 48 * 1024) {
    // Raise the dynamic shared memory limit once per device and size (so that
    // steady-state calls, e.g. inside CUDA graph capture, make no such call).
    static std::atomic<int> granted[kMaxDevices] = {};
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    const bool cached = dev >= 0 && dev < kMaxDevices;
    if (!cached || granted[dev].load(std::memory_order_relaxed) < static_cast<int>(smem)) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
      if (e != cudaSuccess) return e;
      if (cached) granted[dev].store(static_cast<int>(smem), std::memory_order_relaxed);
    }
  }
  constexpr int rows_per_block = fast_warps(NB) * fast_rows(NB);
  const unsigned grid = static_cast<unsigned>((p.out + rows_per_block - 1) / rows_per_block);
  SQLLM_KERNEL_LAUNCH(kernel, grid, fast_warps(NB) * 32, smem, stream, p);
  return cudaGetLastError();
}

/// The per-width entry point (explicitly instantiated in lut_fast_b<BITS>.cu):
/// dispatches activation type, grouping and batch tile.
template <int BITS>
cudaError_t launch_fast_bits(const FastParams& p, DType dtype, bool col, int nb, std::size_t smem,
                             cudaStream_t stream);
template <>
cudaError_t launch_fast_bits<2>(const FastParams&, DType, bool, int, std::size_t, cudaStream_t);
template <>
cudaError_t launch_fast_bits<3>(const FastParams&, DType, bool, int, std::size_t, cudaStream_t);
template <>
cudaError_t launch_fast_bits<4>(const FastParams&, DType, bool, int, std::size_t, cudaStream_t);

/// The fast kernel's widths; the one switch over them (default: throws).
#define SQLLM_DISPATCH_FAST_BITS(bits, NAME, ...)                                           \
  switch (bits) {                                                                           \
    SQLLM_BITS_CASE(2, NAME, __VA_ARGS__)                                                   \
    SQLLM_BITS_CASE(3, NAME, __VA_ARGS__)                                                   \
    SQLLM_BITS_CASE(4, NAME, __VA_ARGS__)                                                   \
    default:                                                                                \
      throw ::sqllm::Error(::sqllm::detail::concat("unsupported bits=", (bits),             \
                                                   " for the fast CUDA kernel (supported: 2, 3, 4)")); \
  }

template <int BITS, class T, bool COL>
cudaError_t launch_fast_tile(const FastParams& p, int nb, std::size_t smem, cudaStream_t stream) {
  switch (nb) {
    case 1:
      return launch_fast<BITS, T, COL, 1>(p, smem, stream);
    case 2:
      return launch_fast<BITS, T, COL, 2>(p, smem, stream);
    case 4:
      return launch_fast<BITS, T, COL, 4>(p, smem, stream);
    case 8:
      return launch_fast<BITS, T, COL, 8>(p, smem, stream);
    case 16:
      return launch_fast<BITS, T, COL, 16>(p, smem, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <int BITS, class T>
cudaError_t launch_fast_grouping(const FastParams& p, bool col, int nb, std::size_t smem, cudaStream_t stream) {
  return col ? launch_fast_tile<BITS, T, true>(p, nb, smem, stream)
             : launch_fast_tile<BITS, T, false>(p, nb, smem, stream);
}

#define SQLLM_DEFINE_LAUNCH_FAST_BITS(BITS)                                                       \
  template <>                                                                                     \
  cudaError_t launch_warp_bits<BITS>(const FastParams& p, DType dtype, int nb, cudaStream_t stream) { \
    switch (dtype) {                                                                              \
      case DType::F16:                                                                            \
        return launch_warp_tile<BITS, __half>(p, nb, stream);                                     \
      case DType::BF16:                                                                           \
        return launch_warp_tile<BITS, __nv_bfloat16>(p, nb, stream);                              \
      case DType::F32:                                                                            \
        return launch_warp_tile<BITS, float>(p, nb, stream);                                      \
    }                                                                                             \
    return cudaErrorInvalidValue;                                                                 \
  }                                                                                               \
  template <>                                                                                     \
  cudaError_t launch_fast_bits<BITS>(const FastParams& p, DType dtype, bool col, int nb,          \
                                     std::size_t smem, cudaStream_t stream) {                     \
    switch (dtype) {                                                                              \
      case DType::F16:                                                                            \
        return launch_fast_grouping<BITS, __half>(p, col, nb, smem, stream);                      \
      case DType::BF16:                                                                           \
        return launch_fast_grouping<BITS, __nv_bfloat16>(p, col, nb, smem, stream);               \
      case DType::F32:                                                                            \
        return launch_fast_grouping<BITS, float>(p, col, nb, smem, stream);                       \
    }                                                                                             \
    return cudaErrorInvalidValue;                                                                 \
  }

// ---------------------------------------------------------------------------
// Exact kernel.
// ---------------------------------------------------------------------------
struct ExactParams {
  const void* x;
  void* y;
  std::int64_t x_stride, batch;
  std::int64_t in, out, words;
  int bits;
  bool col;
  const std::uint32_t* codes;
  const float* tables;
  const std::int32_t* row_ptr;
  const std::int32_t* col_idx;
  const __half* values;
  std::int64_t nnz;
};

constexpr int kExactWarps = 8;

template <class T, class Arith>
__global__ void __launch_bounds__(kExactWarps * 32)
    lut_matmul_exact_kernel(const ExactParams p, const Arith ar) {
  const std::int64_t o = static_cast<std::int64_t>(blockIdx.x) * kExactWarps + (threadIdx.x >> 5);
  if (o >= p.out) return;  // whole warps exit; no block-wide barrier below
  const int lane = threadIdx.x & 31;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const std::uint32_t* crow = p.codes + o * p.words;
  const std::int64_t K = std::int64_t{1} << p.bits;
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const T* xr = x + b * p.x_stride;
    float acc = 0.0f;
    for (std::int64_t i = lane; i < p.in; i += 32) {
      const std::uint32_t code = get_code(crow, static_cast<std::size_t>(i), p.bits);
      const float w = __ldg(p.tables + (p.col ? i : o) * K + code);
      acc = ar.add(acc, ar.mul(ar.operand(w), ar.operand(Act<T>::load(xr + i))));
    }
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) acc = ar.add(acc, __shfl_xor_sync(kFullMask, acc, off));
    if (lane == 0) {
      if (p.row_ptr != nullptr) {
        const std::int64_t k0 = __ldg(p.row_ptr + o);
        std::int64_t k1 = __ldg(p.row_ptr + o + 1);
        if (k1 > p.nnz) k1 = p.nnz;
        for (std::int64_t k = k0; k < k1; ++k) {
          const int col = __ldg(p.col_idx + k);
          if (col < 0 || col >= p.in) continue;
          const float v = __half2float(__ldg(p.values + k));
          acc = ar.add(acc, ar.mul(ar.operand(v), ar.operand(Act<T>::load(xr + col))));
        }
      }
      static_cast<T*>(p.y)[b * p.out + o] = Act<T>::from_float(acc);
    }
  }
}

// ---------------------------------------------------------------------------
// Dequantize: W[o, i] = table value, 8 consecutive outputs per thread.
// ---------------------------------------------------------------------------
struct DequantParams {
  const std::uint32_t* codes;
  const float* tables;
  std::int64_t in, out, words;
  int bits;
  bool col;
  bool vec;  // in % 8 == 0 and w 16-byte aligned: 16-byte stores
  const std::int32_t* row_ptr;
  const std::int32_t* col_idx;
  const __half* values;
  std::int64_t nnz;
  void* w;
};

template <class T>
__global__ void dequantize_kernel(const DequantParams p) {
  const std::int64_t groups = (p.in + 7) / 8;
  const std::int64_t total = p.out * groups;
  const std::int64_t K = std::int64_t{1} << p.bits;
  T* w = static_cast<T*>(p.w);
  for (std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t o = t / groups;
    const std::int64_t i0 = (t - o * groups) * 8;
    const std::uint32_t* crow = p.codes + o * p.words;
    alignas(16) T v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const std::int64_t i = i0 + k;
      float f = 0.0f;
      if (i < p.in) {
        const std::uint32_t code = get_code(crow, static_cast<std::size_t>(i), p.bits);
        f = __ldg(p.tables + (p.col ? i : o) * K + code);
      }
      v[k] = Act<T>::from_float(f);
    }
    T* dst = w + o * p.in + i0;
    if (p.vec) {
#pragma unroll
      for (int k = 0; k < static_cast<int>(sizeof(T)) / 2; ++k) {
        reinterpret_cast<uint4*>(dst)[k] = reinterpret_cast<const uint4*>(v)[k];
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (i0 + k < p.in) dst[k] = v[k];
      }
    }
  }
}

/// Adds the CSR part into W (after dequantize_kernel on the same stream): one
/// thread per row; a run of equal adjacent column indices is summed in fp32
/// with the dense value and rounded once.
template <class T>
__global__ void dequantize_sparse_kernel(const DequantParams p) {
  const std::int64_t o = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= p.out) return;
  const std::int64_t K = std::int64_t{1} << p.bits;
  const std::uint32_t* crow = p.codes + o * p.words;
  T* w = static_cast<T*>(p.w) + o * p.in;
  std::int64_t k = p.row_ptr[o];
  std::int64_t k1 = p.row_ptr[o + 1];
  if (k1 > p.nnz) k1 = p.nnz;
  while (k < k1) {
    const int col = p.col_idx[k];
    float s = 0.0f;
    std::int64_t k2 = k;
    while (k2 < k1 && p.col_idx[k2] == col) {
      s += __half2float(p.values[k2]);
      ++k2;
    }
    if (col >= 0 && col < p.in) {
      const std::uint32_t code = get_code(crow, static_cast<std::size_t>(col), p.bits);
      const float dense = p.tables[(p.col ? static_cast<std::int64_t>(col) : o) * K + code];
      w[col] = Act<T>::from_float(dense + s);
    }
    k = k2;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace sqllm
