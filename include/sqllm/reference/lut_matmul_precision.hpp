// sqllm/reference/lut_matmul_precision.hpp -- scalar CPU oracles of the LUT
// matmul: the reproducible precision modes (bit-exact twin of the CUDA
// "exact" kernel) and a float64 reference.
//
// Problem (docs/formats.md): y[b, o] = sum_i x[b, i] * W[o, i]
//                                     + sum_{k in CSR row o} values[k] * x[b, col_idx[k]]
//   codes   uint32 [out, W], W = packed_words(in, bits); c(o, i) = get_code(codes + o*W, i, bits)
//   tables  float  row grouping: [out, K], W[o, i] = tables[o*K + c(o, i)]
//                  column grouping: [in, K], W[o, i] = tables[i*K + c(o, i)]   (K = 2^bits)
//   CSR     optional, over [out, in]: row_ptr [out+1], col_idx [nnz], values [nnz]
//           (fp16 values widened to float here).
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
#include "sqllm/packing.hpp"

namespace sqllm {
namespace reference {

/// Number of lane sums of the reproducible order (the CUDA warp size).
constexpr int kExactLanes = 32;

/// Host views of one LUT matmul problem (nothing is owned).
struct LutMatmulView {
  const float* x = nullptr;  ///< [batch, in] with row stride x_stride
  std::int64_t batch = 0;
  std::int64_t in = 0;
  std::int64_t out = 0;
  std::int64_t x_stride = 0;  ///< elements between rows of x; 0 means `in`
  int bits = 0;
  const std::uint32_t* codes = nullptr;  ///< [out, packed_words(in, bits)]
  const float* tables = nullptr;         ///< [out, 2^bits] (row) or [in, 2^bits] (column)
  bool column_grouping = false;
  const std::int32_t* csr_row_ptr = nullptr;  ///< [out + 1] or null (no sparse part)
  const std::int32_t* csr_col_idx = nullptr;  ///< [nnz]
  const float* csr_values = nullptr;          ///< [nnz]
  std::int64_t nnz = 0;
};

/// Validate shapes, pointers and (fully) the CSR structure; throws sqllm::Error.
inline void check_view(const LutMatmulView& v) {
  check_bits(v.bits);
  SQLLM_CHECK(v.batch >= 0 && v.in >= 1 && v.out >= 1, "lut_matmul: need batch >= 0, in >= 1, ",
              "out >= 1, got batch=", v.batch, ", in=", v.in, ", out=", v.out);
  SQLLM_CHECK(v.x_stride == 0 || v.x_stride >= v.in, "lut_matmul: x row stride ", v.x_stride,
              " is smaller than in=", v.in);
  SQLLM_CHECK(v.codes != nullptr && v.tables != nullptr && (v.x != nullptr || v.batch == 0),
              "lut_matmul: null x, codes or tables pointer");
  if (v.csr_row_ptr == nullptr) return;
  SQLLM_CHECK(v.nnz >= 0 && (v.nnz == 0 || (v.csr_col_idx != nullptr && v.csr_values != nullptr)),
              "lut_matmul: CSR with nnz=", v.nnz, " needs col_idx and values");
  SQLLM_CHECK(v.csr_row_ptr[0] == 0 && v.csr_row_ptr[v.out] == v.nnz,
              "lut_matmul: CSR row_ptr must start at 0 and end at nnz=", v.nnz, ", got ",
              v.csr_row_ptr[0], " .. ", v.csr_row_ptr[v.out], " (out=", v.out, ")");
  for (std::int64_t o = 0; o < v.out; ++o) {
    SQLLM_CHECK(v.csr_row_ptr[o] <= v.csr_row_ptr[o + 1], "lut_matmul: CSR row_ptr decreases at row ",
                o);
  }
  for (std::int64_t k = 0; k < v.nnz; ++k) {
    SQLLM_CHECK(v.csr_col_idx[k] >= 0 && v.csr_col_idx[k] < v.in, "lut_matmul: CSR col_idx[", k,
                "]=", v.csr_col_idx[k], " out of range for in=", v.in);
  }
}

/// The dequantized weight W[o, i].
inline float lut_weight(const LutMatmulView& v, std::int64_t o, std::int64_t i) {
  const std::size_t W = packed_words(static_cast<std::size_t>(v.in), v.bits);
  const std::uint32_t c =
      get_code(v.codes + static_cast<std::size_t>(o) * W, static_cast<std::size_t>(i), v.bits);
  const std::int64_t K = std::int64_t{1} << v.bits;
  return v.column_grouping ? v.tables[i * K + c] : v.tables[o * K + c];
}

namespace detail {

template <class Arith>
void lut_matmul_precision_impl(const LutMatmulView& v, const Arith& ar, float* y) {
  const std::int64_t ldx = v.x_stride == 0 ? v.in : v.x_stride;
  std::vector<float> wrow(static_cast<std::size_t>(v.in));
  for (std::int64_t o = 0; o < v.out; ++o) {
    for (std::int64_t i = 0; i < v.in; ++i) wrow[static_cast<std::size_t>(i)] = lut_weight(v, o, i);
    for (std::int64_t b = 0; b < v.batch; ++b) {
      const float* xr = v.x + b * ldx;
      float s[kExactLanes];
      for (int l = 0; l < kExactLanes; ++l) {
        float acc = 0.0f;
        for (std::int64_t i = l; i < v.in; i += kExactLanes) {
          acc = ar.add(acc, ar.mul(ar.operand(wrow[static_cast<std::size_t>(i)]), ar.operand(xr[i])));
        }
        s[l] = acc;
      }
      for (int off = kExactLanes / 2; off >= 1; off /= 2) {
        for (int l = 0; l < off; ++l) s[l] = ar.add(s[l], s[l + off]);
      }
      float acc = s[0];
      if (v.csr_row_ptr != nullptr) {
        for (std::int64_t k = v.csr_row_ptr[o]; k < v.csr_row_ptr[o + 1]; ++k) {
          acc = ar.add(acc, ar.mul(ar.operand(v.csr_values[k]), ar.operand(xr[v.csr_col_idx[k]])));
        }
      }
      y[b * v.out + o] = acc;
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
  const std::int64_t ldx = v.x_stride == 0 ? v.in : v.x_stride;
  for (std::int64_t o = 0; o < v.out; ++o) {
    for (std::int64_t b = 0; b < v.batch; ++b) {
      const float* xr = v.x + b * ldx;
      double acc = 0.0;
      for (std::int64_t i = 0; i < v.in; ++i) {
        const double t = static_cast<double>(lut_weight(v, o, i)) * static_cast<double>(xr[i]);
        acc += absolute ? (t < 0 ? -t : t) : t;
      }
      if (v.csr_row_ptr != nullptr) {
        for (std::int64_t k = v.csr_row_ptr[o]; k < v.csr_row_ptr[o + 1]; ++k) {
          const double t =
              static_cast<double>(v.csr_values[k]) * static_cast<double>(xr[v.csr_col_idx[k]]);
          acc += absolute ? (t < 0 ? -t : t) : t;
        }
      }
      y[b * v.out + o] = acc;
    }
  }
}

}  // namespace reference
}  // namespace sqllm
