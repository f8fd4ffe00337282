// sqllm/quant/gptq_uniform.hpp -- GPTQ on uniform grids: the column quantizer
// of the uniform format (quant/uniform.hpp) and the one call the bindings use.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "sqllm/half.hpp"
#include "sqllm/quant/gptq.hpp"
#include "sqllm/quant/uniform.hpp"

namespace sqllm {

/// Uniform grids per (row, group), fitted min-max from the columns GPTQ hands
/// over (begin_group), codes by rounding to the grid (quantize_column).
struct UniformColumnQuantizer {
  UniformParams params;
  std::size_t cols = 0;
  std::size_t groups = 1;
  std::vector<UniformGrid> grids;  ///< rows x groups
  std::uint8_t* codes = nullptr;   ///< rows x cols, written

  UniformColumnQuantizer(const UniformParams& p, std::size_t rows, std::size_t cols_,
                         std::size_t groups_, std::uint8_t* codes_)
      : params(p), cols(cols_), groups(groups_), grids(rows * groups_), codes(codes_) {}

  std::size_t row_align() const { return 1; }

  void begin_group(std::size_t g, std::size_t r0, const Eigen::Ref<const Eigen::MatrixXd>& w) {
    for (Eigen::Index r = 0; r < w.rows(); ++r) {
      const double lo = w.row(r).minCoeff(), hi = w.row(r).maxCoeff();
      grids[(r0 + static_cast<std::size_t>(r)) * groups + g] =
          UniformGrid::from_range(lo, hi, params.bits, params.sym);
    }
  }

  void quantize_column(std::size_t g, std::size_t col, std::size_t r0, std::size_t n,
                       const double* w, double* q) {
    for (std::size_t r = 0; r < n; ++r) {
      const UniformGrid& grid = grids[(r0 + r) * groups + g];
      const int c = grid.code(w[r]);
      codes[(r0 + r) * cols + col] = static_cast<std::uint8_t>(c);
      q[r] = grid.value(c);
    }
  }
};

/// GPTQ onto uniform grids.  W rows x cols (row-major fp32), H cols x cols
/// (row-major fp64, a positive multiple of X^T X).  Writes codes (rows x cols
/// uint8), scales and zeros (rows x result.num_groups, fp16 bits) and, when
/// not nullptr, the dequantized weight.  Group size and bits are checked
/// against the uniform format (2..8 bits; -1, 32, 64, 128).
inline GptqResult gptq_uniform(const float* W, const double* H, std::size_t rows, std::size_t cols,
                               const UniformParams& up, GptqParams gp, std::uint8_t* codes,
                               std::vector<std::uint16_t>& scales,
                               std::vector<std::uint16_t>& zeros, float* q_out = nullptr) {
  check_uniform_params(up);
  gp.group_size = up.group_size;
  const std::size_t groups = uniform_num_groups(cols, up.group_size);
  UniformColumnQuantizer quant(up, rows, cols, groups, codes);
  GptqResult res = gptq(W, H, rows, cols, gp, quant, q_out);
  scales.resize(rows * groups);
  zeros.resize(rows * groups);
  for (std::size_t k = 0; k < rows * groups; ++k) {
    scales[k] = float_to_half_bits(quant.grids[k].scale);
    zeros[k] = float_to_half_bits(quant.grids[k].zero);
  }
  return res;
}

}  // namespace sqllm
