// Bindings of the CUDA glut kernels (cuda/sqllm_cuda_glut.h).  Conversion only:
// integer device pointers (tensor.data_ptr()) become a GlutView, the stream an
// integer; the GIL is released during the launch.  Without SQLLM_WITH_CUDA
// nothing is registered (python/sqllm/kernels_cuda_glut.py checks
// _C.cuda_compiled() first).
#include <cstdint>
#include <string>

#include "bindings.hpp"

#ifdef SQLLM_WITH_CUDA
#include "sqllm_cuda_glut.h"
#endif

namespace sqllm {
namespace bind {

#ifdef SQLLM_WITH_CUDA
namespace {

cuda::DType glut_parse_dtype(const std::string& name) {
  if (name == "float16") return cuda::DType::F16;
  if (name == "bfloat16") return cuda::DType::BF16;
  if (name == "float32") return cuda::DType::F32;
  throw Error("dtype must be 'float16', 'bfloat16' or 'float32', got '" + name + "'");
}

template <class T>
T* glut_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

GlutView device_view(std::uintptr_t qweight, std::uintptr_t tables, std::uintptr_t scales,
                     std::uintptr_t offsets, std::int64_t out, std::int64_t in, int bits, int group_size) {
  SQLLM_CHECK(out > 0 && in > 0, "glut: the layer must be non-empty, got (", out, ", ", in, ")");
  GlutView v;
  v.qweight = glut_ptr<const std::uint32_t>(qweight);
  v.tables = glut_ptr<const std::uint8_t>(tables);
  v.scales = glut_ptr<const std::uint16_t>(scales);
  v.offsets = glut_ptr<const std::uint16_t>(offsets);
  v.out = static_cast<std::size_t>(out);
  v.in = static_cast<std::size_t>(in);
  v.bits = bits;
  v.group_size = group_size;
  return v;
}

}  // namespace
#endif

void init_glut_cuda(py::module_& m) {
#ifdef SQLLM_WITH_CUDA
  m.def(
      "cuda_glut_matmul",
      [](std::uintptr_t x, std::uintptr_t y, std::int64_t batch, std::int64_t x_stride,
         const std::string& dtype, std::uintptr_t qweight, std::uintptr_t tables, std::uintptr_t scales,
         std::uintptr_t offsets, std::int64_t out_features, std::int64_t in_features, int bits,
         int group_size, std::uintptr_t stream) {
        cuda::GlutMatmulArgs a;
        a.layer = device_view(qweight, tables, scales, offsets, out_features, in_features, bits, group_size);
        a.x = glut_ptr<const void>(x);
        a.y = glut_ptr<void>(y);
        a.batch = batch;
        a.x_stride = x_stride;
        a.dtype = glut_parse_dtype(dtype);
        a.stream = glut_ptr<void>(stream);
        py::gil_scoped_release release;
        cuda::glut_matmul(a);
      },
      py::arg("x"), py::arg("y"), py::arg("batch"), py::arg("x_stride"), py::arg("dtype"),
      py::arg("qweight"), py::arg("tables"), py::arg("scales"), py::arg("offsets"),
      py::arg("out_features"), py::arg("in_features"), py::arg("bits"), py::arg("group_size"),
      py::arg("stream"),
      "Launch the fused glut GEMV y = x W^T on `stream` (cuda/sqllm_cuda_glut.h).");
  m.def(
      "cuda_glut_dequantize",
      [](std::uintptr_t w, const std::string& dtype, std::uintptr_t qweight, std::uintptr_t tables,
         std::uintptr_t scales, std::uintptr_t offsets, std::int64_t out_features,
         std::int64_t in_features, int bits, int group_size, std::uintptr_t stream) {
        cuda::GlutDequantizeArgs a;
        a.layer = device_view(qweight, tables, scales, offsets, out_features, in_features, bits, group_size);
        a.w = glut_ptr<void>(w);
        a.dtype = glut_parse_dtype(dtype);
        a.stream = glut_ptr<void>(stream);
        py::gil_scoped_release release;
        cuda::glut_dequantize(a);
      },
      py::arg("w"), py::arg("dtype"), py::arg("qweight"), py::arg("tables"), py::arg("scales"),
      py::arg("offsets"), py::arg("out_features"), py::arg("in_features"), py::arg("bits"),
      py::arg("group_size"), py::arg("stream"),
      "Write the dense W[out, in] (dtype) of a glut layer on `stream`.");
  m.attr("cuda_glut_gemv_max_batch") = cuda::kGlutGemvMaxBatch;
#else
  (void)m;
#endif
}

}  // namespace bind
}  // namespace sqllm
