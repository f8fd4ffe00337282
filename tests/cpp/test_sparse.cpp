// Dense-and-Sparse: selection, residuals, CSR validation.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "sqllm/nuq.hpp"
#include "sqllm/sparse.hpp"

using namespace sqllm;

TEST_CASE("sparse_select keeps exactly the budgeted outliers and sensitive values", "[sparse]") {
  std::mt19937 rng(2);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  const std::size_t n = 1000;
  std::vector<float> W(n), S(n);
  for (auto& v : W) v = n01(rng);
  for (auto& v : S) v = std::fabs(n01(rng));
  SparseBudget b;
  b.outliers = 20;
  b.sensitive = 7;
  std::vector<std::uint8_t> keep(n);
  sparse_select(W.data(), S.data(), n, b, keep.data());
  REQUIRE(std::count(keep.begin(), keep.end(), 1) == 27);
  // Brute force: the 10 smallest and 10 largest values, then the 7 most sensitive of the rest.
  std::vector<std::size_t> idx(n);
  for (std::size_t i = 0; i < n; ++i) idx[i] = i;
  std::sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t c) { return W[a] < W[c]; });
  std::vector<std::uint8_t> expect(n, 0);
  for (std::size_t k = 0; k < 10; ++k) expect[idx[k]] = expect[idx[n - 1 - k]] = 1;
  std::vector<std::size_t> rest;
  for (std::size_t i = 0; i < n; ++i)
    if (!expect[i]) rest.push_back(i);
  std::sort(rest.begin(), rest.end(), [&](std::size_t a, std::size_t c) { return S[a] > S[c]; });
  for (std::size_t k = 0; k < 7; ++k) expect[rest[k]] = 1;
  REQUIRE(keep == expect);
}

TEST_CASE("sparse_select with tied values keeps exactly the budget", "[sparse]") {
  std::vector<float> W(10, 0.5f);  // every value tied
  W[3] = -1.0f;
  SparseBudget b;
  b.outliers = 10;  // the whole matrix: both tails must not overlap
  std::vector<std::uint8_t> keep(10);
  sparse_select(W.data(), nullptr, 10, b, keep.data());
  REQUIRE(std::count(keep.begin(), keep.end(), 1) == 10);
  b.outliers = 4;
  sparse_select(W.data(), nullptr, 10, b, keep.data());
  REQUIRE(std::count(keep.begin(), keep.end(), 1) == 4);
  REQUIRE(keep[3] == 1);  // the minimum is in the low tail
}

TEST_CASE("sparse budget follows the fraction and share", "[sparse]") {
  SparseBudget b = sparse_budget(100000, 0.0045, 1.0 / 9.0, true);
  REQUIRE(b.outliers + b.sensitive == 450);
  REQUIRE(b.sensitive == 50);
  b = sparse_budget(100000, 0.0045, 1.0 / 9.0, false);
  REQUIRE(b.sensitive == 0);
  REQUIRE(b.outliers == 450);
  REQUIRE_THROWS_WITH(sparse_budget(10, 1.5, 0.1, true), Catch::Contains("sparsity"));
  REQUIRE_THROWS_WITH(sparse_budget(10, 0.1, -0.1, true), Catch::Contains("sensitive_fraction"));
}

TEST_CASE("dense + sparse residual reproduces the kept weights", "[sparse]") {
  std::mt19937 rng(4);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  const std::size_t out = 16, in = 40;
  const int bits = 2;
  std::vector<float> W(out * in), S(out * in, 1.0f);
  for (auto& v : W) v = n01(rng);
  W[17] = 25.0f;  // an outlier
  std::vector<std::uint8_t> keep(out * in);
  SparseBudget b;
  b.outliers = 6;
  sparse_select(W.data(), S.data(), W.size(), b, keep.data());
  REQUIRE(keep[17] == 1);
  NuqParams prm;
  prm.bits = bits;
  std::vector<std::uint32_t> codes(out * packed_words(in, bits));
  std::vector<float> tables(out * 4);
  nuq_quantize(W.data(), S.data(), keep.data(), out, in, prm, codes.data(), tables.data());
  std::vector<std::int32_t> row_ptr, cols;
  std::vector<std::uint16_t> vals;
  sparse_residual(W.data(), codes.data(), tables.data(), keep.data(), out, in, bits,
                  GroupAxis::Row, row_ptr, cols, vals);
  REQUIRE(vals.size() == 6);
  CsrView v{row_ptr.data(), cols.data(), vals.data(), vals.size()};
  REQUIRE_NOTHROW(check_csr(v, out, in));
  std::vector<float> Wq(out * in);
  LutView lv;
  lv.codes = codes.data();
  lv.tables = tables.data();
  lv.out = out;
  lv.in = in;
  lv.bits = bits;
  lut_dequantize(lv, Wq.data());
  for (std::size_t o = 0; o < out; ++o)
    for (std::int32_t k = row_ptr[o]; k < row_ptr[o + 1]; ++k) {
      const std::size_t i = static_cast<std::size_t>(cols[k]);
      const float r = W[o * in + i] - Wq[o * in + i];
      // fp16 keeps 11 significant bits: relative error <= 2^-11.
      REQUIRE(std::fabs(Wq[o * in + i] + half_bits_to_float(vals[k]) - W[o * in + i]) <=
              std::fabs(r) * 0.000489 + 1e-7);
    }
  // The outlier did not pull row 0's table: its largest entry stays near the other values.
  REQUIRE(*std::max_element(tables.begin(), tables.begin() + 4) < 5.0f);
}

