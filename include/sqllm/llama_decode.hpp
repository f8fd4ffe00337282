// sqllm/llama_decode.hpp -- a whole LLaMA-architecture forward pass in C++ for
// greedy decoding on the CPU: no Python between the layers.
//
// A decode step of a small model spends most of its time outside the matmul
// kernels when every layer is a Python call (~210 operator calls per token on
// SmolLM2-135M).  LlamaDecoder runs the whole step here:
//
//   x = embed(token)                         (fp32 row, or a LUT row decoded)
//   for each layer:
//     h = RMSNorm(x) * w_in
//     q, k, v = h Wqᵀ, h Wkᵀ, h Wvᵀ          (one parallel pass over the three)
//     RoPE(q, k) with the cos/sin rows of the position (given: transformers'
//       own rotary module computes them, so every rope variant it supports
//       with position-only tables is reproduced exactly)
//     k, v -> the preallocated cache; GQA softmax attention over the cache
//     x += (attention) Woᵀ
//     h = RMSNorm(x) * w_post
//     x += (silu(h Wgᵀ) * (h Wuᵀ)) Wdᵀ       (gate and up in one parallel pass)
//   logits = RMSNorm(x) * w_final · W_headᵀ
//
// The linear layers are views (they own nothing): fp32 dense weights, the
// lookup-table format (format/lut.hpp, with its sparse part) or the uniform
// format (quant/uniform.hpp).  A step of one token runs each layer group's
// output rows in chunks through the same per-row kernels as lut_matmul /
// uniform_matmul at batch 1 (AVX-512 word-aligned / AVX-512 / AVX2 / scalar,
// chosen by cpu_features.hpp); a prompt of several tokens (prefill) calls
// lut_matmul / uniform_matmul / Eigen's GEMM with the whole batch.  OpenMP
// over output rows (and over heads in attention); fp32 throughout, with the
// RMSNorm mean of squares accumulated in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "sqllm/cpu_features.hpp"
#include "sqllm/dispatch.hpp"
#include "sqllm/error.hpp"
#include "sqllm/format/lut.hpp"
#include "sqllm/lut_matmul.hpp"
#include "sqllm/quant/uniform.hpp"
#include "sqllm/uniform_matmul.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sqllm {

/// One linear layer y = x Wᵀ (+ bias) of the decoder, as a view.
struct DecodeLinear {
  enum class Kind { Dense, Lut, Uniform };
  Kind kind = Kind::Dense;
  std::size_t in = 0, out = 0;
  const float* dense = nullptr;  ///< [out, in] row-major fp32 (Kind::Dense)
  LutView lut{};                 ///< Kind::Lut
  UniformView uniform{};         ///< Kind::Uniform
  const float* bias = nullptr;   ///< [out] fp32, or nullptr
};

struct LlamaDecodeLayer {
  const float* input_norm = nullptr;  ///< [hidden]
  const float* post_norm = nullptr;   ///< [hidden]
  DecodeLinear q, k, v, o, gate, up, down;
};

struct LlamaDecodeConfig {
  std::size_t hidden = 0, intermediate = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  std::size_t capacity = 0;  ///< positions the KV cache (and the rope tables) hold
  float rms_eps = 1e-6f;
  int num_threads = 0;  ///< 0: OpenMP's default
  CpuKernel kernel = CpuKernel::Auto;
};

struct LlamaDecodeWeights {
  /// The token embedding: Kind::Dense [vocab, hidden] or Kind::Lut with row
  /// grouping and no sparse part (row t of Ŵ is token t's vector); no bias.
  DecodeLinear embed;
  std::vector<LlamaDecodeLayer> layers;
  const float* final_norm = nullptr;  ///< [hidden]
  DecodeLinear lm_head;               ///< hidden -> vocab
  const float* rope_cos = nullptr;    ///< [capacity, head_dim]
  const float* rope_sin = nullptr;    ///< [capacity, head_dim]
};

