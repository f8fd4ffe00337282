// The bf16-activation LUT matmul (sqllm/lut_matmul_bf16.hpp) against a plain
// double loop over the same bf16 operands.  Small-integer tables, x and sparse
// values keep every partial sum an integer below 2^24, so the fp32 result must
// be exact whatever the kernel's summation order.  Run under ASan/UBSan too,
// which checks the masked and unmasked code loads at row ends.
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "sqllm/lut_matmul_bf16.hpp"

using namespace sqllm;

TEST_CASE("bf16 conversion rounds to nearest even", "[bf16]") {
  CHECK(float_to_bf16_bits(1.0f) == 0x3F80);
  CHECK(bf16_bits_to_float(float_to_bf16_bits(3.0f)) == 3.0f);
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to even -> 1
  CHECK(bf16_bits_to_float(float_to_bf16_bits(1.0f + 0.00390625f)) == 1.0f);
  // 1 + 3*2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even -> 1 + 2^-6
  CHECK(bf16_bits_to_float(float_to_bf16_bits(1.0f + 3 * 0.00390625f)) == 1.0f + 0.015625f);
}

TEST_CASE("bf16 LUT matmul is exact on small-integer data", "[bf16]") {
  if (!cpu_supports_bf16_matmul()) {
    WARN("no AVX512-BF16 here: the bf16 kernel is not run");
    return;
  }
  std::mt19937 g(42);
  for (int bits = 2; bits <= 4; ++bits) {
    for (std::size_t in : {1u, 31u, 32u, 33u, 95u, 577u}) {
      for (std::size_t out : {1u, 2u, 5u}) {
        for (std::size_t batch : {1u, 4u, 9u}) {
          const std::size_t K = std::size_t{1} << bits, W = packed_words(in, bits);
          std::uniform_int_distribution<int> code(0, static_cast<int>(K) - 1), val(-8, 8), xv(-4, 4);
          std::vector<std::uint8_t> raw(out * in);
          for (auto& c : raw) c = static_cast<std::uint8_t>(code(g));
          std::vector<std::uint32_t> codes(out * W);
          pack_codes(raw.data(), out, in, bits, codes.data());
          std::vector<float> tab(out * K);
          for (auto& t : tab) t = static_cast<float>(val(g));
          std::vector<std::uint16_t> x(batch * in);
          for (auto& v : x) v = float_to_bf16_bits(static_cast<float>(xv(g)));
          // one sparse entry per row at column (o * 7) % in, value o - 2
          std::vector<std::int32_t> row_ptr(out + 1), col(out);
          std::vector<std::uint16_t> sv(out);
          for (std::size_t o = 0; o < out; ++o) {
            row_ptr[o + 1] = static_cast<std::int32_t>(o + 1);
            col[o] = static_cast<std::int32_t>((o * 7) % in);
            sv[o] = float_to_half_bits(static_cast<float>(o) - 2.0f);
          }
          LutView v;
          v.codes = codes.data();
          v.tables = tab.data();
          v.out = out;
          v.in = in;
          v.bits = bits;
          v.sparse = CsrView{row_ptr.data(), col.data(), sv.data(), out};
          std::vector<float> y(batch * out);
          lut_matmul_bf16(v, x.data(), batch, y.data(), 1);
          for (std::size_t b = 0; b < batch; ++b)
            for (std::size_t o = 0; o < out; ++o) {
              double s = 0;
              for (std::size_t i = 0; i < in; ++i)
                s += static_cast<double>(tab[o * K + raw[o * in + i]]) * bf16_bits_to_float(x[b * in + i]);
              s += (static_cast<double>(o) - 2.0) * bf16_bits_to_float(x[b * in + col[o]]);
              INFO("bits " << bits << " in " << in << " out " << out << " batch " << batch);
              CHECK(static_cast<double>(y[b * out + o]) == s);
            }
        }
      }
    }
  }
}

TEST_CASE("bf16 LUT matmul refuses formats it does not cover", "[bf16]") {
  std::vector<std::uint32_t> codes(2, 0);
  std::vector<float> tab(4, 1.0f);
  std::vector<std::uint16_t> x(64, 0);
  std::vector<float> y(1);
  LutView v;
  v.codes = codes.data();
  v.tables = tab.data();
  v.out = 1;
  v.in = 64;
  v.bits = 1;
  CHECK_THROWS_WITH(lut_matmul_bf16(v, x.data(), 1, y.data()),
                    Catch::Contains("2..4-bit"));
}
