// Fuzz target for the CSR validator (sqllm/csr.hpp) and the CPU kernel that
// trusts it: every input either is rejected by check_csr with sqllm::Error, or
// is walked by lut_matmul without any out-of-bounds access (the binary is
// built with ASan + UBSan, so a bad read is a report, not luck).
//
// LLVMFuzzerTestOneInput is the libFuzzer entry point (clang:
// -fsanitize=fuzzer,address,undefined).  Without clang (g++ has no libFuzzer)
// the same target is driven by the seeded random-mutation loop in main()
// below: `fuzz_csr ITERATIONS SEED`; CTest runs a bounded number.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "sqllm/csr.hpp"
#include "sqllm/error.hpp"
#include "sqllm/half.hpp"
#include "sqllm/lut_matmul.hpp"
#include "sqllm/packing.hpp"

namespace {

// Input layout (all little-endian): u8 rows-1 (0..15), u8 cols-1 (0..63),
// u8 bits-1, u8 flags, then rows+1 int32 row_ptr, then the rest as (int32 col,
// u16 value) pairs.  Every array is an exact-size heap block.
template <class T>
T take(const std::uint8_t*& p, const std::uint8_t* end) {
  T v{};
  const std::size_t n = std::min<std::size_t>(sizeof(T), static_cast<std::size_t>(end - p));
  std::memcpy(&v, p, n);
  p += n;
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::uint8_t* p = data;
  const std::uint8_t* end = data + size;
  const std::size_t rows = (take<std::uint8_t>(p, end) & 15) + 1;
  const std::size_t cols = (take<std::uint8_t>(p, end) & 63) + 1;
  const int bits = (take<std::uint8_t>(p, end) & 7) + 1;
  const std::uint8_t flags = take<std::uint8_t>(p, end);
  std::vector<std::int32_t> row_ptr(rows + 1);
  for (auto& r : row_ptr) r = take<std::int32_t>(p, end);
  const std::size_t nnz = static_cast<std::size_t>(end - p) / 6;
  auto col_idx = std::make_unique<std::int32_t[]>(nnz + (nnz == 0));
  auto values = std::make_unique<std::uint16_t[]>(nnz + (nnz == 0));
  for (std::size_t k = 0; k < nnz; ++k) {
    col_idx[k] = take<std::int32_t>(p, end);
    values[k] = take<std::uint16_t>(p, end);
  }
  sqllm::CsrView v{row_ptr.data(), col_idx.get(), values.get(), nnz};
  try {
    sqllm::check_csr(v, rows, cols);
  } catch (const sqllm::Error&) {
    return 0;  // rejected: fine
  }
  // Accepted: the kernel must walk it in bounds (codes and tables exact-size too).
  const sqllm::GroupAxis axis = (flags & 1) ? sqllm::GroupAxis::Column : sqllm::GroupAxis::Row;
  const std::size_t words = sqllm::packed_words(cols, bits);
  const std::size_t groups = axis == sqllm::GroupAxis::Row ? rows : cols;
  std::vector<std::uint32_t> codes(rows * words, 0x9e3779b9u);
  for (std::size_t r = 0; r < rows; ++r) {  // unused high bits of a row's last word are zero
    const std::size_t used = cols * static_cast<std::size_t>(bits) - (words - 1) * 32;
    if (used < 32) codes[r * words + words - 1] &= (1u << used) - 1u;
  }
  std::vector<float> tables(groups << bits, 0.5f);
  const std::size_t batch = (flags >> 1) % 9 + 1;  // 1..9: the per-row and the GEMM paths
  std::vector<float> x(batch * cols, 1.0f), y(batch * rows);
  sqllm::LutView layer;
  layer.codes = codes.data();
  layer.tables = tables.data();
  layer.out = rows;
  layer.in = cols;
  layer.bits = bits;
  layer.axis = axis;
  layer.sparse = v;
  sqllm::lut_matmul(layer, x.data(), batch, y.data(), 1, true);
  for (float f : y)
    if (!std::isfinite(f)) std::abort();  // finite tables, x and values: finite output
  return 0;
}

#ifndef SQLLM_LIBFUZZER
// Seeded random-mutation driver: valid CSRs are generated, serialised in the
// layout above and mutated (bit flips, byte sets, int32 overwrites with edge
// values, truncation, extension), then run through the target.
int main(int argc, char** argv) {
  const long iters = argc > 1 ? std::atol(argv[1]) : 200000;
  const unsigned seed = argc > 2 ? static_cast<unsigned>(std::atol(argv[2])) : 12345u;
  std::mt19937_64 rng(seed);
  auto rnd = [&](std::uint64_t n) { return n ? rng() % n : 0; };
  const std::int32_t edges[] = {0, 1, -1, 2, 63, 64, 65, 1000, 1 << 30, INT32_MAX, INT32_MIN};
  std::vector<std::uint8_t> buf;
  for (long it = 0; it < iters; ++it) {
    const std::size_t rows = rnd(16) + 1, cols = rnd(64) + 1;
    buf.assign({static_cast<std::uint8_t>(rows - 1), static_cast<std::uint8_t>(cols - 1),
                static_cast<std::uint8_t>(rnd(8)), static_cast<std::uint8_t>(rnd(256))});
    std::vector<std::int32_t> rp{0};
    std::vector<std::pair<std::int32_t, std::uint16_t>> entries;
    for (std::size_t r = 0; r < rows; ++r) {
      for (std::size_t c = 0; c < cols; ++c)
        if (rnd(8) == 0) entries.push_back({static_cast<std::int32_t>(c),
                                            sqllm::float_to_half_bits(float(rnd(200)) - 100.f)});
      rp.push_back(static_cast<std::int32_t>(entries.size()));
    }
    auto put = [&](const void* src, std::size_t n) {
      const auto* b = static_cast<const std::uint8_t*>(src);
      buf.insert(buf.end(), b, b + n);
    };
    for (auto r : rp) put(&r, 4);
    for (auto& e : entries) {
      put(&e.first, 4);
      put(&e.second, 2);
    }
    const int mutations = static_cast<int>(rnd(4));
    for (int m = 0; m < mutations && !buf.empty(); ++m) {
      switch (rnd(6)) {
        case 0: buf[rnd(buf.size())] ^= static_cast<std::uint8_t>(1u << rnd(8)); break;
        case 1: buf[rnd(buf.size())] = static_cast<std::uint8_t>(rng()); break;
        case 2: {
          if (buf.size() < 8) break;
          const std::size_t at = 4 + 4 * rnd((buf.size() - 4) / 4);
          const std::int32_t e = edges[rnd(sizeof edges / sizeof edges[0])];
          if (at + 4 <= buf.size()) std::memcpy(&buf[at], &e, 4);
          break;
        }
        case 3: buf.resize(rnd(buf.size() + 1)); break;
        case 4: for (int k = 0; k < 6; ++k) buf.push_back(static_cast<std::uint8_t>(rng())); break;
        default: {  // the case: an intermediate row_ptr beyond nnz
          if (rows > 1 && buf.size() >= 4 + 4 * (rows + 1)) {
            const std::int32_t big = static_cast<std::int32_t>(entries.size() + 1 + rnd(1000));
            std::memcpy(&buf[4 + 4 * (1 + rnd(rows - 1))], &big, 4);
          }
        }
      }
    }
    LLVMFuzzerTestOneInput(buf.data(), buf.size());
  }
  std::printf("fuzz_csr: %ld executions, seed %u, no crash or sanitizer report\n", iters, seed);
  return 0;
}
#endif
