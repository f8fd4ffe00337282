// sqllm/reference/lut_matmul_precision.hpp -- scalar CPU oracles of the LUT
// matmul: the reproducible precision modes (bit-exact twin of the CUDA
// "exact" kernel) and a float64 reference.
//
// Problem (docs/formats.md): y[b, o] = sum_i x[b, i] * W[o, i]
//                                     + sum_{k in CSR row o} values[k] * x[b, col_idx[k]]
// with the layer given as a LutView (sqllm/format/lut.hpp: codes, row or
// column tables, the optional CSR part with fp16 values, widened to float here).
//
// Summation order of lut_matmul_precision (and of the CUDA exact kernel),
// with add/mul/operand from the precision policy (sqllm/float_emu.hpp):
//   for every (b, o):
//     1. T = kExactLanes = 32 lane sums.  Lane l starts at +0.0f and, for
//        i = l, l + 32, l + 64, ... < in in increasing order, does
//            s_l = add(s_l, mul(operand(W[o, i]), operand(x[b, i]))).
//     2. Tree combine: for off = 16, 8, 4, 2, 1: s_l = add(s_l, s_{l+off}) for
//        l < off (the GPU's __shfl_xor butterfly computes the same sums in
//        lane l < off, with the same argument order).
//     3. Sparse part, sequential on s = s_0: for k = row_ptr[o] .. row_ptr[o+1]-1
//            s = add(s, mul(operand(values[k]), operand(x[b, col_idx[k]]))).
//     4. y[b, o] = s (a float; a caller storing fp16/bf16 rounds it to nearest-even).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "sqllm/error.hpp"
#include "sqllm/float_emu.hpp"
#include "sqllm/format/lut.hpp"

namespace sqllm {
namespace reference {

/// Number of lane sums of the reproducible order (the CUDA warp size).
constexpr int kExactLanes = 32;

/// One LUT matmul problem in host memory (nothing is owned): the layer and x.
struct LutMatmulView {
  LutView w;                  ///< the layer; its CSR (if any) is validated in full
  const float* x = nullptr;   ///< [batch, in] with row stride x_stride
  std::int64_t batch = 0;
  std::int64_t x_stride = 0;  ///< elements between rows of x; 0 means `in`
};

/// Validate the layer (check_lut_view: one path for every LUT consumer) and x.
inline void check_view(const LutMatmulView& v) {
  check_lut_view(v.w);
  SQLLM_CHECK(v.batch >= 0, "lut_matmul: batch must be >= 0, got ", v.batch);
  SQLLM_CHECK(v.x_stride == 0 || v.x_stride >= static_cast<std::int64_t>(v.w.in),
              "lut_matmul: x row stride ", v.x_stride, " is smaller than in=", v.w.in);
  SQLLM_CHECK(v.x != nullptr || v.batch == 0, "lut_matmul: null x pointer");
}

/// The dequantized weight W[o, i] (without the sparse part).
inline float lut_weight(const LutMatmulView& v, std::int64_t o, std::int64_t i) {
  return v.w.weight(static_cast<std::size_t>(o), static_cast<std::size_t>(i));
}

namespace detail {

template <class Arith>
void lut_matmul_precision_impl(const LutMatmulView& v, const Arith& ar, float* y) {
  const auto in = static_cast<std::int64_t>(v.w.in), out = static_cast<std::int64_t>(v.w.out);
  const std::int64_t ldx = v.x_stride == 0 ? in : v.x_stride;
  const CsrView& sp = v.w.sparse;
  std::vector<float> wrow(static_cast<std::size_t>(in));
  for (std::int64_t o = 0; o < out; ++o) {
    for (std::int64_t i = 0; i < in; ++i) wrow[static_cast<std::size_t>(i)] = lut_weight(v, o, i);
    for (std::int64_t b = 0; b < v.batch; ++b) {
      const float* xr = v.x + b * ldx;
      float s[kExactLanes];
      for (int l = 0; l < kExactLanes; ++l) {
        float acc = 0.0f;
        for (std::int64_t i = l; i < in; i += kExactLanes) {
          acc = ar.add(acc, ar.mul(ar.operand(wrow[static_cast<std::size_t>(i)]), ar.operand(xr[i])));
        }
        s[l] = acc;
      }
      for (int off = kExactLanes / 2; off >= 1; off /= 2) {
        for (int l = 0; l < off; ++l) s[l] = ar.add(s[l], s[l + off]);
      }
      float acc = s[0];
      if (v.w.has_sparse()) {
        for (std::int64_t k = sp.row_ptr[o]; k < sp.row_ptr[o + 1]; ++k) {
          acc = ar.add(acc, ar.mul(ar.operand(half_bits_to_float(sp.values[k])),
                                   ar.operand(xr[sp.col_idx[k]])));
        }
      }
      y[b * out + o] = acc;
    }
  }
}

}  // namespace detail

/// y[batch, out] (row-major floats) in the precision mode `p`, in the
/// summation order documented at the top of this file.
inline void lut_matmul_precision(const LutMatmulView& v, const PrecisionConfig& p, float* y) {
  check_view(v);
  SQLLM_CHECK(y != nullptr || v.batch == 0, "lut_matmul: null y pointer");
  visit_precision(p, [&](const auto& ar) { detail::lut_matmul_precision_impl(v, ar, y); });
}

/// Float64 reference: y[b, o] = sum_i x*W + sum_k values*x, all in double.
/// With `absolute` it returns sum |x*W| + sum |values*x| instead (the scale
/// that error bounds of the float modes multiply).
inline void lut_matmul_f64(const LutMatmulView& v, double* y, bool absolute = false) {
  check_view(v);
  const auto in = static_cast<std::int64_t>(v.w.in), out = static_cast<std::int64_t>(v.w.out);
  const std::int64_t ldx = v.x_stride == 0 ? in : v.x_stride;
  const CsrView& sp = v.w.sparse;
  for (std::int64_t o = 0; o < out; ++o) {
    for (std::int64_t b = 0; b < v.batch; ++b) {
      const float* xr = v.x + b * ldx;
      double acc = 0.0;
      for (std::int64_t i = 0; i < in; ++i) {
        const double t = static_cast<double>(lut_weight(v, o, i)) * static_cast<double>(xr[i]);
        acc += absolute ? (t < 0 ? -t : t) : t;
      }
      if (v.w.has_sparse()) {
        for (std::int64_t k = sp.row_ptr[o]; k < sp.row_ptr[o + 1]; ++k) {
          const double t = static_cast<double>(half_bits_to_float(sp.values[k])) *
                           static_cast<double>(xr[sp.col_idx[k]]);
          acc += absolute ? (t < 0 ? -t : t) : t;
        }
      }
      y[b * out + o] = acc;
    }
  }
}

}  // namespace reference
}  // namespace sqllm
