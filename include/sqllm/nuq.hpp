// sqllm/nuq.hpp -- SqueezeLLM's sensitivity-weighted non-uniform quantizer.
//
// A weight matrix W (out x in, row-major) and a sensitivity S of the same
// shape (the Fisher diagonal: summed squared gradients) are turned into one
// lookup table of K = 2^bits values per group plus a b-bit code per weight:
//
//   GroupAxis::Row    (default, SqueezeLLM): one table per output row,
//                      tables[o*K + k], Ŵ[o,i] = tables[o*K + code(o,i)];
//   GroupAxis::Column (seed 002's variant): one table per input column,
//                      tables[i*K + k], Ŵ[o,i] = tables[i*K + code(o,i)].
//
// Each table is the weighted 1-D k-means of its group's values with the
// sensitivities as weights (kmeans1d.hpp), and each code indexes the table
// entry nearest to the weight.  Codes are packed with packing.hpp's layout
// (one bit stream per output row, codes along the input dimension) whatever
// the grouping axis.  Groups run in parallel with OpenMP.
//
// A boolean `keep` mask (same shape, nullable) marks weights that are stored
// elsewhere exactly (the sparse part of Dense-and-Sparse): they get zero
// weight in the k-means so they do not pull the tables; they still receive the
// nearest code, and the caller stores W - Ŵ for them.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "sqllm/error.hpp"
#include "sqllm/format/lut.hpp"  // GroupAxis
#include "sqllm/kmeans1d.hpp"
#include "sqllm/packing.hpp"

namespace sqllm {

/// Parameters of the non-uniform quantizer (documented defaults, no globals).
struct NuqParams {
  int bits = 3;                               ///< 1..8; table size 2^bits
  GroupAxis axis = GroupAxis::Row;            ///< one table per output row or per input column
  KMeansMethod method = KMeansMethod::Exact;  ///< exact DP or fast Lloyd
  int max_iter = 50;                          ///< Lloyd iterations
  int num_threads = 0;                        ///< OpenMP threads; <= 0: the OpenMP default
};

/// Number of lookup tables for a matrix of out x in.
inline std::size_t nuq_num_tables(std::size_t out, std::size_t in, GroupAxis axis) {
  return axis == GroupAxis::Row ? out : in;
}

/// Quantize W (out x in).  S may be nullptr (equal weights: plain k-means);
/// keep may be nullptr.  Writes packed codes (out x packed_words(in, bits)
/// words) and tables (nuq_num_tables(out, in, axis) x 2^bits floats).
/// If group_sse is not null it receives the weighted SSE of each group.
inline void nuq_quantize(const float* W, const float* S, const std::uint8_t* keep, std::size_t out,
                         std::size_t in, const NuqParams& p, std::uint32_t* packed, float* tables,
                         double* group_sse = nullptr) {
  check_bits(p.bits);
  SQLLM_CHECK(out > 0 && in > 0, "weight must be non-empty, got shape (", out, ", ", in, ")");
  const std::size_t K = std::size_t{1} << p.bits;
  const bool row = p.axis == GroupAxis::Row;
  const std::size_t groups = row ? out : in;
  const std::size_t len = row ? in : out;

  // NaN/Inf in W, bad sensitivities: one branch-free pass (it vectorises);
  // only when it finds something does a second pass name the first bad entry.
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const std::size_t total = out * in;
  unsigned bad = 0;
  for (std::size_t t = 0; t < total; ++t) bad |= static_cast<unsigned>(!(std::fabs(W[t]) < kInf));
  if (S != nullptr) {
    for (std::size_t t = 0; t < total; ++t) {
      const float w = S[t];
      bad |= static_cast<unsigned>(!(w >= 0.0f)) | static_cast<unsigned>(!(w < kInf));
    }
  }
  if (bad != 0) {
    for (std::size_t o = 0; o < out; ++o) {
      for (std::size_t i = 0; i < in; ++i) {
        const std::size_t src = o * in + i;
        const float w = S ? S[src] : 1.0f;
        SQLLM_CHECK(std::isfinite(W[src]), "weight has a non-finite value (NaN or Inf) ", W[src],
                    " at (", o, ", ", i, ")");
        SQLLM_CHECK(std::isfinite(w) && w >= 0.0f, "sensitivity must be finite and >= 0, got ", w,
                    " at (", o, ", ", i, ")");
      }
    }
  }

  // Group-major values and weights: W and S themselves for row groups without
  // a keep mask (no weights stand for equal weights, as all ones would);
  // otherwise copies (a transpose for column grouping, kept weights zeroed).
  const float* xg = W;
  const float* wg = S;
  std::vector<float> xv, wv;
  if (!row || keep != nullptr) {
    xv.resize(groups * len);
    wv.resize(groups * len);
    for (std::size_t o = 0; o < out; ++o) {
      for (std::size_t i = 0; i < in; ++i) {
        const std::size_t src = o * in + i;
        const std::size_t dst = row ? src : i * out + o;
        xv[dst] = W[src];
        wv[dst] = (keep && keep[src]) ? 0.0f : (S ? S[src] : 1.0f);
      }
    }
    xg = xv.data();
    wg = wv.data();
  }

  KMeans1DParams kp;
  kp.k = static_cast<int>(K);
  kp.method = p.method;
  kp.max_iter = p.max_iter;
  std::vector<std::uint8_t> labels(groups * len);
  kmeans1d_rows<float, std::uint8_t>(xg, wg, groups, len, kp, tables, labels.data(),
                                     group_sse, p.num_threads);

  if (row) {
    pack_codes(labels.data(), out, in, p.bits, packed);
  } else {
    std::vector<std::uint8_t> codes(out * in);
    for (std::size_t i = 0; i < in; ++i)
      for (std::size_t o = 0; o < out; ++o) codes[o * in + i] = labels[i * out + o];
    pack_codes(codes.data(), out, in, p.bits, packed);
  }
}

/// Materialise Ŵ (out x in, row-major fp32) of a validated LUT view; the
/// sparse part, if any, is added (Ŵ + S, each sum rounded once to fp32).
inline void lut_dequantize(const LutView& v, float* W) {
  for (std::size_t o = 0; o < v.out; ++o)
    for (std::size_t i = 0; i < v.in; ++i) W[o * v.in + i] = v.weight(o, i);
  if (!v.has_sparse()) return;
  for (std::size_t o = 0; o < v.out; ++o)
    for (std::int32_t k = v.sparse.row_ptr[o]; k < v.sparse.row_ptr[o + 1]; ++k)
      W[o * v.in + static_cast<std::size_t>(v.sparse.col_idx[k])] += half_bits_to_float(v.sparse.values[k]);
}

}  // namespace sqllm
