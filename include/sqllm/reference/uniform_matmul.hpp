// sqllm/reference/uniform_matmul.hpp -- the plain scalar oracle of the uniform
// matmul: every weight decoded with get_code and the fp16 scale/zero, the
// product accumulated in double.  Tests compare the optimised kernel with it.
#pragma once

#include <cstddef>

#include "sqllm/half.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/quant/uniform.hpp"

namespace sqllm {
namespace reference {

inline void uniform_matmul(const UniformView& v, const float* x, std::size_t batch, double* y) {
  const std::size_t words = packed_words(v.in, v.bits);
  const std::size_t G = v.groups();
  for (std::size_t b = 0; b < batch; ++b) {
    for (std::size_t o = 0; o < v.out; ++o) {
      double acc = 0.0;
      for (std::size_t i = 0; i < v.in; ++i) {
        const std::size_t g = uniform_group_of(v, i);
        const double s = half_bits_to_float(v.scales[o * G + g]);
        const double z = half_bits_to_float(v.zeros[o * G + g]);
        const double q = get_code(v.qweight + o * words, i, v.bits);
        acc += s * (q - z) * static_cast<double>(x[b * v.in + i]);
      }
      y[b * v.out + o] = acc;
    }
  }
}

}  // namespace reference
}  // namespace sqllm
