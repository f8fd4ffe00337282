// The CPU LUT matmul against the scalar reference (reference/lut_matmul.hpp),
// the quantizer's output against its definition, and bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "sqllm/lut_matmul.hpp"
#include "sqllm/nuq.hpp"
#include "sqllm/reference/lut_matmul.hpp"
#include "sqllm/sparse.hpp"

using namespace sqllm;

namespace {

struct Problem {
  std::size_t out, in, batch;
  int bits;
  GroupAxis axis;
  std::vector<std::uint32_t> codes;
  std::vector<float> tables, x;

  LutView view(const CsrView* csr = nullptr) const {
    LutView v;
    v.codes = codes.data();
    v.tables = tables.data();
    v.out = out;
    v.in = in;
    v.bits = bits;
    v.axis = axis;
    if (csr != nullptr) v.sparse = *csr;
    return v;
  }
};

LutView make_view(const std::uint32_t* codes, const float* tables, std::size_t out, std::size_t in,
                  int bits, GroupAxis axis) {
  LutView v;
  v.codes = codes;
  v.tables = tables;
  v.out = out;
  v.in = in;
  v.bits = bits;
  v.axis = axis;
  return v;
}

// Small-integer tables and inputs: every product and partial sum is an
// integer below 2^24, so fp32 accumulation is exact in any order and the
// kernel must equal the float64 reference exactly.
Problem integer_problem(std::size_t out, std::size_t in, std::size_t batch, int bits,
                        GroupAxis axis, unsigned seed) {
  std::mt19937 rng(seed);
  Problem p{out, in, batch, bits, axis, {}, {}, {}};
  const std::size_t K = std::size_t{1} << bits;
  std::uniform_int_distribution<int> code(0, static_cast<int>(K) - 1), small(-8, 8);
  std::vector<std::uint8_t> c(out * in);
  for (auto& v : c) v = static_cast<std::uint8_t>(code(rng));
  p.codes.resize(out * packed_words(in, bits));
  pack_codes(c.data(), out, in, bits, p.codes.data());
  p.tables.resize(nuq_num_tables(out, in, axis) * K);
  for (auto& t : p.tables) t = static_cast<float>(small(rng));
  p.x.resize(batch * in);
  for (auto& v : p.x) v = static_cast<float>(small(rng));
  return p;
}

}  // namespace

TEST_CASE("LUT matmul equals the reference exactly on integer data", "[lut_matmul]") {
  for (int bits = 1; bits <= 8; ++bits) {
    for (GroupAxis axis : {GroupAxis::Row, GroupAxis::Column}) {
      for (auto shape : {std::vector<std::size_t>{1, 1, 1}, {7, 33, 1}, {13, 64, 3},
                         {5, 100, 17}, {64, 96, 8}}) {
        Problem p = integer_problem(shape[0], shape[1], shape[2], bits, axis,
                                    static_cast<unsigned>(bits * 100 + shape[1]));
        std::vector<float> y(p.batch * p.out);
        std::vector<double> ref(p.batch * p.out);
        lut_matmul(p.view(), p.x.data(), p.batch, y.data());
        reference::lut_matmul(p.view(), p.x.data(), p.batch, ref.data());
        INFO("bits=" << bits << " axis=" << to_string(axis) << " out=" << p.out << " in=" << p.in
                     << " batch=" << p.batch);
        for (std::size_t k = 0; k < y.size(); ++k) REQUIRE(static_cast<double>(y[k]) == ref[k]);
      }
    }
  }
}

