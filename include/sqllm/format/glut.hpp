// sqllm/format/glut.hpp -- the grouped-lookup-table ("glut") format as one view.
//
// A weight W (out x in) cut along each row into groups of g consecutive input
// columns (G = ceil(in / g) groups; the last one is shorter when g does not
// divide in).  Every (row o, group j) has a table of K = 2^bits entries stored
// compactly -- uint8 q, fp16 scale and offset:
//
//   Ŵ[o, i] = glut_entry(tables[(o G + j) K + code(o, i)], scales[o G + j], offsets[o G + j]),
//   j = i / g,   glut_entry(q, s, t) = fma(s, float(q), t)   (fp32, one rounding)
//
// with the codes packed as packing.hpp (one bit stream per output row).
// `GlutView` points at those arrays (it owns nothing).  The same struct is
// taken by the CPU kernels and references (sqllm/glut.hpp), the CUDA launchers
// (cuda/sqllm_cuda_glut.h, with device pointers) and the bindings.  Two checks:
// check_glut_layout (parameters, shapes, non-null arrays; safe on device
// pointers) and check_glut_view (that plus the contents: finite entries, zero
// tail bits; host memory only).  This header is light (no Eigen) so that the
// CUDA sources can include it.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "sqllm/config.hpp"
#include "sqllm/error.hpp"
#include "sqllm/half.hpp"
#include "sqllm/packing.hpp"

namespace sqllm {

constexpr int kGlutMinBits = 1;
constexpr int kGlutMaxBits = 8;
constexpr int kGlutMinGroup = 1;

/// Number of groups (tables) per row.
SQLLM_HD std::size_t glut_num_groups(std::size_t in, std::size_t g) { return (in + g - 1) / g; }

/// Entry value from the compact form: fp32 fused multiply-add, one rounding.
/// The one definition; host and device code (cuda/glut_matmul.cu) call it, so
/// every path decodes the same fp32 values bit for bit.
SQLLM_HD float glut_entry(std::uint8_t q, float scale, float offset) {
#if defined(__CUDA_ARCH__)
  return fmaf(scale, static_cast<float>(q), offset);
#else
  return std::fma(scale, static_cast<float>(q), offset);
#endif
}

/// A view of a packed glut layer (all pointers borrowed; host or device memory).
struct GlutView {
  const std::uint32_t* qweight = nullptr;  ///< out x packed_words(in, bits)
  const std::uint8_t* tables = nullptr;    ///< out x G x K
  const std::uint16_t* scales = nullptr;   ///< out x G (fp16 bits)
  const std::uint16_t* offsets = nullptr;  ///< out x G (fp16 bits)
  std::size_t out = 0, in = 0;
  int bits = 4;
  int group_size = 128;
  std::size_t groups() const { return glut_num_groups(in, static_cast<std::size_t>(group_size)); }
  std::size_t K() const { return std::size_t{1} << bits; }
  std::size_t words() const { return packed_words(in, bits); }
};

/// Throws unless the view's parameters and pointers are usable: bits 1..8,
/// group_size >= 1, a non-empty shape and non-null arrays.  Reads no array
/// (device pointers are fine).
inline void check_glut_layout(const GlutView& v) {
  SQLLM_CHECK(v.bits >= kGlutMinBits && v.bits <= kGlutMaxBits, "glut: bits must be in 1..8, got ",
              v.bits);
  SQLLM_CHECK(v.group_size >= kGlutMinGroup, "glut: group_size must be >= 1, got ", v.group_size);
  SQLLM_CHECK(v.out > 0 && v.in > 0, "glut: the layer must be non-empty, got (", v.out, ", ", v.in, ")");
  SQLLM_CHECK(v.qweight != nullptr && v.tables != nullptr && v.scales != nullptr && v.offsets != nullptr,
              "glut: qweight, tables, scales and offsets are required, got a null pointer");
}

/// Throws unless the view is consistent: check_glut_layout, then finite
/// scale/offset and decoded entries, and zero tail bits after each row's last
/// code (host memory only).
inline void check_glut_view(const GlutView& v) {
  check_glut_layout(v);
  const std::size_t G = v.groups(), K = v.K();
  for (std::size_t t = 0; t < v.out * G; ++t) {
    const float s = half_bits_to_float(v.scales[t]), o = half_bits_to_float(v.offsets[t]);
    SQLLM_CHECK(std::isfinite(s) && std::isfinite(o), "glut: scale/offset of table ", t,
                " (row ", t / G, ", group ", t % G, ") is not finite");
    for (std::size_t k = 0; k < K; ++k)
      SQLLM_CHECK(std::isfinite(glut_entry(v.tables[t * K + k], s, o)), "glut: entry ", k,
                  " of table ", t, " overflows float32");
  }
  if ((v.in * static_cast<std::size_t>(v.bits)) % 32 != 0) {  // tail bits must be zero
    const std::size_t words = v.words();
    const unsigned used = static_cast<unsigned>((v.in * static_cast<std::size_t>(v.bits)) % 32);
    const std::uint32_t mask = ~((std::uint32_t{1} << used) - 1u);
    for (std::size_t o = 0; o < v.out; ++o)
      SQLLM_CHECK((v.qweight[o * words + words - 1] & mask) == 0u, "glut: row ", o,
                  " of qweight has non-zero bits past its last code (corrupt data)");
  }
}

}  // namespace sqllm
