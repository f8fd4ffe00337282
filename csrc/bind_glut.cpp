// Bindings of the grouped-lookup-table ("glut") format: quantizer, GPTQ
// feedback with refit, decode and matmul.  Conversion and shape checks only;
// the algorithms live in include/sqllm/glut.hpp.
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "sqllm/glut.hpp"

namespace sqllm {
namespace bind {

namespace {

/// The one place Python arrays become a GlutView (shapes checked here; values
/// by check_glut_view).
GlutView glut_view(const carray<std::uint32_t>& qweight, const carray<std::uint8_t>& tables,
                   const carray<std::uint16_t>& scales, const carray<std::uint16_t>& offsets,
                   int bits, int group_size, std::size_t in) {
  SQLLM_CHECK(bits >= kGlutMinBits && bits <= kGlutMaxBits, "glut: bits must be in 1..8, got ", bits);
  SQLLM_CHECK(group_size >= 1, "glut: group_size must be >= 1, got ", group_size);
  SQLLM_CHECK(in > 0, "glut: in_features must be > 0");
  check_ndim(qweight, 2, "qweight");
  check_ndim(tables, 2, "tables");
  check_ndim(scales, 2, "scales");
  check_ndim(offsets, 2, "offsets");
  const auto out = static_cast<std::size_t>(qweight.shape(0));
  const std::size_t words = packed_words(in, bits);
  const std::size_t G = glut_num_groups(in, static_cast<std::size_t>(group_size));
  const std::size_t K = std::size_t{1} << bits;
  SQLLM_CHECK(static_cast<std::size_t>(qweight.shape(1)) == words, "glut: qweight must have ", words,
              " words per row for in_features=", in, " at bits=", bits, ", got ", qweight.shape(1));
  SQLLM_CHECK(static_cast<std::size_t>(tables.shape(0)) == out &&
                  static_cast<std::size_t>(tables.shape(1)) == G * K,
              "glut: tables must have shape (", out, ", ", G * K, ") (groups x 2^bits per row), got (",
              tables.shape(0), ", ", tables.shape(1), ")");
  for (const auto* a : {&scales, &offsets})
    SQLLM_CHECK(static_cast<std::size_t>(a->shape(0)) == out && static_cast<std::size_t>(a->shape(1)) == G,
                "glut: scales and offsets must have shape (", out, ", ", G, "), got (", a->shape(0),
                ", ", a->shape(1), ")");
  GlutView v;
  v.qweight = qweight.data();
  v.tables = tables.data();
  v.scales = scales.data();
  v.offsets = offsets.data();
  v.out = out;
  v.in = in;
  v.bits = bits;
  v.group_size = group_size;
  return v;
}

GlutParams glut_params(int bits, int group_size, const std::string& kmeans, int max_iter,
                       int num_threads) {
  GlutParams p;
  p.bits = bits;
  p.group_size = group_size;
  p.method = parse_kmeans_method(kmeans);
  p.max_iter = max_iter;
  p.num_threads = num_threads;
  check_glut_params(p);
  return p;
}

struct GlutArrays {
  carray<std::uint32_t> qweight;
  carray<std::uint8_t> tables;
  carray<std::uint16_t> scales, offsets;
  carray<double> sse, sse_float;
  GlutArrays(std::size_t out, std::size_t in, const GlutParams& p)
      : qweight({out, packed_words(in, p.bits)}),
        tables({out, glut_num_groups(in, static_cast<std::size_t>(p.group_size)) << p.bits}),
        scales({out, glut_num_groups(in, static_cast<std::size_t>(p.group_size))}),
        offsets({out, glut_num_groups(in, static_cast<std::size_t>(p.group_size))}),
        sse({out, glut_num_groups(in, static_cast<std::size_t>(p.group_size))}),
        sse_float({out, glut_num_groups(in, static_cast<std::size_t>(p.group_size))}) {}
  GlutOut out() {
    GlutOut o;
    o.qweight = qweight.mutable_data();
    o.tables = tables.mutable_data();
    o.scales = scales.mutable_data();
    o.offsets = offsets.mutable_data();
    o.sse = sse.mutable_data();
    o.sse_float = sse_float.mutable_data();
    return o;
  }
  py::dict dict() const {
    py::dict d;
    d["qweight"] = qweight;
    d["tables"] = tables;
    d["scales"] = scales;
    d["offsets"] = offsets;
    d["sse"] = sse;
    d["sse_float"] = sse_float;
    return d;
  }
};

const float* sens_ptr(const std::optional<carray<float>>& s, std::size_t out, std::size_t in) {
  if (!s) return nullptr;
  check_ndim(*s, 2, "sensitivity");
  SQLLM_CHECK(static_cast<std::size_t>(s->shape(0)) == out && static_cast<std::size_t>(s->shape(1)) == in,
              "sensitivity must have the weight's shape (", out, ", ", in, "), got (", s->shape(0),
              ", ", s->shape(1), ")");
  return s->data();
}

}  // namespace

void init_glut(py::module_& m) {
  m.def(
      "glut_quantize",
      [](const carray<float>& weight, std::optional<carray<float>> sensitivity, int bits,
         int group_size, const std::string& kmeans, int max_iter, int num_threads) {
        const GlutParams p = glut_params(bits, group_size, kmeans, max_iter, num_threads);
        check_ndim(weight, 2, "weight");
        const auto out = static_cast<std::size_t>(weight.shape(0));
        const auto in = static_cast<std::size_t>(weight.shape(1));
        SQLLM_CHECK(out > 0 && in > 0, "glut: weight must be non-empty, got shape (", out, ", ", in, ")");
        const float* S = sens_ptr(sensitivity, out, in);
        GlutArrays a(out, in, p);
        {
          py::gil_scoped_release nogil;
          glut_quantize(weight.data(), S, out, in, p, a.out());
        }
        return a.dict();
      },
      py::arg("weight"), py::arg("sensitivity") = py::none(), py::arg("bits") = 4,
      py::arg("group_size") = 128, py::arg("kmeans") = "exact", py::arg("max_iter") = 50,
      py::arg("num_threads") = 0,
      "Grouped lookup tables: Fisher-weighted 1-D k-means per (row, group of group_size\n"
      "columns), tables stored as uint8 entries with an fp16 scale and offset.  Returns a dict:\n"
      "qweight (uint32 [out, words]), tables (uint8 [out, G*2^bits]), scales and offsets (fp16\n"
      "bits, uint16 [out, G]), sse (weighted SSE per table with the compact tables) and\n"
      "sse_float (the same with the float k-means centroids).");

  m.def(
      "glut_gptq",
      [](const carray<float>& weight, const carray<double>& hessian,
         std::optional<carray<float>> sensitivity, int bits, int group_size,
         const std::string& kmeans, bool act_order, int blocksize, double percdamp, bool refit,
         int num_threads, int rounds) {
        SQLLM_CHECK(rounds >= 1, "glut: rounds must be >= 1, got ", rounds);
        const GlutParams p = glut_params(bits, group_size, kmeans, 50, num_threads);
        check_ndim(weight, 2, "weight");
        check_ndim(hessian, 2, "hessian");
        const auto out = static_cast<std::size_t>(weight.shape(0));
        const auto in = static_cast<std::size_t>(weight.shape(1));
        SQLLM_CHECK(out > 0 && in > 0, "glut: weight must be non-empty, got shape (", out, ", ", in, ")");
        SQLLM_CHECK(static_cast<std::size_t>(hessian.shape(0)) == in &&
                        static_cast<std::size_t>(hessian.shape(1)) == in,
                    "hessian must have shape (in_features, in_features) = (", in, ", ", in, "), got (",
                    hessian.shape(0), ", ", hessian.shape(1), ")");
        const float* S = sens_ptr(sensitivity, out, in);
        GptqParams gp;
        gp.act_order = act_order;
        gp.blocksize = blocksize;
        gp.percdamp = percdamp;
        GlutArrays a(out, in, p);
        GlutGptqResult r;
        {
          py::gil_scoped_release nogil;
          GlutOut o = a.out();
          glut_quantize(weight.data(), S, out, in, p, o);
          o.sse = nullptr;
          o.sse_float = nullptr;
          r = glut_gptq(weight.data(), hessian.data(), out, in, p, gp, refit, o);
          // further rounds: GPTQ again from the refit tables, refit again (a row's
          // refit is kept only when it lowers its proxy error)
          for (int k = 1; k < rounds && refit; ++k) {
            const GlutGptqResult rk = glut_gptq(weight.data(), hessian.data(), out, in, p, gp, refit, o);
            r.proxy_error = rk.proxy_error;
            r.rows_refit = rk.rows_refit;
          }
        }
        py::dict d = a.dict();
        d.attr("pop")("sse");
        d.attr("pop")("sse_float");
        d["proxy_error_gptq"] = r.proxy_error_gptq;
        d["proxy_error"] = r.proxy_error;
        d["rows_refit"] = r.rows_refit;
        return d;
      },
      py::arg("weight"), py::arg("hessian"), py::arg("sensitivity") = py::none(), py::arg("bits") = 4,
      py::arg("group_size") = 128, py::arg("kmeans") = "exact", py::arg("act_order") = false,
      py::arg("blocksize") = 128, py::arg("percdamp") = 0.01, py::arg("refit") = true,
      py::arg("num_threads") = 0, py::arg("rounds") = 1,
      "Grouped tables with GPTQ error feedback: tables from the Fisher-weighted k-means\n"
      "(glut_quantize), codes assigned by the GPTQ engine (hessian: float64 [in, in], a positive\n"
      "multiple of X^T X), then each row's tables refit by least squares in the Hessian metric\n"
      "(refit=True); rounds > 1 repeats GPTQ + refit from the refit tables.  Returns\n"
      "glut_quantize's arrays (without sse) and proxy_error_gptq,\n"
      "proxy_error (tr(dW H dW^T) before/after the refit), rows_refit.");

  m.def(
      "glut_dequantize",
      [](const carray<std::uint32_t>& qweight, const carray<std::uint8_t>& tables,
         const carray<std::uint16_t>& scales, const carray<std::uint16_t>& offsets, int bits,
         int group_size, std::size_t in_features, bool reference, int num_threads) {
        const GlutView v = glut_view(qweight, tables, scales, offsets, bits, group_size, in_features);
        check_glut_view(v);
        carray<float> w({v.out, v.in});
        {
          py::gil_scoped_release nogil;
          if (reference)
            glut_dequantize_ref(v, w.mutable_data());
          else
            glut_dequantize(v, w.mutable_data(), num_threads);
        }
        return w;
      },
      py::arg("qweight"), py::arg("tables"), py::arg("scales"), py::arg("offsets"), py::arg("bits"),
      py::arg("group_size"), py::arg("in_features"), py::arg("reference") = false,
      py::arg("num_threads") = 0,
      "The (out, in) float32 weight of a glut layer (reference=True: the plain scalar loop).");

  m.def(
      "glut_matmul",
      [](const carray<float>& x, const carray<std::uint32_t>& qweight,
         const carray<std::uint8_t>& tables, const carray<std::uint16_t>& scales,
         const carray<std::uint16_t>& offsets, int bits, int group_size, std::size_t in_features,
         int num_threads, bool checked, bool reference) {
        const GlutView v = glut_view(qweight, tables, scales, offsets, bits, group_size, in_features);
        if (!checked) check_glut_view(v);
        check_ndim(x, 2, "x");
        SQLLM_CHECK(static_cast<std::size_t>(x.shape(1)) == in_features, "x has ", x.shape(1),
                    " features but the layer expects in_features=", in_features);
        const auto batch = static_cast<std::size_t>(x.shape(0));
        carray<float> y({batch, v.out});
        {
          py::gil_scoped_release nogil;
          if (reference)
            glut_matmul_ref(v, x.data(), batch, y.mutable_data());
          else
            glut_matmul(v, x.data(), batch, y.mutable_data(), num_threads);
        }
        return y;
      },
      py::arg("x"), py::arg("qweight"), py::arg("tables"), py::arg("scales"), py::arg("offsets"),
      py::arg("bits"), py::arg("group_size"), py::arg("in_features"), py::arg("num_threads") = 0,
      py::arg("checked") = false, py::arg("reference") = false,
      "y = x @ W^T from the glut format (fp32 accumulate; reference=True: double, scalar).");

  m.def(
      "check_glut",
      [](const carray<std::uint32_t>& qweight, const carray<std::uint8_t>& tables,
         const carray<std::uint16_t>& scales, const carray<std::uint16_t>& offsets, int bits,
         int group_size, std::size_t in_features) {
        check_glut_view(glut_view(qweight, tables, scales, offsets, bits, group_size, in_features));
      },
      py::arg("qweight"), py::arg("tables"), py::arg("scales"), py::arg("offsets"), py::arg("bits"),
      py::arg("group_size"), py::arg("in_features"),
      "Validate a glut layer (raises ValueError naming the first problem).");
}

}  // namespace bind
}  // namespace sqllm
