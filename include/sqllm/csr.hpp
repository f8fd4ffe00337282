// sqllm/csr.hpp -- the CSR layout of the sparse part of Dense-and-Sparse.
//
// A matrix of rows x cols with nnz stored values:
//   row_ptr int32 [rows + 1], row_ptr[0] == 0, non-decreasing, row_ptr[rows] == nnz;
//   col_idx int32 [nnz], strictly increasing within each row, 0 <= col < cols;
//   values  fp16  [nnz] (IEEE binary16 bits).
// Shared by the CPU kernel, the CUDA kernel and the checkpoint loaders.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "sqllm/error.hpp"
#include "sqllm/half.hpp"

namespace sqllm {

struct CsrView {
  const std::int32_t* row_ptr = nullptr;
  const std::int32_t* col_idx = nullptr;
  const std::uint16_t* values = nullptr;  // fp16 bits
  std::size_t nnz = 0;
};

/// Throws sqllm::Error naming the first violation of the layout above.
inline void check_csr(const CsrView& m, std::size_t rows, std::size_t cols) {
  SQLLM_CHECK(m.row_ptr != nullptr, "sparse row_ptr is missing");
  SQLLM_CHECK(m.nnz == 0 || (m.col_idx && m.values), "sparse col_idx/values are missing");
  SQLLM_CHECK(m.row_ptr[0] == 0, "sparse row_ptr[0] must be 0, got ", m.row_ptr[0]);
  SQLLM_CHECK(m.row_ptr[rows] >= 0 && static_cast<std::size_t>(m.row_ptr[rows]) == m.nnz,
              "sparse row_ptr[", rows, "] must equal nnz=", m.nnz, ", got ", m.row_ptr[rows]);
  for (std::size_t r = 0; r < rows; ++r) {
    const std::int32_t a = m.row_ptr[r], b = m.row_ptr[r + 1];
    SQLLM_CHECK(a <= b, "sparse row_ptr must be non-decreasing, but row_ptr[", r, "]=", a,
                " > row_ptr[", r + 1, "]=", b);
    // Bounds before reads: with row_ptr[0] == 0 and a <= b, b <= nnz keeps
    // [a, b) inside col_idx/values even when a later entry breaks the order.
    SQLLM_CHECK(static_cast<std::size_t>(b) <= m.nnz, "sparse row_ptr[", r + 1, "]=", b,
                " exceeds nnz=", m.nnz);
    for (std::int32_t k = a; k < b; ++k) {
      const std::int32_t c = m.col_idx[k];
      SQLLM_CHECK(c >= 0 && static_cast<std::size_t>(c) < cols, "sparse col_idx[", k, "]=", c,
                  " out of range [0, ", cols, ") in row ", r);
      SQLLM_CHECK(k == a || m.col_idx[k - 1] < c, "sparse col_idx must be strictly increasing in ",
                  "each row, row ", r, " has ", m.col_idx[k - 1], " then ", c);
      SQLLM_CHECK(std::isfinite(half_bits_to_float(m.values[k])), "sparse values[", k,
                  "] is not finite");
    }
  }
}

}  // namespace sqllm
