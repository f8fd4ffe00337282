// sqllm/quant/uniform.hpp -- uniform (integer) quantization grids: the format
// of RTN and GPTQ.
//
// A weight W (out x in) is cut into groups of `group_size` consecutive input
// columns (group_size = -1: one group spanning the whole row).  Each
// (row, group) has a scale s > 0 and an integer zero point z, both stored as
// fp16, and every weight a b-bit code q (b = 2..8):
//
//   Ŵ[o, i] = s[o, g(i)] * (q[o, i] - z[o, g(i)]),   q in [0, 2^b - 1]
//
// with g(i) = i / group_size, or g_idx[i] when GPTQ's act-order formed the
// groups in another column order (docs/formats.md, "uniform").
//
// Grid parameters are GPTQ's min-max rule (so that RTN and GPTQ share one
// grid and GPTQ reproduces upstream's): the range is widened to include 0
// (lo = min(0, min w), hi = max(0, max w)), so zero is exactly representable;
//   asymmetric: s = (hi - lo) / (2^b - 1),  z = round(-lo / s);
//   symmetric:  hi = max(|lo|, hi), s = 2 hi / (2^b - 1), z = 2^(b-1).
// An all-zero group (the only range that can be empty) gets lo = -1, hi = +1,
// so s > 0 always.  s is rounded to fp16 *before* any code is chosen: the
// codes are then optimal for the grid that is actually stored, and GPTQ's
// error feedback sees the stored grid's error.
//
// Codes round half to even (std::nearbyint), as torch.round and numpy.round do.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "sqllm/error.hpp"
#include "sqllm/half.hpp"
#include "sqllm/packing.hpp"

namespace sqllm {

constexpr int kUniformMinBits = 2;
constexpr int kUniformMaxBits = 8;

/// Parameters of a uniform grid (documented defaults, no globals).
struct UniformParams {
  int bits = 4;          ///< 2..8
  int group_size = -1;   ///< -1 (one group per row) or 32, 64, 128
  bool sym = false;      ///< symmetric grid (z = 2^(b-1)) instead of asymmetric
};

/// Throws sqllm::Error unless bits is 2..8 and group_size is -1, 32, 64 or 128.
inline void check_uniform_params(const UniformParams& p) {
  SQLLM_CHECK(p.bits >= kUniformMinBits && p.bits <= kUniformMaxBits,
              "uniform quantization: bits must be in 2..8, got ", p.bits);
  SQLLM_CHECK(p.group_size == -1 || p.group_size == 32 || p.group_size == 64 ||
                  p.group_size == 128,
              "uniform quantization: group_size must be -1 (per row), 32, 64 or 128, got ",
              p.group_size);
}

/// Number of groups per row for `in` input columns.
inline std::size_t uniform_num_groups(std::size_t in, int group_size) {
  return group_size < 0 ? std::size_t{1}
                        : (in + static_cast<std::size_t>(group_size) - 1) /
                              static_cast<std::size_t>(group_size);
}

/// Round a positive scale to the nearest fp16 value (the stored precision),
/// never to zero or infinity.
inline float round_scale_to_half(double s) {
  float f = half_bits_to_float(float_to_half_bits(static_cast<float>(s)));
  if (!(f > 0.0f)) f = half_bits_to_float(0x0001u);  // smallest positive fp16 (subnormal)
  if (std::isinf(f)) f = half_bits_to_float(0x7bffu);  // largest finite fp16
  return f;
}

/// The grid of one (row, group): scale (fp16-exact), zero point, top code.
struct UniformGrid {
  float scale = 1.0f;
  float zero = 0.0f;
  int maxq = 15;

  /// Grid for values whose min and max are `lo` and `hi` (GPTQ's rule, above).
  static UniformGrid from_range(double lo, double hi, int bits, bool sym) {
    UniformGrid g;
    g.maxq = (1 << bits) - 1;
    lo = std::min(lo, 0.0);
    hi = std::max(hi, 0.0);
    if (sym) {
      hi = std::max(std::abs(lo), hi);
      if (lo < 0) lo = -hi;
    }
    if (lo == 0.0 && hi == 0.0) {
      lo = -1.0;
      hi = 1.0;
    }
    g.scale = round_scale_to_half((hi - lo) / g.maxq);
    g.zero = sym ? static_cast<float>((g.maxq + 1) / 2)
                 : static_cast<float>(std::nearbyint(-lo / static_cast<double>(g.scale)));
    // -lo/s <= maxq up to the scale's rounding; keep z a valid code.
    g.zero = std::min(std::max(g.zero, 0.0f), static_cast<float>(g.maxq));
    return g;
  }

  /// Code of value w (nearest grid point, clamped).
  int code(double w) const {
    const double q = std::nearbyint(w / static_cast<double>(scale)) + zero;
    return static_cast<int>(std::min(std::max(q, 0.0), static_cast<double>(maxq)));
  }

  /// The value code q stands for (exact in double: s and z are small floats).
  double value(int q) const {
    return static_cast<double>(scale) * (static_cast<double>(q) - static_cast<double>(zero));
  }
};

/// One view of a uniform-format layer (codes, fp16 scales/zeros as raw bits,
/// optional g_idx), shared by the CPU kernel, the reference, dequantize and
/// the bindings: one place validates it.
struct UniformView {
  const std::uint32_t* qweight = nullptr;  ///< out x packed_words(in, bits)
  const std::uint16_t* scales = nullptr;   ///< out x groups, fp16 bits
  const std::uint16_t* zeros = nullptr;    ///< out x groups, fp16 bits
  const std::int32_t* g_idx = nullptr;     ///< in, or nullptr: g(i) = i / group_size
  std::size_t out = 0;
  std::size_t in = 0;
  int bits = 4;
  int group_size = -1;
  /// Groups per row (columns of scales/zeros).  Without g_idx this must be
  /// ceil(in / group_size) (1 for per-row grids); with g_idx, the g_idx range.
  std::size_t num_groups = 1;

