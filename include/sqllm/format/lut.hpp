// sqllm/format/lut.hpp -- the lookup-table (SqueezeLLM) format as one view.
//
// A layer of out x in weights stored as b-bit codes (packing.hpp's layout: one
// little-endian bit stream per output row) and lookup tables of K = 2^b fp32
// values, one per output row (GroupAxis::Row) or per input column
// (GroupAxis::Column), plus an optional sparse part in CSR (csr.hpp):
//
//   Ŵ[o, i] = tables[g * K + code(o, i)] + sparse[o, i],  g = o (row) or i (column).
//
// `LutView` points at those arrays (it owns nothing).  The same struct is
// taken by the CPU kernel (lut_matmul.hpp), the scalar references
// (reference/lut_matmul*.hpp), the CUDA launchers (cuda/sqllm_cuda.h, with
// device pointers) and the bindings, and `check_lut_view` is the one place
// that validates it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "sqllm/csr.hpp"
#include "sqllm/error.hpp"
#include "sqllm/packing.hpp"

namespace sqllm {

enum class GroupAxis { Row, Column };

inline GroupAxis parse_group_axis(const std::string& s) {
  if (s == "row") return GroupAxis::Row;
  if (s == "column" || s == "col") return GroupAxis::Column;
  throw Error(detail::concat("group_axis must be 'row' or 'column', got '", s, "'"));
}

inline const char* to_string(GroupAxis a) { return a == GroupAxis::Row ? "row" : "column"; }

struct LutView {
  const std::uint32_t* codes = nullptr;  ///< [out, packed_words(in, bits)]
  const float* tables = nullptr;         ///< [out or in, 2^bits] (row / column grouping)
  std::size_t out = 0;
  std::size_t in = 0;
  int bits = 0;  ///< 1..8
  GroupAxis axis = GroupAxis::Row;
  /// The sparse part; `sparse.row_ptr == nullptr` means none.
  CsrView sparse{};

  bool has_sparse() const { return sparse.row_ptr != nullptr && sparse.nnz > 0; }
  bool column_grouping() const { return axis == GroupAxis::Column; }
  std::size_t words() const { return packed_words(in, bits); }
  std::size_t num_tables() const { return axis == GroupAxis::Row ? out : in; }
  std::size_t table_size() const { return std::size_t{1} << bits; }

  /// Ŵ[o, i] without the sparse part (host memory only).
  float weight(std::size_t o, std::size_t i) const {
    const std::uint32_t c = get_code(codes + o * words(), i, bits);
    return tables[(axis == GroupAxis::Row ? o : i) * table_size() + c];
  }
};

/// Validate a view: bits, positive shapes, non-null arrays and, when
/// `check_sparse_contents` (host memory), the whole CSR structure (csr.hpp's
/// check_csr: bounds, order, finite values).  With device pointers pass false:
/// only the presence of the CSR arrays is checked.  Throws sqllm::Error.
inline void check_lut_view(const LutView& v, bool check_sparse_contents = true) {
  check_bits(v.bits);
  SQLLM_CHECK(v.in > 0 && v.out > 0, "lut layer: in_features and out_features must be > 0, got in=",
              v.in, ", out=", v.out);
  SQLLM_CHECK(v.codes != nullptr && v.tables != nullptr, "lut layer: codes and tables are required");
  const CsrView& s = v.sparse;
  if (s.row_ptr == nullptr) {
    SQLLM_CHECK(s.col_idx == nullptr && s.values == nullptr && s.nnz == 0,
                "lut layer: sparse col_idx/values given without row_ptr");
    return;
  }
  if (check_sparse_contents) {
    check_csr(s, v.out, v.in);
  } else {
    SQLLM_CHECK(s.nnz == 0 || (s.col_idx != nullptr && s.values != nullptr),
                "lut layer: sparse part with nnz=", s.nnz, " needs col_idx and values");
  }
}

}  // namespace sqllm
