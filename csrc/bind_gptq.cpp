// Bindings of the uniform format (RTN, GPTQ, CPU matmul), GPTQ on lookup
// tables, and the 1..32-bit packing.  Conversion and shape checks only; the
// algorithms live in include/sqllm.
#include <pybind11/stl.h>

#include <optional>
#include <vector>

#include "bindings.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/quant/gptq.hpp"
#include "sqllm/quant/gptq_uniform.hpp"
#include "sqllm/quant/uniform.hpp"
#include "sqllm/uniform_matmul.hpp"

namespace sqllm {
namespace bind {

namespace {

/// The one place Python arrays become a UniformView (shapes checked here,
/// values by check_uniform_view unless the caller says they were checked).
UniformView uniform_view(const carray<std::uint32_t>& qweight, const carray<std::uint16_t>& scales,
                         const carray<std::uint16_t>& zeros,
                         const std::optional<carray<std::int32_t>>& g_idx, int bits,
                         int group_size, std::size_t in) {
  SQLLM_CHECK(bits >= kUniformMinBits && bits <= kUniformMaxBits,
              "uniform layer: bits must be in 2..8, got ", bits);
  check_ndim(qweight, 2, "qweight");
  check_ndim(scales, 2, "scales");
  check_ndim(zeros, 2, "zeros");
  const std::size_t words = packed_words(in, bits);
  SQLLM_CHECK(static_cast<std::size_t>(qweight.shape(1)) == words, "qweight must have ", words,
              " words per row for in_features=", in, " at bits=", bits, ", got ", qweight.shape(1));
  SQLLM_CHECK(scales.shape(0) == qweight.shape(0) && zeros.shape(0) == qweight.shape(0) &&
                  scales.shape(1) == zeros.shape(1),
              "scales and zeros must both have shape (out_features=", qweight.shape(0),
              ", groups), got (", scales.shape(0), ", ", scales.shape(1), ") and (", zeros.shape(0),
              ", ", zeros.shape(1), ")");
  UniformView v;
  v.qweight = qweight.data();
  v.scales = scales.data();
  v.zeros = zeros.data();
  v.out = static_cast<std::size_t>(qweight.shape(0));
  v.in = in;
  v.bits = bits;
  v.group_size = group_size;
  v.num_groups = static_cast<std::size_t>(scales.shape(1));
  if (g_idx) {
    check_ndim(*g_idx, 1, "g_idx");
    SQLLM_CHECK(static_cast<std::size_t>(g_idx->shape(0)) == in, "g_idx must have in_features=", in,
                " entries, got ", g_idx->shape(0));
    v.g_idx = g_idx->data();
  }
  return v;
}

template <class T>
carray<T> to_numpy(const std::vector<T>& v) {
  carray<T> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

void check_hessian(const carray<double>& h, std::size_t in) {
  check_ndim(h, 2, "hessian");
  SQLLM_CHECK(static_cast<std::size_t>(h.shape(0)) == in && static_cast<std::size_t>(h.shape(1)) == in,
              "hessian must have shape (in_features, in_features) = (", in, ", ", in, "), got (",
              h.shape(0), ", ", h.shape(1), ")");
}

/// The memory of a Hessian the caller gives up (overwrite_hessian=True):
/// it must be writable (a read-only array, e.g. a memory-mapped file, is refused).
double* hessian_to_overwrite(carray<double>& h) {
  SQLLM_CHECK(h.writeable(), "overwrite_hessian=True needs a writable hessian array");
  return h.mutable_data();
}

GptqParams gptq_params(bool act_order, int blocksize, double percdamp, bool static_groups,
                       int num_threads, bool overwrite_hessian = false) {
  GptqParams p;
  p.overwrite_hessian = overwrite_hessian;
  p.act_order = act_order;
  p.blocksize = blocksize;
  p.percdamp = percdamp;
  p.static_groups = static_groups;
  p.num_threads = num_threads;
  return p;
}

}  // namespace

void init_gptq(py::module_& m) {
  m.def(
      "pack_codes32",
      [](const carray<std::uint32_t>& codes, int bits) {
        check_code_bits(bits);
        check_ndim(codes, 2, "codes");
        const auto rows = static_cast<std::size_t>(codes.shape(0));
        const auto n = static_cast<std::size_t>(codes.shape(1));
        carray<std::uint32_t> out({rows, packed_words(n, bits)});
        pack_codes32(codes.data(), rows, n, bits, out.mutable_data());
        return out;
      },
      py::arg("codes"), py::arg("bits"),
      "Pack a (rows, n) uint32 matrix of codes of 1..32 bits (the layout of pack_codes).");
  m.def(
      "unpack_codes32",
      [](const carray<std::uint32_t>& packed, std::size_t n, int bits) {
        check_code_bits(bits);
        check_ndim(packed, 2, "packed");
        SQLLM_CHECK(static_cast<std::size_t>(packed.shape(1)) == packed_words(n, bits), "packed must have ",
                    packed_words(n, bits), " words per row for n=", n, " at bits=", bits, ", got ",
                    packed.shape(1));
        const auto rows = static_cast<std::size_t>(packed.shape(0));
        carray<std::uint32_t> out({rows, n});
        unpack_codes32(packed.data(), rows, n, bits, out.mutable_data());
        return out;
      },
      py::arg("packed"), py::arg("n"), py::arg("bits"), "Inverse of pack_codes32.");

  m.def(
      "uniform_rtn",
      [](const carray<float>& weight, int bits, int group_size, bool sym) {
        check_ndim(weight, 2, "weight");
        UniformParams p;
        p.bits = bits;
        p.group_size = group_size;
        p.sym = sym;
        check_uniform_params(p);
        const auto out = static_cast<std::size_t>(weight.shape(0));
        const auto in = static_cast<std::size_t>(weight.shape(1));
        SQLLM_CHECK(out > 0 && in > 0, "weight must be non-empty, got shape (", out, ", ", in, ")");
        const std::size_t G = uniform_num_groups(in, group_size);
        std::vector<std::uint8_t> codes(out * in);
        carray<std::uint16_t> scales({out, G}), zeros({out, G});
        carray<std::uint32_t> packed({out, packed_words(in, bits)});
        {
          py::gil_scoped_release nogil;
          uniform_rtn(weight.data(), out, in, p, codes.data(), scales.mutable_data(),
                      zeros.mutable_data());
          pack_codes(codes.data(), out, in, bits, packed.mutable_data());
        }
        return py::make_tuple(packed, scales, zeros);
      },
      py::arg("weight"), py::arg("bits") = 4, py::arg("group_size") = -1, py::arg("sym") = false,
      "Round-to-nearest onto uniform min-max grids.  Returns (qweight uint32 [out, words],\n"
      "scales fp16 bits uint16 [out, groups], zeros fp16 bits uint16 [out, groups]).");

  m.def(
      "gptq_uniform",
      [](const carray<float>& weight, carray<double> hessian, int bits, int group_size,
         bool sym, bool act_order, int blocksize, double percdamp, bool static_groups,
         int num_threads, bool overwrite_hessian, bool return_weight) {
        check_ndim(weight, 2, "weight");
        const auto out = static_cast<std::size_t>(weight.shape(0));
        const auto in = static_cast<std::size_t>(weight.shape(1));
        check_hessian(hessian, in);
        UniformParams up;
        up.bits = bits;
        up.group_size = group_size;
        up.sym = sym;
        check_uniform_params(up);
        const GptqParams gp = gptq_params(act_order, blocksize, percdamp, static_groups, num_threads,
                                          overwrite_hessian);
        const double* h = overwrite_hessian ? hessian_to_overwrite(hessian) : hessian.data();
        std::vector<std::uint8_t> codes(out * in);
        std::vector<std::uint16_t> scales, zeros;
        std::optional<carray<float>> deq;
        if (return_weight) deq.emplace(std::vector<py::ssize_t>{static_cast<py::ssize_t>(out),
                                                                static_cast<py::ssize_t>(in)});
        float* q_out = deq ? deq->mutable_data() : nullptr;
        carray<std::uint32_t> packed({out, packed_words(in, bits)});
        GptqResult res;
        {
          py::gil_scoped_release nogil;
          res = gptq_uniform(weight.data(), h, out, in, up, gp, codes.data(), scales,
                             zeros, q_out);
          pack_codes(codes.data(), out, in, bits, packed.mutable_data());
        }
        const auto G = static_cast<py::ssize_t>(res.num_groups);
        carray<std::uint16_t> s = to_numpy(scales), z = to_numpy(zeros);
        py::dict d;
        d["qweight"] = packed;
        d["scales"] = s.reshape({static_cast<py::ssize_t>(out), G});
        d["zeros"] = z.reshape({static_cast<py::ssize_t>(out), G});
        d["g_idx"] = to_numpy(res.g_idx);
        d["perm"] = to_numpy(res.perm);
        if (deq) d["weight"] = *deq; else d["weight"] = py::none();
        d["proxy_error"] = res.proxy_error;
        d["dead_columns"] = res.dead_columns;
        d["hessian_overwritten"] = res.hessian_overwritten;
        return d;
      },
      py::arg("weight"), py::arg("hessian"), py::arg("bits") = 4, py::arg("group_size") = -1,
      py::arg("sym") = false, py::arg("act_order") = false, py::arg("blocksize") = 128,
      py::arg("percdamp") = 0.01, py::arg("static_groups") = false, py::arg("num_threads") = 0,
      py::arg("overwrite_hessian") = false, py::arg("return_weight") = true,
      "GPTQ onto uniform grids.  weight float32 [out, in]; hessian float64 [in, in], a positive\n"
      "multiple of X^T X (with overwrite_hessian: a writable float64 C-contiguous array whose\n"
      "memory becomes the engine's working matrix, contents destroyed, when it is aligned as\n"
      "Eigen aligns its matrices -- torch tensors are; else it is copied).  Returns a dict: qweight (uint32 [out, words]), scales and zeros\n"
      "(fp16 bits, uint16 [out, groups]), g_idx (int32 [in]), perm (int32 [in]), weight\n"
      "(the dequantized float32 [out, in]; None with return_weight=False), proxy_error\n"
      "(tr(dW H dW^T)), dead_columns, hessian_overwritten.");

  m.def(
      "gptq_lut",
      [](const carray<float>& weight, carray<double> hessian, const carray<float>& tables,
         int bits, bool act_order, int blocksize, double percdamp, int num_threads,
         bool overwrite_hessian, bool return_weight) {
        check_bits(bits);
        check_ndim(weight, 2, "weight");
        check_ndim(tables, 2, "lookup_table");
        const auto out = static_cast<std::size_t>(weight.shape(0));
        const auto in = static_cast<std::size_t>(weight.shape(1));
        check_hessian(hessian, in);
        const std::size_t K = std::size_t{1} << bits;
        SQLLM_CHECK(static_cast<std::size_t>(tables.shape(0)) == out &&
                        static_cast<std::size_t>(tables.shape(1)) == K,
                    "lookup_table must have shape (", out, ", ", K, ") (one table per row), got (",
                    tables.shape(0), ", ", tables.shape(1), ")");
        for (py::ssize_t k = 0; k < tables.size(); ++k)
          SQLLM_CHECK(std::isfinite(tables.data()[k]), "lookup_table contains NaN or Inf");
        const GptqParams gp = gptq_params(act_order, blocksize, percdamp, false, num_threads,
                                          overwrite_hessian);
        const double* h = overwrite_hessian ? hessian_to_overwrite(hessian) : hessian.data();
        std::vector<std::uint8_t> codes(out * in);
        carray<std::uint32_t> packed({out, packed_words(in, bits)});
        std::optional<carray<float>> deq;
        if (return_weight) deq.emplace(std::vector<py::ssize_t>{static_cast<py::ssize_t>(out),
                                                                static_cast<py::ssize_t>(in)});
        float* q_out = deq ? deq->mutable_data() : nullptr;
        GptqResult res;
        {
          py::gil_scoped_release nogil;
          LutColumnQuantizer q{tables.data(), K, in, codes.data()};
          res = gptq(weight.data(), h, out, in, gp, q, q_out);
          pack_codes(codes.data(), out, in, bits, packed.mutable_data());
        }
        return py::make_tuple(packed, deq ? py::object(*deq) : py::object(py::none()), res.proxy_error);
      },
      py::arg("weight"), py::arg("hessian"), py::arg("tables"), py::arg("bits"),
      py::arg("act_order") = false, py::arg("blocksize") = 128, py::arg("percdamp") = 0.01,
      py::arg("num_threads") = 0, py::arg("overwrite_hessian") = false,
      py::arg("return_weight") = true,
      "GPTQ with per-row lookup tables as the column quantizer (SqueezeLLM + GPTQ error\n"
      "feedback).  Returns (qweight uint32 [out, words], dequantized float32 [out, in] or None\n"
      "with return_weight=False, proxy_error).");

  m.def(
      "uniform_matmul",
      [](const carray<float>& x, const carray<std::uint32_t>& qweight,
         const carray<std::uint16_t>& scales, const carray<std::uint16_t>& zeros,
         std::optional<carray<std::int32_t>> g_idx, int bits, int group_size,
         std::size_t in_features, int num_threads, bool checked) {
        const UniformView v = uniform_view(qweight, scales, zeros, g_idx, bits, group_size, in_features);
        check_ndim(x, 2, "x");
        SQLLM_CHECK(static_cast<std::size_t>(x.shape(1)) == in_features, "x has ", x.shape(1),
                    " features but the layer expects in_features=", in_features);
        const auto batch = static_cast<std::size_t>(x.shape(0));
        carray<float> y({batch, v.out});
        {
          py::gil_scoped_release nogil;
          uniform_matmul(v, x.data(), batch, y.mutable_data(), num_threads, checked);
        }
        return y;
      },
      py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("g_idx"),
      py::arg("bits"), py::arg("group_size"), py::arg("in_features"), py::arg("num_threads") = 0,
      py::arg("checked") = false,
      "y = x @ W^T from the uniform format (scales/zeros as fp16 bits); fp32 accumulate.");

  m.def(
      "uniform_dequantize",
      [](const carray<std::uint32_t>& qweight, const carray<std::uint16_t>& scales,
         const carray<std::uint16_t>& zeros, std::optional<carray<std::int32_t>> g_idx, int bits,
         int group_size, std::size_t in_features) {
        const UniformView v = uniform_view(qweight, scales, zeros, g_idx, bits, group_size, in_features);
        check_uniform_view(v);
        carray<float> w({v.out, v.in});
        {
          py::gil_scoped_release nogil;
          uniform_dequantize(v, w.mutable_data());
        }
        return w;
      },
      py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("g_idx"), py::arg("bits"),
      py::arg("group_size"), py::arg("in_features"),
      "Materialise the (out, in) float32 weight of a uniform-format layer.");

  m.def(
      "check_uniform",
      [](const carray<std::uint32_t>& qweight, const carray<std::uint16_t>& scales,
         const carray<std::uint16_t>& zeros, std::optional<carray<std::int32_t>> g_idx, int bits,
         int group_size, std::size_t in_features) {
        check_uniform_view(uniform_view(qweight, scales, zeros, g_idx, bits, group_size, in_features));
      },
      py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("g_idx"), py::arg("bits"),
      py::arg("group_size"), py::arg("in_features"),
      "Validate a uniform-format layer (raises ValueError naming the first problem).");
}

}  // namespace bind
}  // namespace sqllm
