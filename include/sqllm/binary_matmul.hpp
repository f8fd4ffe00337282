// sqllm/binary_matmul.hpp -- the PTQ1.61 format (docs/formats.md, "ptq161") and
// its CPU matmul.
//
// A weight W (out x in) is split by a per-input-channel mask:
//
// * salient channels (mask bit set, n_sal of them): b-bit codes on per-(row,
//   group) uniform grids -- exactly the uniform format (quant/uniform.hpp) over
//   the n_sal salient columns taken in increasing channel order;
// * the other n_bin = in - n_sal channels: one sign bit each,
//
//     Ŵ[o, i_j] = r1[o] * r2[j] * (alpha[o] * s[o, j] + mu[o]),   s = ±1,
//
//   i_j the j-th unmasked channel.  alpha, mu, r1 (out) and r2 (n_bin) are fp16.
//
// Bit layouts (little-endian bit order inside a byte):
// * mask: ceil(in/8) bytes, channel i is salient iff bit (i % 8) of byte i / 8
//   is set; padding bits are zero;
// * signs: out x ceil(n_bin/8) bytes, s[o, j] = +1 iff bit (j % 8) of byte
//   j / 8 of row o is set; padding bits are zero.
//
// The binary part multiplies without materialising Ŵ: with x'_j = r2[j] x[i_j],
//
//   y_bin[o] = r1[o] * (alpha[o] * sum_j s[o, j] x'_j + mu[o] * sum_j x'_j),
//
// and sum_j s[o, j] x'_j is a sum of one table entry per byte of signs: per
// group g of 8 unmasked channels the table T_g[v] = sum_k (bit k of v ? +1 : -1)
// x'_{8g+k} (256 entries) is built once per input row, so a byte of signs is one
// lookup.  Tables hold 8 batch rows side by side (T_g[v][b]) so a lookup adds a
// short vector.  fp32 accumulate; OpenMP over batch tiles (16 rows or more) or
// output rows (smaller batches), each output summed by one thread in a fixed
// order (the result does not depend on the thread count).
//
// That is the portable (scalar) path.  ptq161_matmul picks it or an x86 SIMD
// path at run time (CpuKernel, cpu_features.hpp: the best the CPU has, or
// SQLLM_CPU_KERNEL, or the caller's choice): detail/binary_matmul_simd.hpp,
// with the rank-1 factor folded (y_bin = c1 P + c0 S, P the sum of the inputs
// whose sign bit is set), masked adds below 4 batch rows and per-8 tables over
// 8-row tiles above, and the salient codes decoded per row.  On small-integer
// data every path gives exactly the reference (tests/python/test_ptq161_kernel.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <vector>

#include "sqllm/cpu_features.hpp"
#include "sqllm/error.hpp"
#include "sqllm/half.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/quant/uniform.hpp"
#include "sqllm/uniform_matmul.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sqllm {

/// A PTQ1.61 layer's buffers (non-owning).
struct Ptq161View {
  std::size_t out = 0;
  std::size_t in = 0;
  const std::uint8_t* mask = nullptr;    ///< ceil(in/8)
  const std::uint8_t* signs = nullptr;   ///< out x ceil(n_bin/8)
  const std::uint16_t* alpha = nullptr;  ///< out, fp16 bits
  const std::uint16_t* mu = nullptr;     ///< out, fp16 bits
  const std::uint16_t* r1 = nullptr;     ///< out, fp16 bits
  const std::uint16_t* r2 = nullptr;     ///< n_bin, fp16 bits
  /// The salient part: out x n_sal (sal.in == n_sal); unused when n_sal == 0.
  UniformView sal;

  std::size_t mask_bytes() const { return (in + 7) / 8; }
  std::size_t n_sal() const {
    std::size_t n = 0;
    for (std::size_t i = 0; i < in; ++i) n += is_salient(i) ? 1 : 0;
    return n;
  }
  bool is_salient(std::size_t i) const { return (mask[i >> 3] >> (i & 7)) & 1u; }
};