TEST_CASE("check_csr rejects malformed CSR", "[sparse]") {
  std::vector<std::uint16_t> vals(3, float_to_half_bits(1.0f));
  std::vector<std::int32_t> cols{0, 2, 1};
  {
    std::vector<std::int32_t> rp{0, 2, 3};
    CsrView v{rp.data(), cols.data(), vals.data(), 3};
    REQUIRE_NOTHROW(check_csr(v, 2, 4));
    REQUIRE_THROWS_WITH(check_csr(v, 2, 2), Catch::Contains("out of range"));
  }
  {
    std::vector<std::int32_t> rp{0, 3, 3};  // row 0 = {0, 2, 1}: unsorted
    CsrView v{rp.data(), cols.data(), vals.data(), 3};
    REQUIRE_THROWS_WITH(check_csr(v, 2, 4), Catch::Contains("strictly increasing"));
  }
  {
    std::vector<std::int32_t> rp{0, 2, 2};  // last != nnz
    CsrView v{rp.data(), cols.data(), vals.data(), 3};
    REQUIRE_THROWS_WITH(check_csr(v, 2, 4), Catch::Contains("must equal nnz"));
  }
  {
    std::vector<std::int32_t> rp{1, 2, 3};
    CsrView v{rp.data(), cols.data(), vals.data(), 3};
    REQUIRE_THROWS_WITH(check_csr(v, 2, 4), Catch::Contains("row_ptr[0]"));
  }
  {
    std::vector<std::int32_t> rp{0, 3, 2};
    std::vector<std::int32_t> c2{0, 1, 2};
    CsrView v{rp.data(), c2.data(), vals.data(), 2};
    REQUIRE_THROWS_AS(check_csr(v, 2, 4), Error);
  }
  {
    std::vector<std::int32_t> rp{0, 1, 3};
    std::vector<std::uint16_t> bad{float_to_half_bits(1.0f), 0x7e00u, float_to_half_bits(2.0f)};
    CsrView v{rp.data(), cols.data(), bad.data(), 3};
    REQUIRE_THROWS_WITH(check_csr(v, 2, 4), Catch::Contains("not finite"));
  }
}

TEST_CASE("half conversion round trips and rounds to nearest even", "[sparse]") {
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = half_bits_to_float(static_cast<std::uint16_t>(h));
    if (std::isnan(f)) continue;
    REQUIRE(float_to_half_bits(f) == h);
  }
  REQUIRE(float_to_half_bits(1.0f + 1.0f / 2048.0f) == float_to_half_bits(1.0f));  // tie -> even
  REQUIRE(float_to_half_bits(1.0f + 3.0f / 2048.0f) == float_to_half_bits(1.0f + 2.0f / 1024.0f));
  REQUIRE(float_to_half_bits(70000.0f) == 0x7c00u);
  REQUIRE(half_bits_to_float(0x0001u) == std::ldexp(1.0f, -24));
}

TEST_CASE("check_csr checks bounds before reading: an intermediate row_ptr beyond nnz",
          "[sparse]") {
  // Issue 12: row_ptr = {0, 1000, 2} with nnz = 2 used to walk row 0 over
  // col_idx[0..999] (a heap overflow under ASan) before the order check of
  // the next row could fail.  Exactly-sized heap arrays make any such read visible.
  auto cols = std::make_unique<std::int32_t[]>(2);
  auto vals = std::make_unique<std::uint16_t[]>(2);
  cols[0] = 0;
  cols[1] = 1;
  vals[0] = vals[1] = float_to_half_bits(1.0f);
  std::vector<std::int32_t> rp{0, 1000, 2};
  CsrView v{rp.data(), cols.get(), vals.get(), 2};
  REQUIRE_THROWS_WITH(check_csr(v, 2, 4), Catch::Contains("exceeds nnz=2"));
  // A negative last entry is not taken for a huge size_t.
  std::vector<std::int32_t> neg{0, 0, -1};
  CsrView w{neg.data(), cols.get(), vals.get(), 2};
  REQUIRE_THROWS_WITH(check_csr(w, 2, 4), Catch::Contains("must equal nnz"));
}
