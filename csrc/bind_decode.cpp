// Bindings of the C++ LLaMA decoder (include/sqllm/llama_decode.hpp).
// Conversion and shape checks only; the arrays are kept alive by the Python
// object for as long as the decoder reads them.
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "sqllm/llama_decode.hpp"

namespace sqllm {
namespace bind {

namespace {

struct PyLlamaDecoder {
  std::vector<py::object> keep;  // every array a view points into
  std::unique_ptr<LlamaDecoder> dec;
};

template <class T>
const T* keep_array(PyLlamaDecoder& self, const py::object& obj, int ndim,
                    const std::vector<std::size_t>& shape, const std::string& what) {
  carray<T> a = py::cast<carray<T>>(obj);
  SQLLM_CHECK(a.ndim() == ndim, what, " must be ", ndim, "-D, got ", a.ndim(), "-D");
  for (int d = 0; d < ndim; ++d)
    SQLLM_CHECK(static_cast<std::size_t>(a.shape(d)) == shape[static_cast<std::size_t>(d)], what,
                ": dimension ", d, " must be ", shape[static_cast<std::size_t>(d)], ", got ",
                a.shape(d));
  self.keep.push_back(a);
  return a.data();
}

/// A linear layer from its description (a dict made by sqllm.fastdecode):
///   kind "dense": weight float32 [out, in]
///   kind "lut": qweight uint32 [out, words], tables float32 [groups, 2^bits], bits,
///               axis, sparse (row_ptr, col_idx, values uint16) or None
///   kind "uniform": qweight uint32, scales/zeros uint16 [out, groups], g_idx int32 [in]
///               or None, bits, group_size
/// plus bias (float32 [out] or None).
DecodeLinear linear_from(PyLlamaDecoder& self, const py::dict& d, std::size_t in, std::size_t out,
                         const std::string& name) {
  DecodeLinear L;
  L.in = in;
  L.out = out;
  const std::string kind = d["kind"].cast<std::string>();
  if (kind == "dense") {
    L.kind = DecodeLinear::Kind::Dense;
    L.dense = keep_array<float>(self, d["weight"], 2, {out, in}, name + " weight");
  } else if (kind == "lut") {
    L.kind = DecodeLinear::Kind::Lut;
    LutView& v = L.lut;
    v.bits = d["bits"].cast<int>();
    check_bits(v.bits);
    v.axis = parse_group_axis(d["axis"].cast<std::string>());
    v.in = in;
    v.out = out;
    v.codes = keep_array<std::uint32_t>(self, d["qweight"], 2, {out, packed_words(in, v.bits)},
                                        name + " qweight");
    v.tables = keep_array<float>(self, d["tables"], 2,
                                 {v.axis == GroupAxis::Row ? out : in, std::size_t{1} << v.bits},
                                 name + " lookup_table");
    py::object sp = d["sparse"];
    if (!sp.is_none()) {
      auto t = sp.cast<py::tuple>();
      SQLLM_CHECK(t.size() == 3, name, ": sparse must be (row_ptr, col_idx, values)");
      carray<std::int32_t> ci = py::cast<carray<std::int32_t>>(t[1]);
      const auto nnz = static_cast<std::size_t>(ci.size());
      v.sparse.row_ptr = keep_array<std::int32_t>(self, t[0], 1, {out + 1}, name + " sparse row_ptr");
      v.sparse.col_idx = keep_array<std::int32_t>(self, ci, 1, {nnz}, name + " sparse col_idx");
      v.sparse.values = keep_array<std::uint16_t>(self, t[2], 1, {nnz}, name + " sparse values");
      v.sparse.nnz = nnz;
    }
  } else if (kind == "uniform") {
    L.kind = DecodeLinear::Kind::Uniform;
    UniformView& v = L.uniform;
    v.bits = d["bits"].cast<int>();
    SQLLM_CHECK(v.bits >= kUniformMinBits && v.bits <= kUniformMaxBits, name,
                ": uniform bits must be in 2..8, got ", v.bits);
    v.group_size = d["group_size"].cast<int>();
    v.in = in;
    v.out = out;
    carray<std::uint16_t> scales = py::cast<carray<std::uint16_t>>(d["scales"]);
    SQLLM_CHECK(scales.ndim() == 2, name, ": scales must be 2-D");
    v.num_groups = static_cast<std::size_t>(scales.shape(1));
    v.qweight = keep_array<std::uint32_t>(self, d["qweight"], 2, {out, packed_words(in, v.bits)},
                                          name + " qweight");
    v.scales = keep_array<std::uint16_t>(self, scales, 2, {out, v.num_groups}, name + " scales");
    v.zeros = keep_array<std::uint16_t>(self, d["zeros"], 2, {out, v.num_groups}, name + " zeros");
    py::object gi = d["g_idx"];
    if (!gi.is_none()) v.g_idx = keep_array<std::int32_t>(self, gi, 1, {in}, name + " g_idx");
  } else {
    throw Error(detail::concat(name, ": unknown layer kind '", kind, "'"));
  }
  py::object b = d["bias"];
  if (!b.is_none()) L.bias = keep_array<float>(self, b, 1, {out}, name + " bias");
  return L;
}

}  // namespace

void init_decode(py::module_& m) {
  py::class_<PyLlamaDecoder>(m, "LlamaDecoder",
                             "Greedy LLaMA decoding in C++ (see sqllm.fastdecode).")
      .def(py::init([](const py::dict& cfg, const py::dict& embed, const py::list& layers,
                       const py::object& final_norm, const py::dict& lm_head,
                       const py::object& rope_cos, const py::object& rope_sin, int num_threads,
                       const std::string& kernel) {
             auto self = std::make_unique<PyLlamaDecoder>();
             LlamaDecodeConfig c;
             c.hidden = cfg["hidden"].cast<std::size_t>();
             c.intermediate = cfg["intermediate"].cast<std::size_t>();
             c.heads = cfg["heads"].cast<std::size_t>();
             c.kv_heads = cfg["kv_heads"].cast<std::size_t>();
             c.head_dim = cfg["head_dim"].cast<std::size_t>();
             c.vocab = cfg["vocab"].cast<std::size_t>();
             c.capacity = cfg["capacity"].cast<std::size_t>();
             c.rms_eps = cfg["rms_eps"].cast<float>();
             c.num_threads = num_threads;
             c.kernel = parse_cpu_kernel(kernel);
             SQLLM_CHECK(c.hidden > 0 && c.intermediate > 0 && c.heads > 0 && c.kv_heads > 0 &&
                             c.head_dim > 0 && c.vocab > 0 && c.capacity > 0,
                         "llama decoder: every size must be > 0");
             const std::size_t H = c.hidden, I = c.intermediate, qd = c.heads * c.head_dim,
                               kvd = c.kv_heads * c.head_dim;
             LlamaDecodeWeights w;
             PyLlamaDecoder& s = *self;
             w.embed = linear_from(s, embed, H, c.vocab, "embed_tokens");
             for (std::size_t l = 0; l < layers.size(); ++l) {
               const py::dict d = layers[l].cast<py::dict>();
               const std::string p = "layer " + std::to_string(l) + " ";
               LlamaDecodeLayer L;
               L.input_norm = keep_array<float>(s, d["input_norm"], 1, {H}, p + "input_layernorm");
               L.post_norm = keep_array<float>(s, d["post_norm"], 1, {H}, p + "post_attention_layernorm");
               L.q = linear_from(s, d["q"].cast<py::dict>(), H, qd, p + "q_proj");
               L.k = linear_from(s, d["k"].cast<py::dict>(), H, kvd, p + "k_proj");
               L.v = linear_from(s, d["v"].cast<py::dict>(), H, kvd, p + "v_proj");
               L.o = linear_from(s, d["o"].cast<py::dict>(), qd, H, p + "o_proj");
               L.gate = linear_from(s, d["gate"].cast<py::dict>(), H, I, p + "gate_proj");
               L.up = linear_from(s, d["up"].cast<py::dict>(), H, I, p + "up_proj");
               L.down = linear_from(s, d["down"].cast<py::dict>(), I, H, p + "down_proj");
               w.layers.push_back(L);
             }
             w.final_norm = keep_array<float>(s, final_norm, 1, {H}, "final norm");
             w.lm_head = linear_from(s, lm_head, H, c.vocab, "lm_head");
             w.rope_cos = keep_array<float>(s, rope_cos, 2, {c.capacity, c.head_dim}, "rope cos");
             w.rope_sin = keep_array<float>(s, rope_sin, 2, {c.capacity, c.head_dim}, "rope sin");
             // Validates everything (the CSR parts walked once).
             self->dec = std::make_unique<LlamaDecoder>(c, std::move(w));
             return self;
           }),
           py::arg("config"), py::arg("embed"), py::arg("layers"), py::arg("final_norm"),
           py::arg("lm_head"), py::arg("rope_cos"), py::arg("rope_sin"),
           py::arg("num_threads") = 0, py::arg("kernel") = "auto")
      .def_property_readonly("position", [](const PyLlamaDecoder& s) { return s.dec->position(); })
      .def_property_readonly("capacity", [](const PyLlamaDecoder& s) { return s.dec->capacity(); })
      .def_property_readonly("threads", [](const PyLlamaDecoder& s) { return s.dec->threads(); })
      .def_property_readonly("kernel", [](const PyLlamaDecoder& s) {
        return std::string(to_string(s.dec->kernel()));
      })
      .def("reset", [](PyLlamaDecoder& s) { s.dec->reset(); }, "Start a new sequence.")
      .def(
          "forward",
          [](PyLlamaDecoder& s, const carray<std::int64_t>& ids) {
            check_ndim(ids, 1, "ids");
            const auto n = static_cast<std::size_t>(ids.shape(0));
            carray<float> out(static_cast<py::ssize_t>(s.dec->vocab()));
            {
              py::gil_scoped_release nogil;
              const float* lg = s.dec->forward(ids.data(), n);
              std::copy_n(lg, s.dec->vocab(), out.mutable_data());
            }
            return out;
          },
          py::arg("ids"),
          "Run the tokens ids (int64 [n]) at the next n positions; the logits (float32 [vocab])\n"
          "of the last one.")
      .def(
          "generate",
          [](PyLlamaDecoder& s, const carray<std::int64_t>& prompt, std::size_t max_new,
             bool return_logits, std::int64_t eos) {
            check_ndim(prompt, 1, "prompt");
            const auto n = static_cast<std::size_t>(prompt.shape(0));
            std::vector<std::int64_t> toks;
            py::object logits = py::none();
            carray<float> lg;
            if (return_logits) {
              lg = carray<float>({static_cast<py::ssize_t>(max_new),
                                  static_cast<py::ssize_t>(s.dec->vocab())});
            }
            {
              py::gil_scoped_release nogil;
              toks = s.dec->generate(prompt.data(), n, max_new,
                                     return_logits ? lg.mutable_data() : nullptr, eos);
            }
            carray<std::int64_t> t(static_cast<py::ssize_t>(toks.size()));
            std::copy(toks.begin(), toks.end(), t.mutable_data());
            if (return_logits)
              logits = lg[py::slice(0, static_cast<py::ssize_t>(toks.size()), 1)];
            return py::make_tuple(t, logits);
          },
          py::arg("prompt"), py::arg("max_new_tokens"), py::arg("return_logits") = false,
          py::arg("eos_token_id") = -1,
          "Greedy decoding from position 0: (new tokens int64 [k], logits float32 [k, vocab]\n"
          "or None); k = max_new_tokens unless eos_token_id came first.");
}

}  // namespace bind
}  // namespace sqllm