  std::size_t groups() const { return num_groups; }
};

/// Validate a view's scalars and g_idx: bits, group size, positive shapes, and
/// 0 <= g_idx[i] < groups.  Scales must be finite and > 0, zeros in [0, 2^b-1].
inline void check_uniform_view(const UniformView& v) {
  SQLLM_CHECK(v.bits >= kUniformMinBits && v.bits <= kUniformMaxBits,
              "uniform layer: bits must be in 2..8, got ", v.bits);
  SQLLM_CHECK(v.group_size == -1 || v.group_size == 32 || v.group_size == 64 ||
                  v.group_size == 128,
              "uniform layer: group_size must be -1, 32, 64 or 128, got ", v.group_size);
  SQLLM_CHECK(v.in > 0 && v.out > 0, "uniform layer: in_features and out_features must be > 0, got in=",
              v.in, ", out=", v.out);
  SQLLM_CHECK(v.qweight && v.scales && v.zeros, "uniform layer: qweight, scales and zeros are required");
  const std::size_t G = v.groups();
  SQLLM_CHECK(G > 0, "uniform layer: at least one group is required");
  if (v.g_idx == nullptr) {
    SQLLM_CHECK(G == uniform_num_groups(v.in, v.group_size), "uniform layer: scales/zeros must have ",
                uniform_num_groups(v.in, v.group_size), " groups per row for in_features=", v.in,
                " and group_size=", v.group_size, ", got ", G);
  } else {
    for (std::size_t i = 0; i < v.in; ++i)
      SQLLM_CHECK(v.g_idx[i] >= 0 && static_cast<std::size_t>(v.g_idx[i]) < G, "uniform layer: g_idx[",
                  i, "] = ", v.g_idx[i], " is outside [0, ", G, ")");
  }
  const float maxq = static_cast<float>((1 << v.bits) - 1);
  for (std::size_t k = 0; k < v.out * G; ++k) {
    const float s = half_bits_to_float(v.scales[k]);
    const float z = half_bits_to_float(v.zeros[k]);
    SQLLM_CHECK(std::isfinite(s) && s > 0.0f, "uniform layer: scale at row ", k / G, ", group ",
                k % G, " must be finite and > 0, got ", s);
    SQLLM_CHECK(z >= 0.0f && z <= maxq, "uniform layer: zero at row ", k / G, ", group ", k % G,
                " must be in [0, ", maxq, "], got ", z);
  }
}

/// Group of input column i under a view.
inline std::size_t uniform_group_of(const UniformView& v, std::size_t i) {
  if (v.g_idx != nullptr) return static_cast<std::size_t>(v.g_idx[i]);
  return v.group_size < 0 ? 0 : i / static_cast<std::size_t>(v.group_size);
}

/// Materialise Ŵ (out x in, row-major fp32) from a validated view.
inline void uniform_dequantize(const UniformView& v, float* w) {
  const std::size_t G = v.groups();
  const std::size_t words = packed_words(v.in, v.bits);
  for (std::size_t o = 0; o < v.out; ++o) {
    for (std::size_t i = 0; i < v.in; ++i) {
      const std::size_t g = uniform_group_of(v, i);
      const float s = half_bits_to_float(v.scales[o * G + g]);
      const float z = half_bits_to_float(v.zeros[o * G + g]);
      const float q = static_cast<float>(get_code(v.qweight + o * words, i, v.bits));
      w[o * v.in + i] = s * (q - z);
    }
  }
}

/// Round-to-nearest: grids per (row, group) from min-max, codes by rounding.
/// W is out x in row-major fp32 (finite).  Writes codes (out x in, uint8),
/// scales and zeros (out x groups, fp16 bits).
inline void uniform_rtn(const float* W, std::size_t out, std::size_t in, const UniformParams& p,
                        std::uint8_t* codes, std::uint16_t* scales, std::uint16_t* zeros) {
  check_uniform_params(p);
  SQLLM_CHECK(out > 0 && in > 0, "uniform quantization: weight must be non-empty, got (", out, ", ",
              in, ")");
  const std::size_t G = uniform_num_groups(in, p.group_size);
  const std::size_t gs = p.group_size < 0 ? in : static_cast<std::size_t>(p.group_size);
  for (std::size_t k = 0; k < out * in; ++k)
    SQLLM_CHECK(std::isfinite(W[k]), "uniform quantization: weight contains NaN or Inf at row ",
                k / in, ", column ", k % in);
  for (std::size_t o = 0; o < out; ++o) {
    for (std::size_t g = 0; g < G; ++g) {
      const std::size_t i0 = g * gs, i1 = std::min(in, i0 + gs);
      double lo = std::numeric_limits<double>::infinity(), hi = -lo;
      for (std::size_t i = i0; i < i1; ++i) {
        lo = std::min(lo, static_cast<double>(W[o * in + i]));
        hi = std::max(hi, static_cast<double>(W[o * in + i]));
      }
      const UniformGrid grid = UniformGrid::from_range(lo, hi, p.bits, p.sym);
      scales[o * G + g] = float_to_half_bits(grid.scale);
      zeros[o * G + g] = float_to_half_bits(grid.zero);
      for (std::size_t i = i0; i < i1; ++i)
        codes[o * in + i] = static_cast<std::uint8_t>(grid.code(W[o * in + i]));
    }
  }
}

}  // namespace sqllm
