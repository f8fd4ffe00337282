// sqllm/packing.hpp -- the one packed layout of b-bit codes (b = 1..32).
//
// Layout (docs/formats.md, "packed codes"): a matrix of codes with `rows` rows
// of `n` codes each is stored as `rows` independent little-endian bit streams
// of 32-bit words.  Row r occupies words [r*W, (r+1)*W) with
// W = packed_words(n, bits) = ceil(n*bits/32).  Code j of a row sits at stream
// bits [j*bits, j*bits + bits), where stream bit s is bit (s % 32) of word
// (s / 32) -- least significant first.  A code may straddle two words (bits
// 3, 5, 6, 7).  Unused tail bits of the last word are zero.
//
// Because 32 codes of b bits fill exactly b words, every run of 32 codes
// starting at a multiple of 32 is word aligned; the kernels use that to decode
// 32 codes at a time.
//
// The same stream holds codes of 1..32 bits: widths up to 8 (lookup tables,
// uniform grids) use the uint8 entry points pack_codes/unpack_codes, wider
// ones (vector-quantization index slots) pack_codes32/unpack_codes32 -- one
// layout, so a width <= 8 packs to the same words through either.
//
// These functions are shared by host and device code (SQLLM_HD).
#pragma once

#include <cstddef>
#include <cstdint>

#include "sqllm/config.hpp"
#include "sqllm/error.hpp"

namespace sqllm {

constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;

/// Widest code the packed stream holds (VPTQ index slots).
constexpr int kMaxCodeBits = 32;

/// Throws sqllm::Error unless 1 <= bits <= 8 (codes held in uint8).
inline void check_bits(int bits) {
  SQLLM_CHECK(bits >= kMinBits && bits <= kMaxBits, "bits must be in 1..8, got ", bits);
}

/// Throws sqllm::Error unless 1 <= bits <= 32 (the stream's full range).
inline void check_code_bits(int bits) {
  SQLLM_CHECK(bits >= kMinBits && bits <= kMaxCodeBits, "code bits must be in 1..32, got ", bits);
}

/// All-ones mask of the low `bits` bits (bits = 1..32; 1u << 32 would be undefined).
SQLLM_HD std::uint32_t code_mask(int bits) {
  return static_cast<std::uint32_t>((std::uint64_t{1} << bits) - 1u);
}

/// Number of 32-bit words one row of `n` codes of `bits` bits occupies.
SQLLM_HD std::size_t packed_words(std::size_t n, int bits) {
  return (n * static_cast<std::size_t>(bits) + 31) / 32;
}

/// Read code j of a packed row (no bounds checks).
SQLLM_HD std::uint32_t get_code(const std::uint32_t* row, std::size_t j, int bits) {
  const std::size_t bit = j * static_cast<std::size_t>(bits);
  const std::size_t w = bit >> 5;
  const unsigned off = static_cast<unsigned>(bit & 31u);
  std::uint64_t v = row[w] >> off;
  if (off + static_cast<unsigned>(bits) > 32u) {
    v |= static_cast<std::uint64_t>(row[w + 1]) << (32u - off);
  }
  return static_cast<std::uint32_t>(v) & code_mask(bits);
}

/// Decode the 32 codes that start at code index 32*c of a packed row into
/// out[0..31].  BITS is a compile-time width; the 32 codes occupy exactly
/// BITS words starting at word BITS*c.
template <int BITS, class Out>
SQLLM_HD void decode32(const std::uint32_t* row, std::size_t c, Out* out) {
  static_assert(BITS >= 1 && BITS <= 32, "BITS must be in 1..32");
  const std::uint32_t* w = row + static_cast<std::size_t>(BITS) * c;
  constexpr std::uint32_t mask = static_cast<std::uint32_t>((std::uint64_t{1} << BITS) - 1u);
  SQLLM_UNROLL
  for (int j = 0; j < 32; ++j) {
    const int bit = j * BITS;
    const int wi = bit >> 5;
    const int off = bit & 31;
    std::uint32_t v = w[wi] >> off;
    if (off + BITS > 32) v |= w[wi + 1] << (32 - off);
    out[j] = static_cast<Out>(v & mask);
  }
}

namespace detail {
/// The one packing loop behind pack_codes (uint8 codes) and pack_codes32.
template <class Code>
void pack_codes_impl(const Code* codes, std::size_t rows, std::size_t n, int bits,
                     std::uint32_t* out) {
  const std::size_t W = packed_words(n, bits);
  const std::uint32_t mask = code_mask(bits);
  for (std::size_t r = 0; r < rows; ++r) {
    std::uint32_t* dst = out + r * W;
    for (std::size_t k = 0; k < W; ++k) dst[k] = 0u;
    const Code* src = codes + r * n;
    for (std::size_t j = 0; j < n; ++j) {
      const std::uint32_t c = static_cast<std::uint32_t>(src[j]);
      SQLLM_CHECK((c & ~mask) == 0u, "code ", c, " at row ", r, ", index ", j,
                  " does not fit in ", bits, " bits");
      const std::size_t bit = j * static_cast<std::size_t>(bits);
      const std::size_t w = bit >> 5;
      const unsigned off = static_cast<unsigned>(bit & 31u);
      dst[w] |= c << off;
      if (off + static_cast<unsigned>(bits) > 32u) dst[w + 1] |= c >> (32u - off);
    }
  }
}
}  // namespace detail

/// Pack `rows` x `n` codes (row-major, each < 2^bits, bits 1..8) into `rows` x
/// packed_words(n, bits) words.  Throws if a code does not fit in `bits`.
inline void pack_codes(const std::uint8_t* codes, std::size_t rows, std::size_t n, int bits,
                       std::uint32_t* out) {
  check_bits(bits);
  detail::pack_codes_impl(codes, rows, n, bits, out);
}

/// pack_codes for codes of 1..32 bits held in uint32 (same layout).
inline void pack_codes32(const std::uint32_t* codes, std::size_t rows, std::size_t n, int bits,
                         std::uint32_t* out) {
  check_code_bits(bits);
  detail::pack_codes_impl(codes, rows, n, bits, out);
}

/// Inverse of pack_codes.
inline void unpack_codes(const std::uint32_t* packed, std::size_t rows, std::size_t n, int bits,
                         std::uint8_t* codes) {
  check_bits(bits);
  const std::size_t W = packed_words(n, bits);
  for (std::size_t r = 0; r < rows; ++r) {
    const std::uint32_t* src = packed + r * W;
    for (std::size_t j = 0; j < n; ++j) {
      codes[r * n + j] = static_cast<std::uint8_t>(get_code(src, j, bits));
    }
  }
}

/// Inverse of pack_codes32.
inline void unpack_codes32(const std::uint32_t* packed, std::size_t rows, std::size_t n, int bits,
                           std::uint32_t* codes) {
  check_code_bits(bits);
  const std::size_t W = packed_words(n, bits);
  for (std::size_t r = 0; r < rows; ++r) {
    const std::uint32_t* src = packed + r * W;
    for (std::size_t j = 0; j < n; ++j) codes[r * n + j] = get_code(src, j, bits);
  }
}

}  // namespace sqllm