namespace detail {
namespace llama {

inline void check_linear(const DecodeLinear& L, std::size_t in, std::size_t out, const char* name,
                         std::size_t layer) {
  SQLLM_CHECK(L.in == in && L.out == out, "llama decoder: layer ", layer, " ", name, " must be ",
              out, "x", in, " (out x in), got ", L.out, "x", L.in);
  switch (L.kind) {
    case DecodeLinear::Kind::Dense:
      SQLLM_CHECK(L.dense != nullptr, "llama decoder: layer ", layer, " ", name, ": no weight");
      break;
    case DecodeLinear::Kind::Lut:
      SQLLM_CHECK(L.lut.in == in && L.lut.out == out, "llama decoder: layer ", layer, " ", name,
                  ": lut view shape mismatch");
      check_lut_view(L.lut, /*check_sparse_contents=*/true);
      break;
    case DecodeLinear::Kind::Uniform:
      SQLLM_CHECK(L.uniform.in == in && L.uniform.out == out, "llama decoder: layer ", layer, " ",
                  name, ": uniform view shape mismatch");
      check_uniform_view(L.uniform);
      break;
  }
}

/// Rows [o0, o1) of a lookup-table layer at batch 1; xq: x permuted for the
/// AVX-512 word-aligned kernel (nullptr: that kernel is not used), scratch:
/// `in` floats (scalar path).
template <int BITS, bool ROW>
void lut_rows(const LutView& w, const float* x, const float* xq, float* y, std::size_t o0,
              std::size_t o1, float* scratch, CpuKernel ker) {
  const CsrView* csr = w.has_sparse() ? &w.sparse : nullptr;
#ifdef SQLLM_X86_SIMD
  if constexpr (BITS <= 4) {
    if (ker == CpuKernel::Avx512) {
      if constexpr (avx512::dword_kernel_applies<BITS, ROW>()) {
        if (xq != nullptr) {
          avx512::rows_dword<BITS>(x, xq, w.in, w.codes, w.tables, csr, y, o0, o1);
          return;
        }
      }
      for (std::size_t o = o0; o < o1; ++o)
        avx512::rows<BITS, ROW>(x, x, 1, w.in, w.out, w.codes, w.tables, csr, y, o, 1);
      return;
    }
    if (ker == CpuKernel::Avx2) {
      for (std::size_t o = o0; o < o1; ++o)
        avx2::rows<BITS, ROW>(x, x, 1, w.in, w.out, w.codes, w.tables, csr, y, o);
      return;
    }
  }
#endif
  (void)xq;
  (void)ker;
  for (std::size_t o = o0; o < o1; ++o) {
    decode_row<BITS, ROW>(w.codes, w.tables, w.in, o, scratch);
    float acc = dot(scratch, x, w.in);
    if (csr != nullptr)
      for (std::int32_t k = csr->row_ptr[o]; k < csr->row_ptr[o + 1]; ++k)
        acc += half_bits_to_float(csr->values[k]) * x[csr->col_idx[k]];
    y[o] = acc;
  }
}

/// Rows [o0, o1) of a uniform layer at batch 1; scratch: in + 2*groups floats.
template <int BITS>
void uniform_rows(const UniformView& v, const float* x, float* y, std::size_t o0, std::size_t o1,
                  float* scratch) {
  float* sc = scratch;
  float* zc = scratch + v.groups();
#ifdef SQLLM_HAVE_AVX2
  if constexpr (avx2::uniform_avx2_bits(BITS)) {
    for (std::size_t o = o0; o < o1; ++o) avx2::uniform_rows<BITS>(v, x, 1, y, o, sc, zc);
    return;
  }
#endif
  float* buf = zc + v.groups();
  for (std::size_t o = o0; o < o1; ++o) {
    uniform_decode_row<BITS>(v, o, sc, zc, buf);
    y[o] = dot(buf, x, v.in);
  }
}

/// Whether the AVX-512 word-aligned batch-1 kernel takes this layer (then x
/// is permuted once for it).
inline bool wants_xq(const DecodeLinear& L, CpuKernel ker) {
#ifdef SQLLM_X86_SIMD
  if (L.kind != DecodeLinear::Kind::Lut || ker != CpuKernel::Avx512) return false;
  const LutView& w = L.lut;
  if (w.axis != GroupAxis::Row) return false;
  switch (w.bits) {
    case 1: return w.in >= avx512::dword_block<1>();
    case 2: return w.in >= avx512::dword_block<2>();
    case 4: return w.in >= avx512::dword_block<4>();
    default: return false;
  }
#else
  (void)L;
  (void)ker;
  return false;
#endif
}

inline void permute_for(const DecodeLinear& L, const float* x, float* xq) {
#ifdef SQLLM_X86_SIMD
  switch (L.lut.bits) {
    case 1: avx512::permute_x<1>(x, L.in, xq); break;
    case 2: avx512::permute_x<2>(x, L.in, xq); break;
    case 4: avx512::permute_x<4>(x, L.in, xq); break;
    default: break;
  }
#else
  (void)L;
  (void)x;
  (void)xq;
#endif
}

/// Rows [o0, o1) of any layer at batch 1 (no bias).
inline void linear_rows(const DecodeLinear& L, const float* x, const float* xq, float* y,
                        std::size_t o0, std::size_t o1, float* scratch, CpuKernel ker) {
  switch (L.kind) {
    case DecodeLinear::Kind::Dense:
      for (std::size_t o = o0; o < o1; ++o) y[o] = dot(L.dense + o * L.in, x, L.in);
      return;
    case DecodeLinear::Kind::Lut: {
      const bool row = L.lut.axis == GroupAxis::Row;
      SQLLM_DISPATCH_BITS(L.lut.bits, BITS, {
        (row ? lut_rows<BITS, true> : lut_rows<BITS, false>)(L.lut, x, xq, y, o0, o1, scratch, ker);
      })
      return;
    }
    case DecodeLinear::Kind::Uniform:
      SQLLM_DISPATCH_BITS(L.uniform.bits, BITS, {
        if constexpr (BITS >= kUniformMinBits) uniform_rows<BITS>(L.uniform, x, y, o0, o1, scratch);
      })
      return;
  }
}

}  // namespace llama
}  // namespace detail

