// sqllm/reference/lut_matmul.hpp -- the plain scalar oracle of the LUT matmul:
// decode every weight with get_code (no unrolling, no blocking), accumulate in
// double, add the sparse part entry by entry.  Tests compare the optimised
// kernels against it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sqllm/csr.hpp"
#include "sqllm/nuq.hpp"
#include "sqllm/packing.hpp"

namespace sqllm {
namespace reference {

inline void lut_matmul(const float* x, std::size_t batch, std::size_t in, std::size_t out,
                       const std::uint32_t* codes, const float* tables, int bits, GroupAxis axis,
                       const CsrView* csr, double* y) {
  const std::size_t K = std::size_t{1} << bits;
  const std::size_t words = packed_words(in, bits);
  for (std::size_t b = 0; b < batch; ++b) {
    for (std::size_t o = 0; o < out; ++o) {
      double acc = 0.0;
      for (std::size_t i = 0; i < in; ++i) {
        const std::uint32_t c = get_code(codes + o * words, i, bits);
        const float w = axis == GroupAxis::Row ? tables[o * K + c] : tables[i * K + c];
        acc += static_cast<double>(w) * static_cast<double>(x[b * in + i]);
      }
      if (csr != nullptr) {
        for (std::int32_t k = csr->row_ptr[o]; k < csr->row_ptr[o + 1]; ++k)
          acc += static_cast<double>(half_bits_to_float(csr->values[k])) *
                 static_cast<double>(x[b * in + csr->col_idx[k]]);
      }
      y[b * out + o] = acc;
    }
  }
}

}  // namespace reference
}  // namespace sqllm