inline std::size_t ptq161_sign_bytes(std::size_t n_bin) { return (n_bin + 7) / 8; }

/// Salient and binary channel indices, each in increasing order.
inline void ptq161_channels(const Ptq161View& v, std::vector<std::size_t>& sal,
                            std::vector<std::size_t>& bin) {
  sal.clear();
  bin.clear();
  for (std::size_t i = 0; i < v.in; ++i) (v.is_salient(i) ? sal : bin).push_back(i);
}

namespace detail {
inline bool finite_half(std::uint16_t h) { return (h & 0x7C00u) != 0x7C00u; }
}  // namespace detail

/// Validate a view: shapes are the caller's (bindings); here the mask/sign
/// padding bits, finite fp16 factors, and the salient uniform view.
inline void check_ptq161_view(const Ptq161View& v) {
  SQLLM_CHECK(v.in > 0 && v.out > 0, "ptq161 layer: in_features and out_features must be > 0, got in=",
              v.in, ", out=", v.out);
  SQLLM_CHECK(v.mask && v.alpha && v.mu && v.r1, "ptq161 layer: mask, alpha, mu and r1 are required");
  if (v.in % 8) {
    const unsigned pad = static_cast<unsigned>(v.mask[v.mask_bytes() - 1]) >> (v.in % 8);
    SQLLM_CHECK(pad == 0, "ptq161 layer: mask has bits set past in_features=", v.in);
  }
  const std::size_t n_sal = v.n_sal();
  const std::size_t n_bin = v.in - n_sal;
  SQLLM_CHECK(n_sal == 0 || v.sal.in == n_sal, "ptq161 layer: the mask marks ", n_sal,
              " salient channels but the salient codes cover ", v.sal.in);
  if (n_bin > 0) {
    SQLLM_CHECK(v.signs && v.r2, "ptq161 layer: signs and r2 are required when channels are binarised");
    const std::size_t sb = ptq161_sign_bytes(n_bin);
    if (n_bin % 8) {
      for (std::size_t o = 0; o < v.out; ++o) {
        const unsigned pad = static_cast<unsigned>(v.signs[o * sb + sb - 1]) >> (n_bin % 8);
        SQLLM_CHECK(pad == 0, "ptq161 layer: signs row ", o, " has bits set past its ", n_bin,
                    " binarised channels");
      }
    }
    for (std::size_t j = 0; j < n_bin; ++j)
      SQLLM_CHECK(detail::finite_half(v.r2[j]), "ptq161 layer: r2[", j, "] is not finite");
  }
  for (std::size_t o = 0; o < v.out; ++o) {
    SQLLM_CHECK(detail::finite_half(v.alpha[o]) && detail::finite_half(v.mu[o]) &&
                    detail::finite_half(v.r1[o]),
                "ptq161 layer: alpha, mu or r1 of row ", o, " is not finite");
  }
  if (n_sal > 0) {
    SQLLM_CHECK(v.sal.out == v.out, "ptq161 layer: salient codes have ", v.sal.out,
                " rows, expected out_features=", v.out);
    SQLLM_CHECK(v.sal.g_idx == nullptr, "ptq161 layer: the salient part has no g_idx");
    check_uniform_view(v.sal);
  }
}

/// Ŵ (out x in, row-major fp32).  A plain loop per weight: the reference.
inline void ptq161_dequantize(const Ptq161View& v, float* w) {
  std::vector<std::size_t> sal, bin;
  ptq161_channels(v, sal, bin);
  const std::size_t sb = ptq161_sign_bytes(bin.size());
  const std::size_t words = sal.empty() ? 0 : packed_words(sal.size(), v.sal.bits);
  const std::size_t G = sal.empty() ? 0 : v.sal.groups();
  for (std::size_t o = 0; o < v.out; ++o) {
    const float a = half_bits_to_float(v.alpha[o]), m = half_bits_to_float(v.mu[o]),
                r = half_bits_to_float(v.r1[o]);
    for (std::size_t j = 0; j < bin.size(); ++j) {
      const bool plus = (v.signs[o * sb + (j >> 3)] >> (j & 7)) & 1u;
      w[o * v.in + bin[j]] = r * half_bits_to_float(v.r2[j]) * ((plus ? a : -a) + m);
    }
    for (std::size_t k = 0; k < sal.size(); ++k) {
      const std::size_t g = v.sal.group_size < 0 ? 0 : k / static_cast<std::size_t>(v.sal.group_size);
      const float s = half_bits_to_float(v.sal.scales[o * G + g]);
      const float z = half_bits_to_float(v.sal.zeros[o * G + g]);
      const auto q = static_cast<float>(get_code(v.sal.qweight + o * words, k, v.sal.bits));
      w[o * v.in + sal[k]] = s * (q - z);
    }
  }
}