/// The decoder: the weights (views), a KV cache of `capacity` positions and
/// the activations of the current call.  Not thread-safe (one sequence).
class LlamaDecoder {
 public:
  LlamaDecoder(const LlamaDecodeConfig& cfg, LlamaDecodeWeights weights)
      : c_(cfg), w_(std::move(weights)) {
    const std::size_t H = c_.hidden, I = c_.intermediate, D = c_.head_dim;
    SQLLM_CHECK(H > 0 && I > 0 && c_.heads > 0 && c_.kv_heads > 0 && D > 0 && c_.vocab > 0,
                "llama decoder: every size must be > 0");
    SQLLM_CHECK(D % 2 == 0, "llama decoder: head_dim must be even (RoPE), got ", D);
    SQLLM_CHECK(c_.heads % c_.kv_heads == 0, "llama decoder: num_attention_heads (", c_.heads,
                ") must be a multiple of num_key_value_heads (", c_.kv_heads, ")");
    SQLLM_CHECK(c_.capacity > 0, "llama decoder: capacity must be > 0");
    SQLLM_CHECK(std::isfinite(c_.rms_eps) && c_.rms_eps >= 0.0f,
                "llama decoder: rms_norm_eps must be finite and >= 0");
    SQLLM_CHECK(!w_.layers.empty(), "llama decoder: no layers");
    SQLLM_CHECK(w_.final_norm != nullptr && w_.rope_cos != nullptr && w_.rope_sin != nullptr,
                "llama decoder: final norm and rope tables are required");
    ker_ = resolve_cpu_kernel(c_.kernel);
#ifdef _OPENMP
    nt_ = c_.num_threads > 0 ? c_.num_threads : omp_get_max_threads();
#else
    nt_ = 1;
#endif
    // The embedding.
    const DecodeLinear& e = w_.embed;
    SQLLM_CHECK(e.bias == nullptr, "llama decoder: the embedding has no bias");
    detail::llama::check_linear(e, H, c_.vocab, "embed_tokens (vocab x hidden)", 0);
    if (e.kind == DecodeLinear::Kind::Lut)
      SQLLM_CHECK(e.lut.axis == GroupAxis::Row && !e.lut.has_sparse(),
                  "llama decoder: a quantized embedding needs row grouping and no sparse part");
    SQLLM_CHECK(e.kind != DecodeLinear::Kind::Uniform,
                "llama decoder: a uniform-format embedding is not supported");
    const std::size_t qd = c_.heads * D, kvd = c_.kv_heads * D;
    for (std::size_t l = 0; l < w_.layers.size(); ++l) {
      const LlamaDecodeLayer& L = w_.layers[l];
      SQLLM_CHECK(L.input_norm != nullptr && L.post_norm != nullptr, "llama decoder: layer ", l,
                  ": norm weights are required");
      using detail::llama::check_linear;
      check_linear(L.q, H, qd, "q_proj", l);
      check_linear(L.k, H, kvd, "k_proj", l);
      check_linear(L.v, H, kvd, "v_proj", l);
      check_linear(L.o, qd, H, "o_proj", l);
      check_linear(L.gate, H, I, "gate_proj", l);
      check_linear(L.up, H, I, "up_proj", l);
      check_linear(L.down, I, H, "down_proj", l);
    }
    detail::llama::check_linear(w_.lm_head, H, c_.vocab, "lm_head", 0);
    const std::size_t nl = w_.layers.size();
    k_cache_.assign(nl * c_.kv_heads * c_.capacity * D, 0.0f);
    v_cache_.assign(nl * c_.kv_heads * c_.capacity * D, 0.0f);
    std::size_t max_in = std::max(H, std::max(I, qd)), max_groups = 1;
    auto groups_of = [](const DecodeLinear& L) {
      return L.kind == DecodeLinear::Kind::Uniform ? L.uniform.groups() : std::size_t{1};
    };
    for (const auto& L : w_.layers)
      for (const DecodeLinear* p : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down})
        max_groups = std::max(max_groups, groups_of(*p));
    scratch_stride_ = max_in + 2 * max_groups + 16;
    scratch_.assign(static_cast<std::size_t>(nt_) * scratch_stride_, 0.0f);
    scores_.assign(static_cast<std::size_t>(nt_) * c_.capacity, 0.0f);
    logits_.assign(c_.vocab, 0.0f);
  }

  std::size_t position() const { return pos_; }
  std::size_t capacity() const { return c_.capacity; }
  std::size_t vocab() const { return c_.vocab; }
  int threads() const { return nt_; }
  CpuKernel kernel() const { return ker_; }
  /// Forget the sequence (the cache is overwritten from position 0).
  void reset() { pos_ = 0; }

  /// Run tokens ids[0..n) at positions position() .. position()+n-1 and
  /// return the logits of the last one (vocab floats, valid until the next call).
  const float* forward(const std::int64_t* ids, std::size_t n) {
    SQLLM_CHECK(n > 0, "llama decoder: no tokens");
    SQLLM_CHECK(ids != nullptr, "llama decoder: null ids");
    SQLLM_CHECK(n <= c_.capacity - pos_, "llama decoder: ", n, " tokens at position ", pos_,
                " exceed the cache capacity ", c_.capacity);
    for (std::size_t t = 0; t < n; ++t)
      SQLLM_CHECK(ids[t] >= 0 && static_cast<std::size_t>(ids[t]) < c_.vocab,
                  "llama decoder: token id ", ids[t], " is outside [0, ", c_.vocab, ")");
    const std::size_t H = c_.hidden, I = c_.intermediate, D = c_.head_dim;
    const std::size_t qd = c_.heads * D, kvd = c_.kv_heads * D;
    x_.resize(n * H);
    h_.resize(n * H);
    q_.resize(n * qd);
    k_.resize(n * kvd);
    v_.resize(n * kvd);
    att_.resize(n * qd);
    tmp_.resize(n * H);
    g_.resize(n * I);
    u_.resize(n * I);
    for (std::size_t t = 0; t < n; ++t) embed(static_cast<std::size_t>(ids[t]), &x_[t * H]);
    for (std::size_t l = 0; l < w_.layers.size(); ++l) {
      const LlamaDecodeLayer& L = w_.layers[l];
      rmsnorm(x_.data(), n, L.input_norm, h_.data());
      linears(h_.data(), n, {{&L.q, q_.data()}, {&L.k, k_.data()}, {&L.v, v_.data()}});
      for (std::size_t t = 0; t < n; ++t) {
        const std::size_t p = pos_ + t;
        for (std::size_t h = 0; h < c_.heads; ++h) rope(&q_[t * qd + h * D], p);
        for (std::size_t h = 0; h < c_.kv_heads; ++h) {
          rope(&k_[t * kvd + h * D], p);
          std::copy_n(&k_[t * kvd + h * D], D, kv(k_cache_, l, h, p));
          std::copy_n(&v_[t * kvd + h * D], D, kv(v_cache_, l, h, p));
        }
      }
      attention(l, n);
      linears(att_.data(), n, {{&L.o, tmp_.data()}});
      for (std::size_t i = 0; i < n * H; ++i) x_[i] += tmp_[i];
      rmsnorm(x_.data(), n, L.post_norm, h_.data());
      linears(h_.data(), n, {{&L.gate, g_.data()}, {&L.up, u_.data()}});
      for (std::size_t i = 0; i < n * I; ++i) {
        const float a = g_[i];
        g_[i] = a / (1.0f + std::exp(-a)) * u_[i];
      }
      linears(g_.data(), n, {{&L.down, tmp_.data()}});
      for (std::size_t i = 0; i < n * H; ++i) x_[i] += tmp_[i];
    }
    rmsnorm(&x_[(n - 1) * H], 1, w_.final_norm, h_.data());
    linears(h_.data(), 1, {{&w_.lm_head, logits_.data()}});
    pos_ += n;
    return logits_.data();
  }

  /// Greedy decoding from position 0: the prompt, then up to max_new tokens
  /// (stops after `eos` when eos >= 0).  logits_out (max_new * vocab floats,
  /// optional) receives the logits each new token was chosen from.
  std::vector<std::int64_t> generate(const std::int64_t* prompt, std::size_t n,
                                     std::size_t max_new, float* logits_out = nullptr,
                                     std::int64_t eos = -1) {
    SQLLM_CHECK(n > 0, "llama decoder: empty prompt");
    SQLLM_CHECK(max_new > 0, "llama decoder: max_new_tokens must be > 0");
    SQLLM_CHECK(n + max_new - 1 <= c_.capacity, "llama decoder: prompt (", n, ") + max_new_tokens (",
                max_new, ") - 1 exceeds the cache capacity ", c_.capacity);
    reset();
    std::vector<std::int64_t> out;
    out.reserve(max_new);
    const float* lg = forward(prompt, n);
    for (std::size_t s = 0; s < max_new; ++s) {
      if (logits_out != nullptr) std::copy_n(lg, c_.vocab, logits_out + s * c_.vocab);
      const std::int64_t tok = argmax(lg);
      out.push_back(tok);
      if (tok == eos || s + 1 == max_new) break;
      lg = forward(&tok, 1);
    }
    return out;
  }

  /// Index of the first largest logit (torch.argmax's choice); NaN refused.
  std::int64_t argmax(const float* lg) const {
    std::size_t best = 0;
    for (std::size_t i = 0; i < c_.vocab; ++i) {
      SQLLM_CHECK(!std::isnan(lg[i]), "llama decoder: the logits contain NaN");
      if (lg[i] > lg[best]) best = i;
    }
    return static_cast<std::int64_t>(best);
  }

 private:
  struct Target {
    const DecodeLinear* L;
    float* y;
  };

  float* kv(std::vector<float>& cache, std::size_t l, std::size_t h, std::size_t p) {
    return &cache[((l * c_.kv_heads + h) * c_.capacity + p) * c_.head_dim];
  }

  void embed(std::size_t tok, float* dst) const {
    const DecodeLinear& e = w_.embed;
    if (e.kind == DecodeLinear::Kind::Dense) {
      std::copy_n(e.dense + tok * c_.hidden, c_.hidden, dst);
      return;
    }
    SQLLM_DISPATCH_BITS(e.lut.bits, BITS, {
      detail::decode_row<BITS, true>(e.lut.codes, e.lut.tables, e.lut.in, tok, dst);
    })
  }

  /// transformers' LlamaRMSNorm: w * (x * rsqrt(mean(x²) + eps)), fp32 (the
  /// mean accumulated in double).
  void rmsnorm(const float* x, std::size_t n, const float* w, float* y) const {
    const std::size_t H = c_.hidden;
    for (std::size_t t = 0; t < n; ++t) {
      const float* xt = x + t * H;
      double ss = 0.0;
      for (std::size_t i = 0; i < H; ++i) ss += static_cast<double>(xt[i]) * xt[i];
      const float var = static_cast<float>(ss / static_cast<double>(H));
      const float r = 1.0f / std::sqrt(var + c_.rms_eps);
      for (std::size_t i = 0; i < H; ++i) y[t * H + i] = w[i] * (xt[i] * r);
    }
  }

  /// transformers' apply_rotary_pos_emb on one head: x*cos + rotate_half(x)*sin.
  void rope(float* x, std::size_t p) const {
    const std::size_t D = c_.head_dim, half = D / 2;
    const float* cs = w_.rope_cos + p * D;
    const float* sn = w_.rope_sin + p * D;
    for (std::size_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cs[i] - b * sn[i];
      x[i + half] = b * cs[i + half] + a * sn[i + half];
    }
  }

  /// Causal GQA softmax attention of the n new positions over the cache.
  void attention(std::size_t l, std::size_t n) {
    const std::size_t D = c_.head_dim, nh = c_.heads, rep = c_.heads / c_.kv_heads;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const auto pairs = static_cast<std::ptrdiff_t>(n * nh);
    const std::size_t work = n * nh * (pos_ + n) * D;
#ifdef _OPENMP
    const int nt = work >= (std::size_t{1} << 16) ? nt_ : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (std::ptrdiff_t ph = 0; ph < pairs; ++ph) {
#ifdef _OPENMP
      float* sc = &scores_[static_cast<std::size_t>(omp_get_thread_num()) * c_.capacity];
#else
      float* sc = scores_.data();
#endif
      const std::size_t t = static_cast<std::size_t>(ph) / nh, h = static_cast<std::size_t>(ph) % nh;
      const std::size_t kvh = h / rep, len = pos_ + t + 1;
      const float* q = &q_[t * nh * D + h * D];
      const float* K = &k_cache_[((l * c_.kv_heads + kvh) * c_.capacity) * D];
      const float* V = &v_cache_[((l * c_.kv_heads + kvh) * c_.capacity) * D];
      float mx = -std::numeric_limits<float>::infinity();
      for (std::size_t j = 0; j < len; ++j) {
        sc[j] = detail::dot(q, K + j * D, D) * scale;
        mx = std::max(mx, sc[j]);
      }
      float sum = 0.0f;
      for (std::size_t j = 0; j < len; ++j) {
        sc[j] = std::exp(sc[j] - mx);
        sum += sc[j];
      }
      const float inv = 1.0f / sum;
      float* o = &att_[t * nh * D + h * D];
      std::fill_n(o, D, 0.0f);
      for (std::size_t j = 0; j < len; ++j) {
        const float pj = sc[j] * inv;
        const float* vj = V + j * D;
#pragma omp simd
        for (std::size_t d = 0; d < D; ++d) o[d] += pj * vj[d];
      }
    }
    (void)work;
  }

  /// y_k = x L_kᵀ (+ bias) for a group of layers with the same input: at one
  /// token, one parallel pass over all their output rows (x read once);
  /// several tokens: each layer's batched kernel.
  void linears(const float* x, std::size_t n, std::initializer_list<Target> targets) {
    if (n == 1) {
      rows_pass(x, targets);
    } else {
      for (const Target& tg : targets) batched(*tg.L, x, n, tg.y);
    }
    for (const Target& tg : targets) {
      if (tg.L->bias == nullptr) continue;
      const std::size_t out = tg.L->out;
      for (std::size_t t = 0; t < n; ++t)
        for (std::size_t o = 0; o < out; ++o) tg.y[t * out + o] += tg.L->bias[o];
    }
  }

  void rows_pass(const float* x, std::initializer_list<Target> targets) {
    constexpr std::size_t CH = 16;  // output rows per chunk
    constexpr std::size_t kNoXq = ~std::size_t{0};
    chunks_.clear();
    std::size_t xq_len = 0, work = 0;
    for (const Target& tg : targets) {
      std::size_t off = kNoXq;
      if (detail::llama::wants_xq(*tg.L, ker_)) {
        off = xq_len;
        xq_len += tg.L->in;
      }
      for (std::size_t o0 = 0; o0 < tg.L->out; o0 += CH)
        chunks_.push_back(ChunkRec{tg.L, tg.y, off, o0, std::min(tg.L->out, o0 + CH)});
      work += tg.L->in * tg.L->out;
    }
    if (xq_.size() < xq_len) xq_.resize(xq_len);
    for (const ChunkRec& ch : chunks_)  // x permuted once per layer of the group
      if (ch.xq_off != kNoXq && ch.o0 == 0) detail::llama::permute_for(*ch.L, x, &xq_[ch.xq_off]);
    const auto nch = static_cast<std::ptrdiff_t>(chunks_.size());
#ifdef _OPENMP
    // Below ~64K multiply-adds a second thread costs more than it saves.
    const int nt = work >= (std::size_t{1} << 16) && nch > 1 ? nt_ : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (std::ptrdiff_t i = 0; i < nch; ++i) {
#ifdef _OPENMP
      float* scratch = &scratch_[static_cast<std::size_t>(omp_get_thread_num()) * scratch_stride_];
#else
      float* scratch = scratch_.data();
#endif
      const ChunkRec& ch = chunks_[static_cast<std::size_t>(i)];
      const float* xq = ch.xq_off == kNoXq ? nullptr : &xq_[ch.xq_off];
      detail::llama::linear_rows(*ch.L, x, xq, ch.y, ch.o0, ch.o1, scratch, ker_);
    }
    (void)work;
  }

  void batched(const DecodeLinear& L, const float* x, std::size_t n, float* y) {
    switch (L.kind) {
      case DecodeLinear::Kind::Dense: {
        using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
        const Eigen::Map<const RowMat> X(x, static_cast<Eigen::Index>(n),
                                         static_cast<Eigen::Index>(L.in));
        const Eigen::Map<const RowMat> W(L.dense, static_cast<Eigen::Index>(L.out),
                                         static_cast<Eigen::Index>(L.in));
        Eigen::Map<RowMat> Y(y, static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(L.out));
        Y.noalias() = X * W.transpose();
        return;
      }
      case DecodeLinear::Kind::Lut:
        lut_matmul(L.lut, x, n, y, nt_, /*checked=*/true, ker_);
        return;
      case DecodeLinear::Kind::Uniform:
        uniform_matmul(L.uniform, x, n, y, nt_, /*checked=*/true);
        return;
    }
  }

  struct ChunkRec {
    const DecodeLinear* L;
    float* y;
    std::size_t xq_off;  ///< offset of the permuted x in xq_, or ~0: none
    std::size_t o0, o1;
  };

  LlamaDecodeConfig c_;
  LlamaDecodeWeights w_;
  CpuKernel ker_ = CpuKernel::Scalar;
  int nt_ = 1;
  std::size_t pos_ = 0;
  std::size_t scratch_stride_ = 0;
  std::vector<float> k_cache_, v_cache_;
  std::vector<float> x_, h_, q_, k_, v_, att_, tmp_, g_, u_, logits_;
  std::vector<float> scratch_, scores_, xq_;
  std::vector<ChunkRec> chunks_;
};

}  // namespace sqllm
