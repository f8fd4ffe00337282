// Bindings of the CUDA LUT kernels (cuda/sqllm_cuda.h) and of the CPU
// precision-mode reference (sqllm/reference/lut_matmul_precision.hpp).
// Conversion and checks only.  Always compiled: without SQLLM_WITH_CUDA only
// cuda_compiled() == False, cuda_device_count() == 0 and the CPU reference
// exist, and python/sqllm/kernels_cuda.py raises a clear error.
//
// The CUDA entry points take raw device pointers as integers
// (tensor.data_ptr()) and the stream as an integer
// (torch.cuda.current_stream().cuda_stream); they release the GIL.
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.hpp"
#include "sqllm/float_emu.hpp"
#include "sqllm/packing.hpp"
#include "sqllm/reference/lut_matmul_precision.hpp"

#ifdef SQLLM_WITH_CUDA
#include "sqllm_cuda.h"
#endif

namespace sqllm {
namespace bind {

namespace {

PrecisionConfig parse_precision(const std::string& name, int mul_exp, int mul_man, int acc_exp,
                                int acc_man) {
  PrecisionConfig p;
  if (name == "fp32") {
    p.mode = Precision::FP32;
  } else if (name == "fp16") {
    p.mode = Precision::FP16;
  } else if (name == "emulated") {
    p.mode = Precision::Emulated;
  } else {
    throw Error("precision must be 'fp32', 'fp16' or 'emulated', got '" + name + "'");
  }
  p.mul_exp = mul_exp;
  p.mul_man = mul_man;
  p.acc_exp = acc_exp;
  p.acc_man = acc_man;
  check_precision(p);
  return p;
}

using RefCsr = std::tuple<carray<std::int32_t>, carray<std::int32_t>, carray<float>>;

/// CPU reference: precision in {"fp32", "fp16", "emulated"} returns float32
/// [batch, out] in the reproducible order; "float64" returns the float64 sum.
py::array lut_matmul_reference(const carray<float>& x, const carray<std::uint32_t>& codes,
                               const carray<float>& tables, int bits, std::int64_t in_features,
                               bool column_grouping, const std::optional<RefCsr>& csr,
                               const std::string& precision, int mul_exp, int mul_man,
                               int acc_exp, int acc_man) {
  check_bits(bits);
  check_ndim(x, 2, "x");
  check_ndim(codes, 2, "codes");
  check_ndim(tables, 2, "tables");
  SQLLM_CHECK(in_features >= 1, "in_features must be >= 1, got ", in_features);
  SQLLM_CHECK(x.shape(1) == in_features, "x must have in_features=", in_features,
              " columns, got shape (", x.shape(0), ", ", x.shape(1), ")");
  const std::int64_t out = codes.shape(0);
  const auto W = static_cast<py::ssize_t>(packed_words(static_cast<std::size_t>(in_features), bits));
  SQLLM_CHECK(out >= 1 && codes.shape(1) == W, "codes must have shape (out, ", W,
              ") for in_features=", in_features, ", bits=", bits, ", got (", codes.shape(0), ", ",
              codes.shape(1), ")");
  const std::int64_t groups = column_grouping ? in_features : out;
  SQLLM_CHECK(tables.shape(0) == groups && tables.shape(1) == (py::ssize_t{1} << bits),
              "tables must have shape (", groups, ", ", (1 << bits), ") for ",
              column_grouping ? "column" : "row", " grouping, got (", tables.shape(0), ", ",
              tables.shape(1), ")");
  reference::LutMatmulView v;
  v.x = x.data();
  v.batch = x.shape(0);
  v.w.in = static_cast<std::size_t>(in_features);
  v.w.out = static_cast<std::size_t>(out);
  v.w.bits = bits;
  v.w.codes = codes.data();
  v.w.tables = tables.data();
  v.w.axis = column_grouping ? GroupAxis::Column : GroupAxis::Row;
  std::vector<std::uint16_t> values_h;  // the format stores fp16 values
  if (csr) {
    const auto& [row_ptr, col_idx, values] = *csr;
    check_ndim(row_ptr, 1, "csr row_ptr");
    check_ndim(col_idx, 1, "csr col_idx");
    check_ndim(values, 1, "csr values");
    SQLLM_CHECK(row_ptr.shape(0) == out + 1, "csr row_ptr must have out+1=", out + 1,
                " entries, got ", row_ptr.shape(0));
    SQLLM_CHECK(col_idx.shape(0) == values.shape(0), "csr col_idx and values differ in length: ",
                col_idx.shape(0), " vs ", values.shape(0));
    values_h.resize(static_cast<std::size_t>(values.shape(0)));
    for (std::size_t k = 0; k < values_h.size(); ++k) {
      const float f = values.data()[k];
      values_h[k] = float_to_half_bits(f);
      SQLLM_CHECK(half_bits_to_float(values_h[k]) == f || std::isnan(f), "csr values[", k, "]=", f,
                  " is not an fp16 value (the sparse part is stored in fp16)");
    }
    v.w.sparse = CsrView{row_ptr.data(), col_idx.data(), values_h.data(), values_h.size()};
  }
  if (precision == "float64") {
    py::array_t<double> y({static_cast<py::ssize_t>(v.batch), static_cast<py::ssize_t>(out)});
    double* yp = y.mutable_data();
    {
      py::gil_scoped_release release;
      reference::lut_matmul_f64(v, yp);
    }
    return std::move(y);
  }
  const PrecisionConfig p = parse_precision(precision, mul_exp, mul_man, acc_exp, acc_man);
  py::array_t<float> y({static_cast<py::ssize_t>(v.batch), static_cast<py::ssize_t>(out)});
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    reference::lut_matmul_precision(v, p, yp);
  }
  return std::move(y);
}

#ifdef SQLLM_WITH_CUDA
cuda::DType parse_dtype(const std::string& name) {
  if (name == "float16") return cuda::DType::F16;
  if (name == "bfloat16") return cuda::DType::BF16;
  if (name == "float32") return cuda::DType::F32;
  throw Error("dtype must be 'float16', 'bfloat16' or 'float32', got '" + name + "'");
}

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

/// The one place device pointers from Python become a LutView (checked by
/// the launchers through check_lut_view).
LutView device_lut_view(std::uintptr_t codes, std::uintptr_t tables, std::int64_t in_features,
                        std::int64_t out_features, int bits, bool column_grouping,
                        std::uintptr_t csr_row_ptr, std::uintptr_t csr_col_idx,
                        std::uintptr_t csr_values, std::int64_t nnz) {
  SQLLM_CHECK(in_features >= 1 && out_features >= 1 && nnz >= 0,
              "in_features and out_features must be >= 1 and nnz >= 0, got in_features=",
              in_features, ", out_features=", out_features, ", nnz=", nnz);
  LutView v;
  v.codes = ptr<const std::uint32_t>(codes);
  v.tables = ptr<const float>(tables);
  v.in = static_cast<std::size_t>(in_features);
  v.out = static_cast<std::size_t>(out_features);
  v.bits = bits;
  v.axis = column_grouping ? GroupAxis::Column : GroupAxis::Row;
  v.sparse.row_ptr = ptr<const std::int32_t>(csr_row_ptr);
  v.sparse.col_idx = ptr<const std::int32_t>(csr_col_idx);
  v.sparse.values = ptr<const std::uint16_t>(csr_values);
  v.sparse.nnz = static_cast<std::size_t>(nnz);
  return v;
}
#endif

}  // namespace

void init_cuda(py::module_& m) {
  m.def(
      "cuda_compiled",
      []() {
#ifdef SQLLM_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the module was built with the CUDA kernels.");
  m.def(
      "cuda_device_count",
      []() {
#ifdef SQLLM_WITH_CUDA
        return cuda::device_count();
#else
        return 0;
#endif
      },
      "Number of visible CUDA devices (0 without a driver, a device or CUDA support).");

  m.def("lut_matmul_reference", &lut_matmul_reference, py::arg("x"), py::arg("codes"),
        py::arg("tables"), py::arg("bits"), py::arg("in_features"),
        py::arg("column_grouping") = false, py::arg("csr") = py::none(),
        py::arg("precision") = "fp32", py::arg("mul_exp") = 5, py::arg("mul_man") = 10,
        py::arg("acc_exp") = 8, py::arg("acc_man") = 23,
        "CPU oracle of the CUDA LUT matmul.  x float32 (batch, in), codes uint32 (out, W) "
        "(int32 is reinterpreted), tables float32 (out or in, 2^bits), csr = (row_ptr int32, "
        "col_idx int32, values float16/float32) or None.  precision 'fp32' | 'fp16' | "
        "'emulated' gives float32 in the reproducible order of the exact CUDA kernel (bit "
        "for bit); 'float64' gives the float64 sum.");

#ifdef SQLLM_WITH_CUDA
  m.def(
      "cuda_lut_matmul",
      [](std::uintptr_t x, std::uintptr_t y, std::int64_t batch, std::int64_t in_features,
         std::int64_t out_features, std::int64_t x_stride, int bits, std::uintptr_t codes,
         std::uintptr_t tables, bool column_grouping, std::uintptr_t csr_row_ptr,
         std::uintptr_t csr_col_idx, std::uintptr_t csr_values, std::int64_t nnz,
         const std::string& dtype, const std::string& precision, int mul_exp, int mul_man,
         int acc_exp, int acc_man, bool exact, std::uintptr_t stream, const std::string& kernel) {
        cuda::LutMatmulArgs a;
        a.x = ptr<const void>(x);
        a.y = ptr<void>(y);
        a.batch = batch;
        a.x_stride = x_stride;
        a.layer = device_lut_view(codes, tables, in_features, out_features, bits, column_grouping,
                                  csr_row_ptr, csr_col_idx, csr_values, nnz);
        a.dtype = parse_dtype(dtype);
        a.precision = parse_precision(precision, mul_exp, mul_man, acc_exp, acc_man);
        if (exact) {
          a.kernel = cuda::Kernel::Exact;
        } else if (kernel == "auto") {
          a.kernel = cuda::Kernel::Auto;
        } else if (kernel == "tiled") {
          a.kernel = cuda::Kernel::Tiled;
        } else if (kernel == "warp") {
          a.kernel = cuda::Kernel::Warp;
        } else {
          throw Error("kernel must be 'auto', 'tiled' or 'warp', got '" + kernel + "'");
        }
        a.stream = ptr<void>(stream);
        py::gil_scoped_release release;
        cuda::lut_matmul(a);
      },
      py::arg("x"), py::arg("y"), py::arg("batch"), py::arg("in_features"),
      py::arg("out_features"), py::arg("x_stride"), py::arg("bits"), py::arg("codes"),
      py::arg("tables"), py::arg("column_grouping"), py::arg("csr_row_ptr"),
      py::arg("csr_col_idx"), py::arg("csr_values"), py::arg("nnz"), py::arg("dtype"),
      py::arg("precision"), py::arg("mul_exp"), py::arg("mul_man"), py::arg("acc_exp"),
      py::arg("acc_man"), py::arg("exact"), py::arg("stream"), py::arg("kernel") = "auto",
      "Launch y = x W^T (+ CSR part) on `stream`; integer device pointers (0 = none for "
      "the CSR arrays).  exact=False with precision='fp32' uses a fast kernel: kernel="
      "'auto' (the warp kernel where it applies, else the tiled one), 'tiled' or 'warp'.");
  m.def(
      "cuda_dequantize",
      [](std::uintptr_t codes, std::uintptr_t tables, std::int64_t in_features,
         std::int64_t out_features, int bits, bool column_grouping, std::uintptr_t csr_row_ptr,
         std::uintptr_t csr_col_idx, std::uintptr_t csr_values, std::int64_t nnz, std::uintptr_t w,
         const std::string& dtype, std::uintptr_t stream) {
        cuda::DequantizeArgs a;
        a.layer = device_lut_view(codes, tables, in_features, out_features, bits, column_grouping,
                                  csr_row_ptr, csr_col_idx, csr_values, nnz);
        a.w = ptr<void>(w);
        a.dtype = parse_dtype(dtype);
        a.stream = ptr<void>(stream);
        py::gil_scoped_release release;
        cuda::dequantize(a);
      },
      py::arg("codes"), py::arg("tables"), py::arg("in_features"), py::arg("out_features"),
      py::arg("bits"), py::arg("column_grouping"), py::arg("csr_row_ptr"), py::arg("csr_col_idx"),
      py::arg("csr_values"), py::arg("nnz"), py::arg("w"), py::arg("dtype"), py::arg("stream"),
      "Write W[out, in] (dtype) from codes and tables (+ CSR part) on `stream`.");
#endif
}

}  // namespace bind
}  // namespace sqllm
