// Bindings of the non-uniform quantizer, packing and the CPU LUT matmul.
// Conversion and shape checks only; the algorithms live in include/sqllm.
#include <pybind11/stl.h>

#include <optional>
#include <tuple>

#include "bindings.hpp"
#include "sqllm/cpu_features.hpp"
#include "sqllm/csr.hpp"
#include "sqllm/lut_matmul.hpp"
#include "sqllm/lut_matmul_bf16.hpp"
#include "sqllm/nuq.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/sparse.hpp"

namespace sqllm {
namespace bind {

namespace {

using CsrArrays = std::tuple<carray<std::int32_t>, carray<std::int32_t>, carray<std::uint16_t>>;

CsrView csr_view(const CsrArrays& t, std::size_t rows) {
  const auto& [row_ptr, col_idx, values] = t;
  check_ndim(row_ptr, 1, "sparse row_ptr");
  check_ndim(col_idx, 1, "sparse col_idx");
  check_ndim(values, 1, "sparse values");
  SQLLM_CHECK(static_cast<std::size_t>(row_ptr.shape(0)) == rows + 1, "sparse row_ptr must have ",
              rows + 1, " entries (out_features + 1), got ", row_ptr.shape(0));
  SQLLM_CHECK(col_idx.shape(0) == values.shape(0), "sparse col_idx and values must have the same ",
              "length, got ", col_idx.shape(0), " and ", values.shape(0));
  CsrView v;
  v.row_ptr = row_ptr.data();
  v.col_idx = col_idx.data();
  v.values = values.data();
  v.nnz = static_cast<std::size_t>(values.shape(0));
  return v;
}

void check_packed(const carray<std::uint32_t>& packed, std::size_t in, int bits, const char* arg) {
  check_ndim(packed, 2, arg);
  const std::size_t words = packed_words(in, bits);
  SQLLM_CHECK(static_cast<std::size_t>(packed.shape(1)) == words, arg, " must have ", words,
              " words per row for in_features=", in, " at bits=", bits, ", got ", packed.shape(1));
}

void check_tables(const carray<float>& tables, std::size_t out, std::size_t in, int bits,
                  GroupAxis axis) {
  check_ndim(tables, 2, "lookup_table");
  const std::size_t groups = nuq_num_tables(out, in, axis);
  const std::size_t K = std::size_t{1} << bits;
  SQLLM_CHECK(static_cast<std::size_t>(tables.shape(0)) == groups &&
                  static_cast<std::size_t>(tables.shape(1)) == K,
              "lookup_table must have shape (", groups, ", ", K, ") for ", to_string(axis),
              " grouping, got (", tables.shape(0), ", ", tables.shape(1), ")");
}

/// The one place Python arrays become a LutView (array shapes checked here;
/// the view itself is validated by check_lut_view where it is used).
LutView lut_view(const carray<std::uint32_t>& packed, const carray<float>& tables,
                 std::size_t in_features, int bits, const std::string& group_axis,
                 const std::optional<CsrArrays>& sparse) {
  check_bits(bits);
  LutView v;
  v.bits = bits;
  v.axis = parse_group_axis(group_axis);
  v.in = in_features;
  check_packed(packed, in_features, bits, "qweight");
  v.out = static_cast<std::size_t>(packed.shape(0));
  check_tables(tables, v.out, in_features, bits, v.axis);
  v.codes = packed.data();
  v.tables = tables.data();
  if (sparse) v.sparse = csr_view(*sparse, v.out);
  return v;
}

}  // namespace

void init_quant(py::module_& m) {
  m.def("packed_words", [](std::size_t n, int bits) {
    check_bits(bits);
    return packed_words(n, bits);
  }, py::arg("n"), py::arg("bits"), "32-bit words one row of n codes of `bits` bits occupies.");

  m.def(
      "pack_codes",
      [](const carray<std::uint8_t>& codes, int bits) {
        check_bits(bits);
        check_ndim(codes, 2, "codes");
        const auto rows = static_cast<std::size_t>(codes.shape(0));
        const auto n = static_cast<std::size_t>(codes.shape(1));
        carray<std::uint32_t> out({rows, packed_words(n, bits)});
        pack_codes(codes.data(), rows, n, bits, out.mutable_data());
        return out;
      },
      py::arg("codes"), py::arg("bits"), "Pack a (rows, n) uint8 code matrix into uint32 words.");

  m.def(
      "unpack_codes",
      [](const carray<std::uint32_t>& packed, std::size_t n, int bits) {
        check_bits(bits);
        check_packed(packed, n, bits, "packed");
        const auto rows = static_cast<std::size_t>(packed.shape(0));
        carray<std::uint8_t> out({rows, n});
        unpack_codes(packed.data(), rows, n, bits, out.mutable_data());
        return out;
      },
      py::arg("packed"), py::arg("n"), py::arg("bits"), "Inverse of pack_codes.");

  m.def(
      "nuq_quantize",
      [](const carray<float>& weight, std::optional<carray<float>> sensitivity, int bits,
         const std::string& group_axis, const std::string& method, int max_iter,
         std::optional<carray<std::uint8_t>> keep, int num_threads) {
        check_bits(bits);
        check_ndim(weight, 2, "weight");
        const auto out = static_cast<std::size_t>(weight.shape(0));
        const auto in = static_cast<std::size_t>(weight.shape(1));
        SQLLM_CHECK(out > 0 && in > 0, "weight must be non-empty, got shape (", out, ", ", in, ")");
        if (sensitivity) {
          check_ndim(*sensitivity, 2, "sensitivity");
          SQLLM_CHECK(sensitivity->shape(0) == weight.shape(0) &&
                          sensitivity->shape(1) == weight.shape(1),
                      "sensitivity shape (", sensitivity->shape(0), ", ", sensitivity->shape(1),
                      ") must equal weight shape (", out, ", ", in, ")");
        }
        if (keep) {
          check_ndim(*keep, 2, "keep");
          SQLLM_CHECK(keep->shape(0) == weight.shape(0) && keep->shape(1) == weight.shape(1),
                      "keep mask shape must equal weight shape (", out, ", ", in, ")");
        }
        NuqParams p;
        p.bits = bits;
        p.axis = parse_group_axis(group_axis);
        p.method = parse_kmeans_method(method);
        p.max_iter = max_iter;
        p.num_threads = num_threads;
        const std::size_t groups = nuq_num_tables(out, in, p.axis);
        carray<std::uint32_t> packed({static_cast<py::ssize_t>(out), static_cast<py::ssize_t>(packed_words(in, bits))});
        carray<float> tables({static_cast<py::ssize_t>(groups), py::ssize_t{1} << bits});
        carray<double> sse(static_cast<py::ssize_t>(groups));
        {
          py::gil_scoped_release nogil;
          nuq_quantize(weight.data(), sensitivity ? sensitivity->data() : nullptr,
                       keep ? keep->data() : nullptr, out, in, p, packed.mutable_data(),
                       tables.mutable_data(), sse.mutable_data());
        }
        return py::make_tuple(packed, tables, sse);
      },
      py::arg("weight"), py::arg("sensitivity") = py::none(), py::arg("bits") = 3,
      py::arg("group_axis") = "row", py::arg("method") = "exact", py::arg("max_iter") = 50,
      py::arg("keep") = py::none(), py::arg("num_threads") = 0,
      "Sensitivity-weighted non-uniform quantization of a (out, in) weight.\n"
      "Returns (packed codes uint32 [out, words], lookup tables float32 [groups, 2^bits],\n"
      "weighted SSE per group float64 [groups]).");

  m.def(
      "nuq_dequantize",
      [](const carray<std::uint32_t>& packed, const carray<float>& tables, std::size_t in_features,
         int bits, const std::string& group_axis) {
        const LutView v = lut_view(packed, tables, in_features, bits, group_axis, std::nullopt);
        check_lut_view(v);
        carray<float> w({v.out, in_features});
        {
          py::gil_scoped_release nogil;
          lut_dequantize(v, w.mutable_data());
        }
        return w;
      },
      py::arg("packed"), py::arg("tables"), py::arg("in_features"), py::arg("bits"),
      py::arg("group_axis") = "row", "Materialise the (out, in) weight the codes represent.");

  m.def(
      "lut_matmul",
      [](const carray<float>& x, const carray<std::uint32_t>& packed, const carray<float>& tables,
         int bits, std::size_t in_features, const std::string& group_axis,
         std::optional<CsrArrays> sparse, int num_threads, bool sparse_checked,
         const std::string& kernel) {
        const CpuKernel ker = parse_cpu_kernel(kernel);
        const LutView v = lut_view(packed, tables, in_features, bits, group_axis, sparse);
        check_ndim(x, 2, "x");
        SQLLM_CHECK(static_cast<std::size_t>(x.shape(1)) == in_features, "x has ", x.shape(1),
                    " features but the layer expects in_features=", in_features);
        // Validated here (cheap parts) or by lut_matmul (the CSR walk, unless
        // the caller says it validated the sparse part at load time).
        check_lut_view(v, /*check_sparse_contents=*/!sparse_checked);
        const auto batch = static_cast<std::size_t>(x.shape(0));
        carray<float> y({batch, v.out});
        {
          py::gil_scoped_release nogil;
          lut_matmul(v, x.data(), batch, y.mutable_data(), num_threads, /*checked=*/true, ker);
        }
        return y;
      },
      py::arg("x"), py::arg("packed"), py::arg("tables"), py::arg("bits"), py::arg("in_features"),
      py::arg("group_axis") = "row", py::arg("sparse") = py::none(), py::arg("num_threads") = 0,
      py::arg("sparse_checked") = false, py::arg("kernel") = "auto",
      "y = x @ W^T from packed codes and lookup tables (+ optional CSR sparse part\n"
      "(row_ptr int32, col_idx int32, values fp16 bits as uint16)); fp32 accumulate.\n"
      "kernel: 'auto' (the best this CPU supports, or $SQLLM_CPU_KERNEL), 'scalar', 'avx2'\n"
      "or 'avx512' (batches below 64; ValueError if the CPU lacks it).");

  m.def(
      "lut_matmul_bf16",
      [](const carray<std::uint16_t>& x, const carray<std::uint32_t>& packed,
         const carray<float>& tables, int bits, std::size_t in_features,
         std::optional<CsrArrays> sparse, int num_threads, bool sparse_checked) {
        const LutView v = lut_view(packed, tables, in_features, bits, "row", sparse);
        check_ndim(x, 2, "x");
        SQLLM_CHECK(static_cast<std::size_t>(x.shape(1)) == in_features, "x has ", x.shape(1),
                    " features but the layer expects in_features=", in_features);
        check_lut_view(v, /*check_sparse_contents=*/!sparse_checked);
        const auto batch = static_cast<std::size_t>(x.shape(0));
        carray<float> y({batch, v.out});
        {
          py::gil_scoped_release nogil;
          lut_matmul_bf16(v, x.data(), batch, y.mutable_data(), num_threads, /*checked=*/true);
        }
        return y;
      },
      py::arg("x"), py::arg("packed"), py::arg("tables"), py::arg("bits"), py::arg("in_features"),
      py::arg("sparse") = py::none(), py::arg("num_threads") = 0,
      py::arg("sparse_checked") = false,
      "y (fp32) = x @ W^T for bf16 x (its bit patterns as uint16), row grouping, 2..4-bit\n"
      "codes: bf16 x bf16 products (the tables rounded to bf16) accumulated in fp32, with\n"
      "AVX512-BF16 (see has_bf16_matmul); the sparse part in fp32.");
  m.def("has_bf16_matmul", &cpu_supports_bf16_matmul,
        "Whether lut_matmul_bf16 runs here (AVX512-BF16, and $SQLLM_CPU_KERNEL unset, auto "
        "or avx512).");
  m.def(
      "cpu_kernels",
      [] {
        std::vector<std::string> ks;
        for (CpuKernel k : {CpuKernel::Scalar, CpuKernel::Avx2, CpuKernel::Avx512})
          if (cpu_supports(k)) ks.emplace_back(to_string(k));
        return ks;
      },
      "The CPU LUT matmul paths this CPU and build support, slowest first.");
  m.def(
      "cpu_kernel", [] { return std::string(to_string(resolve_cpu_kernel(CpuKernel::Auto))); },
      "The path kernel='auto' takes here (the best supported, or $SQLLM_CPU_KERNEL).");

  m.def(
      "check_csr",
      [](const CsrArrays& sparse, std::size_t rows, std::size_t cols) {
        const CsrView v = csr_view(sparse, rows);
        check_csr(v, rows, cols);
      },
      py::arg("sparse"), py::arg("rows"), py::arg("cols"),
      "Validate a CSR sparse part (raises ValueError naming the first problem).");
  m.def(
      "sparse_select",
      [](const carray<float>& weight, std::optional<carray<float>> sensitivity, double sparsity,
         double sensitive_fraction) {
        check_ndim(weight, 2, "weight");
        const auto n = static_cast<std::size_t>(weight.size());
        if (sensitivity) {
          SQLLM_CHECK(sensitivity->ndim() == 2 && sensitivity->shape(0) == weight.shape(0) &&
                          sensitivity->shape(1) == weight.shape(1),
                      "sensitivity shape must equal weight shape");
        }
        const SparseBudget b = sparse_budget(n, sparsity, sensitive_fraction, sensitivity.has_value());
        carray<std::uint8_t> keep({weight.shape(0), weight.shape(1)});
        {
          py::gil_scoped_release nogil;
          sparse_select(weight.data(), sensitivity ? sensitivity->data() : nullptr, n, b,
                        keep.mutable_data());
        }
        return keep;
      },
      py::arg("weight"), py::arg("sensitivity"), py::arg("sparsity"),
      py::arg("sensitive_fraction") = 1.0 / 9.0,
      "Mask (uint8, weight's shape) of the values Dense-and-Sparse keeps exactly:\n"
      "magnitude outliers from both tails plus the most sensitive values.");

  m.def(
      "sparse_residual",
      [](const carray<float>& weight, const carray<std::uint32_t>& packed,
         const carray<float>& tables, const carray<std::uint8_t>& keep, int bits,
         const std::string& group_axis) {
        check_bits(bits);
        const GroupAxis axis = parse_group_axis(group_axis);
        check_ndim(weight, 2, "weight");
        const auto out = static_cast<std::size_t>(weight.shape(0));
        const auto in = static_cast<std::size_t>(weight.shape(1));
        check_packed(packed, in, bits, "packed");
        SQLLM_CHECK(static_cast<std::size_t>(packed.shape(0)) == out, "packed must have ", out, " rows");
        check_tables(tables, out, in, bits, axis);
        check_ndim(keep, 2, "keep");
        SQLLM_CHECK(keep.shape(0) == weight.shape(0) && keep.shape(1) == weight.shape(1),
                    "keep mask shape must equal weight shape");
        std::vector<std::int32_t> row_ptr, col_idx;
        std::vector<std::uint16_t> values;
        sparse_residual(weight.data(), packed.data(), tables.data(), keep.data(), out, in, bits,
                        axis, row_ptr, col_idx, values);
        auto to_np = [](const auto& v) {
          using T = typename std::decay_t<decltype(v)>::value_type;
          carray<T> a(static_cast<py::ssize_t>(v.size()));
          std::copy(v.begin(), v.end(), a.mutable_data());
          return a;
        };
        return py::make_tuple(to_np(row_ptr), to_np(col_idx), to_np(values));
      },
      py::arg("weight"), py::arg("packed"), py::arg("tables"), py::arg("keep"), py::arg("bits"),
      py::arg("group_axis") = "row",
      "CSR (row_ptr int32, col_idx int32, values fp16 bits uint16) of W - W_dense at the kept\n"
      "positions.");
}

}  // namespace bind
}  // namespace sqllm
