// Pack/unpack round trips for every width and odd lengths, the aligned
// 32-code decoder against the scalar reader, and bad input.
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "sqllm/packing.hpp"

using namespace sqllm;

TEST_CASE("pack/unpack round trip for every width and odd lengths", "[packing]") {
  std::mt19937 rng(1234);
  for (int bits = 1; bits <= 8; ++bits) {
    for (std::size_t n : {1u, 5u, 31u, 32u, 33u, 63u, 64u, 95u, 100u, 577u}) {
      const std::size_t rows = 3;
      std::vector<std::uint8_t> codes(rows * n);
      std::uniform_int_distribution<int> d(0, (1 << bits) - 1);
      for (auto& c : codes) c = static_cast<std::uint8_t>(d(rng));
      std::vector<std::uint32_t> packed(rows * packed_words(n, bits), 0xdeadbeefu);
      pack_codes(codes.data(), rows, n, bits, packed.data());
      std::vector<std::uint8_t> back(rows * n, 0xff);
      unpack_codes(packed.data(), rows, n, bits, back.data());
      INFO("bits=" << bits << " n=" << n);
      REQUIRE(back == codes);
      // Tail bits beyond n*bits are zero (the layout promises it).
      const std::size_t W = packed_words(n, bits);
      const std::size_t used = n * bits - (W - 1) * 32;
      if (used < 32) {
        for (std::size_t r = 0; r < rows; ++r) REQUIRE((packed[r * W + W - 1] >> used) == 0u);
      }
    }
  }
}

TEST_CASE("packed layout is the little-endian bit stream", "[packing]") {
  // 3-bit codes 0..7 repeated: code j at stream bits [3j, 3j+3).
  const std::size_t n = 40;
  std::vector<std::uint8_t> codes(n);
  for (std::size_t j = 0; j < n; ++j) codes[j] = static_cast<std::uint8_t>(j % 8);
  std::vector<std::uint32_t> packed(packed_words(n, 3));
  pack_codes(codes.data(), 1, n, 3, packed.data());
  for (std::size_t j = 0; j < n; ++j) {
    std::uint32_t v = 0;
    for (int b = 0; b < 3; ++b) {
      const std::size_t s = j * 3 + b;
      v |= ((packed[s / 32] >> (s % 32)) & 1u) << b;
    }
    REQUIRE(v == codes[j]);
  }
  // Code 10 straddles words 0 and 1: its low 2 bits at bits 30..31 of word 0.
  REQUIRE(((packed[0] >> 30) & 3u) == (codes[10] & 3u));
  REQUIRE((packed[1] & 1u) == ((codes[10] >> 2) & 1u));
}

template <int BITS>
void check_decode32() {
  std::mt19937 rng(BITS);
  const std::size_t n = 32 * 5;
  std::vector<std::uint8_t> codes(n);
  std::uniform_int_distribution<int> d(0, (1 << BITS) - 1);
  for (auto& c : codes) c = static_cast<std::uint8_t>(d(rng));
  std::vector<std::uint32_t> packed(packed_words(n, BITS));
  pack_codes(codes.data(), 1, n, BITS, packed.data());
  for (std::size_t c = 0; c < 5; ++c) {
    std::uint32_t out[32];
    decode32<BITS>(packed.data(), c, out);
    for (int j = 0; j < 32; ++j) REQUIRE(out[j] == codes[c * 32 + j]);
  }
}

TEST_CASE("decode32 equals the scalar reader", "[packing]") {
  check_decode32<1>();
  check_decode32<2>();
  check_decode32<3>();
  check_decode32<4>();
  check_decode32<5>();
  check_decode32<6>();
  check_decode32<7>();
  check_decode32<8>();
}

TEST_CASE("packing rejects bad input", "[packing]") {
  std::vector<std::uint8_t> codes{0, 1, 8};
  std::vector<std::uint32_t> packed(1);
  REQUIRE_THROWS_WITH(pack_codes(codes.data(), 1, 3, 3, packed.data()),
                      Catch::Contains("does not fit in 3 bits"));
  REQUIRE_THROWS_WITH(pack_codes(codes.data(), 1, 3, 0, packed.data()),
                      Catch::Contains("bits must be in 1..8, got 0"));
  REQUIRE_THROWS_WITH(pack_codes(codes.data(), 1, 3, 9, packed.data()),
                      Catch::Contains("bits must be in 1..8, got 9"));
  REQUIRE_THROWS_AS(unpack_codes(packed.data(), 1, 3, 12, codes.data()), Error);
}