/// y = x Ŵᵀ by the plain definition (Ŵ decoded, dot products in double): the
/// scalar reference of the kernel.
inline void ptq161_matmul_reference(const Ptq161View& v, const float* x, std::size_t batch,
                                    float* y) {
  std::vector<float> w(v.out * v.in);
  ptq161_dequantize(v, w.data());
  for (std::size_t b = 0; b < batch; ++b)
    for (std::size_t o = 0; o < v.out; ++o) {
      double acc = 0.0;
      for (std::size_t i = 0; i < v.in; ++i)
        acc += static_cast<double>(w[o * v.in + i]) * static_cast<double>(x[b * v.in + i]);
      y[b * v.out + o] = static_cast<float>(acc);
    }
}

}  // namespace sqllm

// the SIMD paths (they use Ptq161View)
#include "sqllm/detail/binary_matmul_simd.hpp"

namespace sqllm {

namespace detail {

/// Batch rows per table: a lookup adds TB floats.
constexpr std::size_t kPtq161Tile = 8;

/// Build the sign tables of TB batch rows: xb holds the r2-scaled binarised inputs,
/// n8 (n_bin rounded up to 8, zero-padded) per row; T[(g*256 + v)*TB + b].
template <std::size_t TB>
void ptq161_build_tables(const float* xb, std::size_t n8, float* T) {
  const std::size_t G = n8 / 8;
  for (std::size_t g = 0; g < G; ++g) {
    float* Tg = T + g * 256 * TB;
    const std::size_t j0 = g * 8;
    for (std::size_t b = 0; b < TB; ++b) {
      float s = 0.0f;
      for (std::size_t k = 0; k < 8; ++k) s += xb[b * n8 + j0 + k];
      Tg[b] = -s;  // all signs -1
    }
    for (unsigned val = 1; val < 256; ++val) {
      const unsigned low = val & (val - 1);
      const unsigned k = static_cast<unsigned>(__builtin_ctz(val));
      float* dst = Tg + val * TB;
      const float* src = Tg + low * TB;
      for (std::size_t b = 0; b < TB; ++b) dst[b] = src[b] + 2.0f * xb[b * n8 + j0 + k];
    }
  }
}

/// Output row o of TB batch rows from the tables: y[b * y_stride + o] += ... (b < nb).
template <std::size_t TB>
inline void ptq161_lookup_row(const Ptq161View& v, std::size_t G, const float* T, const float* sums,
                              std::size_t o, float* y, std::size_t y_stride, std::size_t nb) {
  const std::uint8_t* sg = v.signs + o * G;
  float acc[TB];
  for (std::size_t b = 0; b < TB; ++b) acc[b] = 0.0f;
  for (std::size_t g = 0; g < G; ++g) {
    const float* t = T + (g * 256 + sg[g]) * TB;
#pragma omp simd
    for (std::size_t b = 0; b < TB; ++b) acc[b] += t[b];
  }
  const float a = half_bits_to_float(v.alpha[o]), m = half_bits_to_float(v.mu[o]),
              r = half_bits_to_float(v.r1[o]);
  for (std::size_t b = 0; b < nb; ++b) y[b * y_stride + o] += r * (a * acc[b] + m * sums[b]);
}

/// Gather rows [b0, b0 + nb) of x into xb (r2-scaled binarised inputs, n8 per row, rows
/// nb..TB-1 and the padding zero) and their sums.
inline void ptq161_gather(const float* x, std::size_t in, const std::vector<std::size_t>& bin,
                          const std::vector<float>& r2, std::size_t b0, std::size_t nb,
                          std::size_t tb, std::size_t n8, float* xb, float* sums) {
  std::fill(xb, xb + tb * n8, 0.0f);
  for (std::size_t b = 0; b < tb; ++b) sums[b] = 0.0f;
  for (std::size_t b = 0; b < nb; ++b) {
    const float* xr = x + (b0 + b) * in;
    float s = 0.0f;
    for (std::size_t j = 0; j < bin.size(); ++j) {
      const float xv = r2[j] * xr[bin[j]];
      xb[b * n8 + j] = xv;
      s += xv;
    }
    sums[b] = s;
  }
}

#if defined(SQLLM_X86_SIMD)
/// Work (out * in * batch) below which a call runs on one thread.
constexpr std::size_t kPtq161ParallelWork = std::size_t{1} << 20;

/// fp16 bits -> float for the x86 paths (F16C where the CPU has it; the same values).
inline void ptq161_halves(const std::uint16_t* h, std::size_t n, std::vector<float>& f) {
  f.resize(n);
  static const bool f16c = __builtin_cpu_supports("f16c");
  if (f16c) return ptq161_x86::halves_to_floats_f16c(h, n, f.data());
  for (std::size_t i = 0; i < n; ++i) f[i] = half_bits_to_float(h[i]);
}

/// S and the salient group sums of the 8 rows of the tile at b0, transposed (zero past the batch).
inline void ptq161_tile_sums(const Ptq161Prep& p, std::size_t b0, float* ST, std::vector<float>& gsT) {
  gsT.assign(std::max<std::size_t>(p.sgroups, 1) * 8, 0.0f);
  for (std::size_t b = 0; b < 8; ++b) {
    ST[b] = b0 + b < p.batch ? p.S[b0 + b] : 0.0f;
    for (std::size_t g = 0; g < p.sgroups; ++g) gsT[g * 8 + b] = p.gsum[(b0 + b) * p.sgroups + g];
  }
}

/// The AVX2 / AVX-512 matmul (detail/binary_matmul_simd.hpp); the view is valid.
template <bool AVX512>
void ptq161_matmul_x86(const Ptq161View& v, const float* x, std::size_t batch, float* y, int nt) {
  namespace K = ptq161_x86;
  std::vector<std::size_t> sal, bin;
  ptq161_channels(v, sal, bin);
  Ptq161Prep p;
  p.batch = batch;
  p.out = v.out;
  p.n_bin = bin.size();
  p.n_sal = sal.size();
  p.sb = ptq161_sign_bytes(p.n_bin);
  p.nbp = (p.n_bin + 15) / 16 * 16;
  p.nsp = (p.n_sal + 31) / 32 * 32;
  p.sgroups = p.n_sal ? v.sal.groups() : 0;
  p.gsize = v.sal.group_size < 0 ? p.nsp : static_cast<std::size_t>(v.sal.group_size);
  p.deq = AVX512 && p.n_sal > 0 && v.sal.bits == 4;
  p.xb.assign(batch * p.nbp, 0.0f);
  p.S.assign(batch, 0.0f);
  const std::size_t rows_pad = (batch + 7) / 8 * 8;
  p.xs.assign(rows_pad * p.nsp, 0.0f);
  p.gsum.assign(rows_pad * p.sgroups, 0.0f);
  std::vector<float> r2;
  ptq161_halves(v.r2, p.n_bin, r2);
  for (std::size_t b = 0; b < batch; ++b) {
    const float* xr = x + b * v.in;
    float* xbr = p.xb.data() + b * p.nbp;
    float s = 0.0f;
    for (std::size_t j = 0; j < p.n_bin; ++j) {
      xbr[j] = r2[j] * xr[bin[j]];
      s += xbr[j];
    }
    p.S[b] = s;
    float* xsr = p.xs.data() + b * p.nsp;
    if (p.deq) {  // even codes of each run of 32 first, then odd ones
      for (std::size_t k = 0; k < p.n_sal; ++k) {
        const std::size_t run = k & ~std::size_t{31}, i = k & 31u;
        xsr[run + (i & 1u) * 16 + (i >> 1)] = xr[sal[k]];
      }
    } else {
      for (std::size_t k = 0; k < p.n_sal; ++k) xsr[k] = xr[sal[k]];
    }
    for (std::size_t g = 0; !p.deq && g < p.sgroups; ++g) {
      float t = 0.0f;
      for (std::size_t k = g * p.gsize; k < std::min(p.n_sal, (g + 1) * p.gsize); ++k) t += xsr[k];
      p.gsum[b * p.sgroups + g] = t;
    }
  }
  {
    std::vector<float> al, mu, r1;
    ptq161_halves(v.alpha, v.out, al);
    ptq161_halves(v.mu, v.out, mu);
    ptq161_halves(v.r1, v.out, r1);
    p.c1.resize(v.out);
    p.c0.resize(v.out);
    for (std::size_t o = 0; o < v.out; ++o) {
      p.c1[o] = r1[o] * (2.0f * al[o]);
      p.c0[o] = r1[o] * (mu[o] - al[o]);
    }
  }
  if (p.n_sal > 0) {
    const std::size_t ng = v.out * p.sgroups;
    ptq161_halves(v.sal.scales, ng, p.ssc);
    ptq161_halves(v.sal.zeros, ng, p.szf);
    if (!p.deq) {
      p.sscz.resize(ng);
      for (std::size_t i = 0; i < ng; ++i) p.sscz[i] = p.ssc[i] * p.szf[i];
    }
  }
  const bool par = nt > 1 && v.out * v.in * batch >= kPtq161ParallelWork;
  const int ntu = par ? nt : 1;
  const auto outs = static_cast<std::ptrdiff_t>(v.out);
  std::vector<float> qbuf(static_cast<std::size_t>(ntu) * std::max<std::size_t>(p.nsp, 1));
  auto tid = [] {
#ifdef _OPENMP
    return static_cast<std::size_t>(omp_get_thread_num());
#else
    return std::size_t{0};
#endif
  };

  if (batch < kPtq161TableBatch) {
    // blocks of 16 output rows over the threads
    const auto blocks = static_cast<std::ptrdiff_t>((v.out + 15) / 16);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(ntu)
#endif
    for (std::ptrdiff_t blk = 0; blk < blocks; ++blk) {
      float* q = qbuf.data() + tid() * std::max<std::size_t>(p.nsp, 1);
      const std::size_t o0 = static_cast<std::size_t>(blk) * 16, o1 = std::min(v.out, o0 + 16);
      auto run = AVX512 ? (batch == 3   ? &K::small_rows_avx512<3>
                           : batch == 2 ? &K::small_rows_avx512<2>
                                        : &K::small_rows_avx512<1>)
                        : (batch == 3   ? &K::small_rows_avx2<3>
                           : batch == 2 ? &K::small_rows_avx2<2>
                                        : &K::small_rows_avx2<1>);
      run(p, v, 0, o0, o1, q, y);
    }
    return;
  }

  // tiles of 8 batch rows: tables per chunk of groups, reused by every output row
  constexpr std::size_t TB = 8, GC = kPtq161TableChunk;
  const std::size_t tiles = (batch + TB - 1) / TB;
  const std::size_t G = p.sb;
  const std::size_t tsize = GC * 256 * TB, xtsize = std::max<std::size_t>(G * 8 * TB, 1);
  if (par && tiles >= static_cast<std::size_t>(ntu)) {
    // each thread its own tiles, tables and accumulators
    std::vector<float> T(static_cast<std::size_t>(ntu) * tsize), xT(static_cast<std::size_t>(ntu) * xtsize),
        acc(static_cast<std::size_t>(ntu) * v.out * TB);
    const auto nt_tiles = static_cast<std::ptrdiff_t>(tiles);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(ntu)
#endif
    for (std::ptrdiff_t t = 0; t < nt_tiles; ++t) {
      const std::size_t me = tid();
      const std::size_t b0 = static_cast<std::size_t>(t) * TB, nb = std::min(TB, batch - b0);
      float* Tm = T.data() + me * tsize;
      float* xTm = xT.data() + me * xtsize;
      float* am = acc.data() + me * v.out * TB;
      if (G > 0) {
        K::transpose_tile(p, b0, nb, xTm);
        for (std::size_t g0 = 0; g0 < G; g0 += GC) {
          const std::size_t g1 = std::min(G, g0 + GC);
          K::build_tables(xTm, g0, g1, Tm);
          K::lookup_rows(p, v, Tm, g0, g1, 0, v.out, am);
        }
      }
      float ST[TB];
      std::vector<float> gsT;
      detail::ptq161_tile_sums(p, b0, ST, gsT);
      K::finish_rows_x86<AVX512>(p, v, am, ST, gsT.data(), b0, nb, 0, v.out,
                                 qbuf.data() + me * std::max<std::size_t>(p.nsp, 1), y);
    }
    return;
  }
  // one tile at a time, its tables shared by the threads (groups, then rows, split)
  std::vector<float> T(tsize), xT(xtsize), acc(v.out * TB);
  for (std::size_t b0 = 0; b0 < batch; b0 += TB) {
    const std::size_t nb = std::min(TB, batch - b0);
    if (G > 0) K::transpose_tile(p, b0, nb, xT.data());
    float ST[TB];
    std::vector<float> gsT;
    detail::ptq161_tile_sums(p, b0, ST, gsT);
#ifdef _OPENMP
#pragma omp parallel num_threads(ntu)
#endif
    {
      for (std::size_t g0 = 0; g0 < G; g0 += GC) {
        const std::size_t g1 = std::min(G, g0 + GC);
        const auto ng = static_cast<std::ptrdiff_t>(g1 - g0);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (std::ptrdiff_t g = 0; g < ng; ++g) {
          const std::size_t gg = g0 + static_cast<std::size_t>(g);
          K::build_tables(xT.data(), gg, gg + 1, T.data() + static_cast<std::size_t>(g) * 256 * TB);
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (std::ptrdiff_t o = 0; o < outs; ++o)
          K::lookup_rows(p, v, T.data(), g0, g1, static_cast<std::size_t>(o),
                         static_cast<std::size_t>(o) + 1, acc.data());
      }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (std::ptrdiff_t o = 0; o < outs; ++o)
        K::finish_rows_x86<AVX512>(p, v, acc.data(), ST, gsT.data(), b0, nb, static_cast<std::size_t>(o),
                                   static_cast<std::size_t>(o) + 1,
                                   qbuf.data() + tid() * std::max<std::size_t>(p.nsp, 1), y);
    }
  }
}
#endif  // SQLLM_X86_SIMD

}  // namespace detail

/// y = x Ŵᵀ (x: batch x in, y: batch x out, row-major fp32).  The view is
/// validated here unless `checked`.  `kernel` picks the path (Auto: the best
/// the CPU has, or SQLLM_CPU_KERNEL): Scalar is the portable sign-table loop
/// below, Avx2 / Avx512 detail/binary_matmul_simd.hpp.
///
/// One OpenMP region per call and no barrier inside it: batches of at least 16
/// rows split their tiles of 8 rows over the threads (each builds its own
/// tables and does every output row); smaller batches build the tables of a
/// tile (8 rows, or 1 row at a time below 8) first and split the output rows.
inline void ptq161_matmul(const Ptq161View& v, const float* x, std::size_t batch, float* y,
                          int num_threads = 0, bool checked = false,
                          CpuKernel kernel = CpuKernel::Auto) {
  if (!checked) check_ptq161_view(v);
  const CpuKernel ker = resolve_cpu_kernel(kernel);
  if (batch == 0) return;
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  const int nt = 1;
  (void)num_threads;
#endif
#if defined(SQLLM_X86_SIMD)
  if (ker == CpuKernel::Avx512) return detail::ptq161_matmul_x86<true>(v, x, batch, y, nt);
  if (ker == CpuKernel::Avx2) return detail::ptq161_matmul_x86<false>(v, x, batch, y, nt);
#else
  (void)ker;
#endif
  std::vector<std::size_t> sal, bin;
  ptq161_channels(v, sal, bin);
  const std::size_t n_sal = sal.size(), n_bin = bin.size();
  // salient part: gather the salient columns, the uniform kernel writes y
  if (n_sal > 0) {
    std::vector<float> xs(batch * n_sal);
    for (std::size_t b = 0; b < batch; ++b)
      for (std::size_t k = 0; k < n_sal; ++k) xs[b * n_sal + k] = x[b * v.in + sal[k]];
    uniform_matmul(v.sal, xs.data(), batch, y, num_threads, /*checked=*/true);
  } else {
    std::fill(y, y + batch * v.out, 0.0f);
  }
  if (n_bin == 0) return;
  std::vector<float> r2(n_bin);
  for (std::size_t j = 0; j < n_bin; ++j) r2[j] = half_bits_to_float(v.r2[j]);
  const std::size_t G = ptq161_sign_bytes(n_bin), n8 = G * 8;
  constexpr std::size_t TB = detail::kPtq161Tile;
  const std::size_t tiles = (batch + TB - 1) / TB;
  std::exception_ptr error;

  if (batch >= 2 * TB) {
    // tiles over threads; the last tile may be partial (its padding rows are zero)
    const auto ntiles = static_cast<std::ptrdiff_t>(tiles);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
      std::vector<float> xb, T, sums(TB);
      bool ok = true;
      try {
        xb.resize(TB * n8);
        T.resize(G * 256 * TB);
      } catch (...) {
        ok = false;
#ifdef _OPENMP
#pragma omp critical
#endif
        error = std::current_exception();
      }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (std::ptrdiff_t t = 0; t < ntiles; ++t) {
        if (!ok) continue;
        const std::size_t b0 = static_cast<std::size_t>(t) * TB;
        const std::size_t nb = std::min(TB, batch - b0);
        detail::ptq161_gather(x, v.in, bin, r2, b0, nb, TB, n8, xb.data(), sums.data());
        detail::ptq161_build_tables<TB>(xb.data(), n8, T.data());
        for (std::size_t o = 0; o < v.out; ++o)
          detail::ptq161_lookup_row<TB>(v, G, T.data(), sums.data(), o, y + b0 * v.out, v.out, nb);
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }

  // small batch: tables once per tile, output rows over threads
  const std::size_t tb = batch >= TB ? TB : 1;
  std::vector<float> xb(tb * n8), T(G * 256 * tb), sums(tb);
  const auto outs = static_cast<std::ptrdiff_t>(v.out);
  for (std::size_t b0 = 0; b0 < batch; b0 += tb) {
    const std::size_t nb = std::min(tb, batch - b0);
    detail::ptq161_gather(x, v.in, bin, r2, b0, nb, tb, n8, xb.data(), sums.data());
    float* yb = y + b0 * v.out;
    if (tb == TB) {
      detail::ptq161_build_tables<TB>(xb.data(), n8, T.data());
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
      for (std::ptrdiff_t o = 0; o < outs; ++o)
        detail::ptq161_lookup_row<TB>(v, G, T.data(), sums.data(), static_cast<std::size_t>(o), yb,
                                      v.out, nb);
    } else {
      detail::ptq161_build_tables<1>(xb.data(), n8, T.data());
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
      for (std::ptrdiff_t o = 0; o < outs; ++o)
        detail::ptq161_lookup_row<1>(v, G, T.data(), sums.data(), static_cast<std::size_t>(o), yb,
                                     v.out, nb);
    }
  }
}

}  // namespace sqllm
