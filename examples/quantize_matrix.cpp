// A C++ program that uses the sqllm headers directly (no Python): quantize a
// random "weight matrix" with sensitivity-weighted 3-bit non-uniform
// quantization, multiply with it straight from the packed codes, and report
// the error against the full-precision product.
//
//   ./quantize_matrix [out] [in] [bits]
#include <sqllm/lut_matmul.hpp>
#include <sqllm/nuq.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  const std::size_t out = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 1024;
  const std::size_t in = argc > 2 ? std::strtoul(argv[2], nullptr, 10) : 1024;
  const int bits = argc > 3 ? std::atoi(argv[3]) : 3;
  try {
    std::mt19937 rng(0);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    std::vector<float> W(out * in), S(out * in), x(in);
    for (auto& w : W) w = normal(rng);
    for (auto& s : S) {
      const float g = normal(rng);
      s = g * g;  // a Fisher-like sensitivity: squared gradients
    }
    for (auto& v : x) v = normal(rng) * 50.0f;

    sqllm::NuqParams p;
    p.bits = bits;
    std::vector<std::uint32_t> codes(out * sqllm::packed_words(in, bits));
    std::vector<float> tables(out << bits);
    const auto t0 = std::chrono::steady_clock::now();
    sqllm::nuq_quantize(W.data(), S.data(), nullptr, out, in, p, codes.data(), tables.data());
    const auto t1 = std::chrono::steady_clock::now();

    std::vector<float> y(out);
    sqllm::LutView layer;  // the packed layer: codes + one table per output row
    layer.codes = codes.data();
    layer.tables = tables.data();
    layer.out = out;
    layer.in = in;
    layer.bits = bits;
    sqllm::lut_matmul(layer, x.data(), 1, y.data());
    double err = 0.0, ref = 0.0;
    for (std::size_t o = 0; o < out; ++o) {
      double exact = 0.0;
      for (std::size_t i = 0; i < in; ++i) exact += double(W[o * in + i]) * x[i];
      err += (y[o] - exact) * (y[o] - exact);
      ref += exact * exact;
    }
    std::printf("quantized %zux%zu to %d bits in %.3f s (%.2f bits/weight incl. tables)\n", out,
                in, bits, std::chrono::duration<double>(t1 - t0).count(),
                (codes.size() * 32.0 + tables.size() * 32.0) / double(out * in));
    std::printf("relative error of y = x W^T: %.4f\n", std::sqrt(err / ref));
  } catch (const sqllm::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
