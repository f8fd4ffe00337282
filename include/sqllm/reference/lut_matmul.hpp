// sqllm/reference/lut_matmul.hpp -- the plain scalar oracle of the LUT matmul:
// decode every weight with get_code (no unrolling, no blocking), accumulate in
// double, add the sparse part entry by entry.  Tests compare the optimised
// kernels against it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sqllm/format/lut.hpp"

namespace sqllm {
namespace reference {

/// y[b, o] = Σ_i Ŵ[o, i] x[b, i] + the sparse part, in double (x: batch x in).
inline void lut_matmul(const LutView& w, const float* x, std::size_t batch, double* y) {
  check_lut_view(w);
  for (std::size_t b = 0; b < batch; ++b) {
    for (std::size_t o = 0; o < w.out; ++o) {
      double acc = 0.0;
      for (std::size_t i = 0; i < w.in; ++i)
        acc += static_cast<double>(w.weight(o, i)) * static_cast<double>(x[b * w.in + i]);
      if (w.has_sparse()) {
        const CsrView& s = w.sparse;
        for (std::int32_t k = s.row_ptr[o]; k < s.row_ptr[o + 1]; ++k)
          acc += static_cast<double>(half_bits_to_float(s.values[k])) *
                 static_cast<double>(x[b * w.in + s.col_idx[k]]);
      }
      y[b * w.out + o] = acc;
    }
  }
}

}  // namespace reference
}  // namespace sqllm