TEST_CASE("every CPU kernel path equals the reference exactly on integer data",
          "[lut_matmul][dispatch]") {
  // Forced paths: the SIMD ones where this CPU has them (the others must refuse).
  // Shapes: batch 1..17 across the 8-row blocking, 64 and 65 (GEMM path), `in` below, at and off the
  // 8- and 16-code groups, and rows whose last group needs a short load; at batch 1, `in` at and
  // past the 64-byte blocks of the word-aligned AVX-512 kernel (128/256/512 codes at 4/2/1 bits),
  // with 16-code groups and single codes after them, and 21 rows (two OpenMP chunks of 16).
  for (CpuKernel k : {CpuKernel::Scalar, CpuKernel::Avx2, CpuKernel::Avx512}) {
    if (!cpu_supports(k)) {
      std::vector<float> x(8), y(4), t(4 * 8);
      std::vector<std::uint32_t> c(4 * packed_words(8, 3));
      REQUIRE_THROWS_WITH(lut_matmul(make_view(c.data(), t.data(), 4, 8, 3, GroupAxis::Row),
                                     x.data(), 1, y.data(), 0, false, k),
                          Catch::Contains("not supported"));
      continue;
    }
    for (int bits = 1; bits <= 8; ++bits) {
      for (GroupAxis axis : {GroupAxis::Row, GroupAxis::Column}) {
        for (auto shape : {std::vector<std::size_t>{1, 1, 1}, {3, 15, 1}, {5, 16, 2},
                           {7, 17, 4}, {9, 31, 8}, {33, 48, 9}, {6, 129, 16}, {4, 250, 17},
                           {17, 512, 1}, {3, 1000, 5}, {2, 4099, 3}, {70, 37, 64},
                           {5, 300, 65}, {3, 128, 1}, {21, 700, 1}, {4, 1037, 1},
                           {2, 1536, 1}, {3, 255, 1}}) {
          Problem p = integer_problem(shape[0], shape[1], shape[2], bits, axis,
                                      static_cast<unsigned>(bits * 1000 + shape[1] + shape[2]));
          std::vector<float> y(p.batch * p.out, -1.0f);
          std::vector<double> ref(p.batch * p.out);
          lut_matmul(p.view(), p.x.data(), p.batch, y.data(), 0, false, k);
          reference::lut_matmul(p.view(), p.x.data(), p.batch, ref.data());
          INFO("kernel=" << to_string(k) << " bits=" << bits << " axis=" << to_string(axis)
                         << " out=" << p.out << " in=" << p.in << " batch=" << p.batch);
          for (std::size_t i = 0; i < y.size(); ++i) REQUIRE(static_cast<double>(y[i]) == ref[i]);
        }
      }
    }
  }
  REQUIRE(cpu_supports(best_cpu_kernel()));
  REQUIRE_THROWS_WITH(parse_cpu_kernel("sse9"), Catch::Contains("cpu kernel must be"));
}

TEST_CASE("LUT matmul with a sparse part equals dequantize + CSR", "[lut_matmul][sparse]") {
  // 3 bits at batch 4 (the byte-aligned kernels), 4 bits at batch 1 with in=300 (the
  // word-aligned AVX-512 kernel: two 128-code blocks, then groups and a tail).
  for (auto prob : {std::vector<std::size_t>{9, 70, 4, 3}, {9, 300, 1, 4}}) {
    const int bits = static_cast<int>(prob[3]);
    Problem p = integer_problem(prob[0], prob[1], prob[2], bits, GroupAxis::Row, 7);
    // CSR with integer fp16 values (exact in fp16 and in fp32 sums).
    std::vector<std::int32_t> row_ptr{0}, cols;
    std::vector<std::uint16_t> vals;
    std::mt19937 rng(3);
    for (std::size_t o = 0; o < p.out; ++o) {
      for (std::int32_t i = 0; i < static_cast<std::int32_t>(p.in);
           i += 1 + static_cast<int>(rng() % 9)) {
        cols.push_back(i);
        vals.push_back(float_to_half_bits(static_cast<float>(static_cast<int>(rng() % 7) - 3)));
      }
      row_ptr.push_back(static_cast<std::int32_t>(cols.size()));
    }
    CsrView csr{row_ptr.data(), cols.data(), vals.data(), vals.size()};
    std::vector<double> ref(p.batch * p.out);
    reference::lut_matmul(p.view(&csr), p.x.data(), p.batch, ref.data());
    for (CpuKernel k : {CpuKernel::Scalar, CpuKernel::Avx2, CpuKernel::Avx512}) {
      if (!cpu_supports(k)) continue;
      INFO("kernel=" << to_string(k) << " bits=" << bits << " batch=" << p.batch);
      std::vector<float> y(p.batch * p.out);
      lut_matmul(p.view(&csr), p.x.data(), p.batch, y.data(), 0, false, k);
      for (std::size_t i = 0; i < y.size(); ++i) REQUIRE(static_cast<double>(y[i]) == ref[i]);
    }
  }
}

TEST_CASE("LUT matmul on random real data is within fp32 rounding", "[lut_matmul]") {
  std::mt19937 rng(11);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  const std::size_t out = 37, in = 515, batch = 5;
  const int bits = 4;
  std::vector<float> W(out * in), x(batch * in);
  for (auto& v : W) v = n01(rng);
  for (auto& v : x) v = n01(rng);
  NuqParams prm;
  prm.bits = bits;
  std::vector<std::uint32_t> codes(out * packed_words(in, bits));
  std::vector<float> tables(out * 16);
  nuq_quantize(W.data(), nullptr, nullptr, out, in, prm, codes.data(), tables.data());
  std::vector<float> y(batch * out);
  std::vector<double> ref(batch * out);
  const LutView view = make_view(codes.data(), tables.data(), out, in, bits, GroupAxis::Row);
  lut_matmul(view, x.data(), batch, y.data());
  reference::lut_matmul(view, x.data(), batch, ref.data());
  // fp32 summation of `in` products: |error| <= in * eps32 * sum|w x| (a
  // standard bound for any summation order).
  std::vector<float> Wq(out * in);
  lut_dequantize(view, Wq.data());
  for (std::size_t b = 0; b < batch; ++b)
    for (std::size_t o = 0; o < out; ++o) {
      double mag = 0.0;
      for (std::size_t i = 0; i < in; ++i) mag += std::fabs(double(Wq[o * in + i]) * x[b * in + i]);
      REQUIRE(std::fabs(y[b * out + o] - ref[b * out + o]) <= in * 6e-8 * mag);
    }
}

