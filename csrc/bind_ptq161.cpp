// Bindings of the PTQ1.61 format's matmul, dequantize and validator
// (include/sqllm/binary_matmul.hpp).  Conversion and shape checks only.
#include "bindings.hpp"
#include "sqllm/binary_matmul.hpp"

namespace sqllm {
namespace bind {

namespace {

/// The arrays of a layer, owned here for the duration of a call.
struct Ptq161Arrays {
  carray<std::uint8_t> mask, signs;
  carray<std::uint16_t> alpha, mu, r1, r2;
  carray<std::uint32_t> qweight;
  carray<std::uint16_t> scales, zeros;
};

Ptq161View ptq161_view(const Ptq161Arrays& a, int wbits, int group_size, std::size_t in) {
  check_ndim(a.mask, 1, "mask");
  check_ndim(a.signs, 2, "signs");
  check_ndim(a.alpha, 1, "alpha");
  check_ndim(a.mu, 1, "mu");
  check_ndim(a.r1, 1, "r1");
  check_ndim(a.r2, 1, "r2");
  check_ndim(a.qweight, 2, "qweight");
  check_ndim(a.scales, 2, "scales");
  check_ndim(a.zeros, 2, "zeros");
  SQLLM_CHECK(in > 0, "ptq161 layer: in_features must be > 0");
  SQLLM_CHECK(static_cast<std::size_t>(a.mask.shape(0)) == (in + 7) / 8, "mask must have ",
              (in + 7) / 8, " bytes for in_features=", in, ", got ", a.mask.shape(0));
  Ptq161View v;
  v.in = in;
  v.out = static_cast<std::size_t>(a.signs.shape(0));
  v.mask = a.mask.data();
  const std::size_t n_sal = v.n_sal(), n_bin = in - n_sal;
  SQLLM_CHECK(v.out > 0, "ptq161 layer: out_features must be > 0");
  SQLLM_CHECK(static_cast<std::size_t>(a.signs.shape(1)) == ptq161_sign_bytes(n_bin), "signs must have ",
              ptq161_sign_bytes(n_bin), " bytes per row for ", n_bin, " binarised channels, got ",
              a.signs.shape(1));
  for (const auto* p : {&a.alpha, &a.mu, &a.r1})
    SQLLM_CHECK(static_cast<std::size_t>(p->shape(0)) == v.out, "alpha, mu and r1 must have out_features=",
                v.out, " entries, got ", p->shape(0));
  SQLLM_CHECK(static_cast<std::size_t>(a.r2.shape(0)) == n_bin, "r2 must have ", n_bin,
              " entries (one per binarised channel), got ", a.r2.shape(0));
  v.signs = a.signs.data();
  v.alpha = a.alpha.data();
  v.mu = a.mu.data();
  v.r1 = a.r1.data();
  v.r2 = a.r2.data();
  SQLLM_CHECK(wbits >= kUniformMinBits && wbits <= kUniformMaxBits,
              "ptq161 layer: wbits must be in 2..8, got ", wbits);
  const std::size_t words = n_sal ? packed_words(n_sal, wbits) : 0;
  const std::size_t groups = n_sal ? uniform_num_groups(n_sal, group_size) : 0;
  SQLLM_CHECK(static_cast<std::size_t>(a.qweight.shape(0)) == v.out &&
                  static_cast<std::size_t>(a.qweight.shape(1)) == words,
              "qweight must have shape (", v.out, ", ", words, ") for ", n_sal, " salient channels at ",
              wbits, " bits, got (", a.qweight.shape(0), ", ", a.qweight.shape(1), ")");
  for (const auto* p : {&a.scales, &a.zeros})
    SQLLM_CHECK(static_cast<std::size_t>(p->shape(0)) == v.out &&
                    static_cast<std::size_t>(p->shape(1)) == groups,
                "scales and zeros must have shape (", v.out, ", ", groups, "), got (", p->shape(0), ", ",
                p->shape(1), ")");
  v.sal.qweight = a.qweight.data();
  v.sal.scales = a.scales.data();
  v.sal.zeros = a.zeros.data();
  v.sal.out = v.out;
  v.sal.in = n_sal;
  v.sal.bits = wbits;
  v.sal.group_size = group_size;
  v.sal.num_groups = groups;
  return v;
}

#define SQLLM_PTQ161_ARGS                                                                   \
  const carray<std::uint8_t>&mask, const carray<std::uint8_t>&signs,                       \
      const carray<std::uint16_t>&alpha, const carray<std::uint16_t>&mu,                   \
      const carray<std::uint16_t>&r1, const carray<std::uint16_t>&r2,                      \
      const carray<std::uint32_t>&qweight, const carray<std::uint16_t>&scales,             \
      const carray<std::uint16_t>&zeros, int wbits, int group_size, std::size_t in_features
#define SQLLM_PTQ161_PYARGS                                                                 \
  py::arg("mask"), py::arg("signs"), py::arg("alpha"), py::arg("mu"), py::arg("r1"),       \
      py::arg("r2"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("wbits"), \
      py::arg("group_size"), py::arg("in_features")

/// A layer's arrays and their validated view, kept between calls: a matmul then
/// converts only x.
struct Ptq161Handle {
  Ptq161Arrays a;
  Ptq161View v;
};

}  // namespace

void init_ptq161(py::module_& m) {
  py::class_<Ptq161Handle>(m, "Ptq161Handle",
                           "A ptq161 layer's buffers, validated once; matmul(x) multiplies.")
      .def(py::init([](SQLLM_PTQ161_ARGS) {
             auto h = std::unique_ptr<Ptq161Handle>(
                 new Ptq161Handle{Ptq161Arrays{mask, signs, alpha, mu, r1, r2, qweight, scales, zeros}, {}});
             h->v = ptq161_view(h->a, wbits, group_size, in_features);
             check_ptq161_view(h->v);
             return h;
           }),
           SQLLM_PTQ161_PYARGS)
      .def(
          "matmul",
          [](const Ptq161Handle& h, const carray<float>& x, int num_threads, const std::string& kernel) {
            const CpuKernel ker = parse_cpu_kernel(kernel);
            check_ndim(x, 2, "x");
            SQLLM_CHECK(static_cast<std::size_t>(x.shape(1)) == h.v.in, "x has ", x.shape(1),
                        " features but the layer expects in_features=", h.v.in);
            const auto batch = static_cast<std::size_t>(x.shape(0));
            carray<float> y({batch, h.v.out});
            {
              py::gil_scoped_release nogil;
              ptq161_matmul(h.v, x.data(), batch, y.mutable_data(), num_threads, /*checked=*/true, ker);
            }
            return y;
          },
          py::arg("x"), py::arg("num_threads") = 0, py::arg("kernel") = "auto",
          "y = x Ŵᵀ (as ptq161_matmul with the handle's buffers).");

  m.def(
      "check_ptq161",
      [](SQLLM_PTQ161_ARGS) {
        const Ptq161Arrays a{mask, signs, alpha, mu, r1, r2, qweight, scales, zeros};
        check_ptq161_view(ptq161_view(a, wbits, group_size, in_features));
      },
      SQLLM_PTQ161_PYARGS, "Validate a ptq161 layer's buffers; raises ValueError naming the problem.");

  m.def(
      "ptq161_dequantize",
      [](SQLLM_PTQ161_ARGS) {
        const Ptq161Arrays a{mask, signs, alpha, mu, r1, r2, qweight, scales, zeros};
        const Ptq161View v = ptq161_view(a, wbits, group_size, in_features);
        check_ptq161_view(v);
        carray<float> w({v.out, v.in});
        ptq161_dequantize(v, w.mutable_data());
        return w;
      },
      SQLLM_PTQ161_PYARGS, "The (out, in) float32 weight a ptq161 layer represents.");

  m.def(
      "ptq161_matmul",
      [](const carray<float>& x, SQLLM_PTQ161_ARGS, int num_threads, bool checked,
         bool reference, const std::string& kernel) {
        const CpuKernel ker = parse_cpu_kernel(kernel);
        const Ptq161Arrays a{mask, signs, alpha, mu, r1, r2, qweight, scales, zeros};
        const Ptq161View v = ptq161_view(a, wbits, group_size, in_features);
        check_ndim(x, 2, "x");
        SQLLM_CHECK(static_cast<std::size_t>(x.shape(1)) == in_features, "x has ", x.shape(1),
                    " features but the layer expects in_features=", in_features);
        const auto batch = static_cast<std::size_t>(x.shape(0));
        carray<float> y({batch, v.out});
        {
          py::gil_scoped_release nogil;
          if (reference) {
            check_ptq161_view(v);
            ptq161_matmul_reference(v, x.data(), batch, y.mutable_data());
          } else {
            ptq161_matmul(v, x.data(), batch, y.mutable_data(), num_threads, checked, ker);
          }
        }
        return y;
      },
      py::arg("x"), SQLLM_PTQ161_PYARGS, py::arg("num_threads") = 0, py::arg("checked") = false,
      py::arg("reference") = false, py::arg("kernel") = "auto",
      "y = x Ŵᵀ for a ptq161 layer (reference=True: the plain scalar loop).  kernel: auto |\n"
      "scalar (per-8-input sign tables, the uniform kernel for the salient part) | avx2 |\n"
      "avx512 (masked adds below 4 batch rows, per-8 sign tables above; a path the CPU lacks\n"
      "raises ValueError).");
}

}  // namespace bind
}  // namespace sqllm