TEST_CASE("nuq_quantize: codes are nearest entries of the group's table", "[nuq]") {
  std::mt19937 rng(5);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  for (GroupAxis axis : {GroupAxis::Row, GroupAxis::Column}) {
    const std::size_t out = 11, in = 45;
    const int bits = 3;
    std::vector<float> W(out * in), S(out * in);
    for (auto& v : W) v = n01(rng);
    for (auto& v : S) v = n01(rng) * n01(rng);
    for (auto& v : S) v = v * v;
    NuqParams prm;
    prm.bits = bits;
    prm.axis = axis;
    std::vector<std::uint32_t> codes(out * packed_words(in, bits));
    std::vector<float> tables(nuq_num_tables(out, in, axis) * 8);
    std::vector<double> sse(nuq_num_tables(out, in, axis));
    nuq_quantize(W.data(), S.data(), nullptr, out, in, prm, codes.data(), tables.data(), sse.data());
    std::vector<double> sse_check(sse.size(), 0.0);
    for (std::size_t o = 0; o < out; ++o)
      for (std::size_t i = 0; i < in; ++i) {
        const std::size_t g = axis == GroupAxis::Row ? o : i;
        const float* t = &tables[g * 8];
        const auto c = get_code(&codes[o * packed_words(in, bits)], i, bits);
        const float w = W[o * in + i];
        for (int k = 0; k < 8; ++k) REQUIRE(std::fabs(w - t[c]) <= std::fabs(w - t[k]));
        sse_check[g] += double(S[o * in + i]) * (w - t[c]) * (w - t[c]);
      }
    for (std::size_t g = 0; g < sse.size(); ++g)
      REQUIRE(sse[g] == Approx(sse_check[g]).epsilon(1e-6).margin(1e-12));
  }
}

TEST_CASE("quantizer and kernel reject bad input", "[nuq][lut_matmul]") {
  std::vector<float> W(4 * 8, 0.5f), S(4 * 8, 1.0f), tables(4 * 8);
  std::vector<std::uint32_t> codes(4 * packed_words(8, 3));
  NuqParams prm;
  prm.bits = 3;
  W[5] = std::nanf("");
  REQUIRE_THROWS_WITH(nuq_quantize(W.data(), S.data(), nullptr, 4, 8, prm, codes.data(), tables.data()),
                      Catch::Contains("non-finite"));
  W[5] = 0.5f;
  S[3] = -1.0f;
  REQUIRE_THROWS_WITH(nuq_quantize(W.data(), S.data(), nullptr, 4, 8, prm, codes.data(), tables.data()),
                      Catch::Contains("sensitivity"));
  prm.bits = 9;
  REQUIRE_THROWS_WITH(nuq_quantize(W.data(), nullptr, nullptr, 4, 8, prm, codes.data(), tables.data()),
                      Catch::Contains("bits must be in 1..8, got 9"));
  prm.bits = 3;
  REQUIRE_THROWS_WITH(nuq_quantize(W.data(), nullptr, nullptr, 0, 8, prm, codes.data(), tables.data()),
                      Catch::Contains("non-empty"));
  REQUIRE_THROWS_WITH(parse_group_axis("diagonal"), Catch::Contains("group_axis"));
  std::vector<float> x(8), y(4);
  REQUIRE_THROWS_WITH(lut_matmul(make_view(codes.data(), tables.data(), 4, 8, 0, GroupAxis::Row),
                                 x.data(), 1, y.data()),
                      Catch::Contains("bits"));
  // One validation path: an out-of-range sparse column is named, before any read.
  std::vector<std::int32_t> rp{0, 1, 1, 1, 1}, ci{8};
  std::vector<std::uint16_t> vv{float_to_half_bits(1.0f)};
  LutView bad = make_view(codes.data(), tables.data(), 4, 8, 3, GroupAxis::Row);
  bad.sparse = CsrView{rp.data(), ci.data(), vv.data(), 1};
  REQUIRE_THROWS_WITH(lut_matmul(bad, x.data(), 1, y.data()), Catch::Contains("col_idx[0]=8 out of range"));
  REQUIRE_THROWS_WITH(reference::lut_matmul(bad, x.data(), 1, nullptr), Catch::Contains("out of range"));
  bad.sparse = CsrView{nullptr, ci.data(), vv.data(), 1};
  REQUIRE_THROWS_WITH(lut_matmul(bad, x.data(), 1, y.data()), Catch::Contains("without row_ptr"));
}
