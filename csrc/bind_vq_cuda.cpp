// Bindings of the CUDA VQ kernels (cuda/sqllm_cuda_vq.h).  Conversion only:
// integer device pointers (tensor.data_ptr(), 0 = none) and the stream as an
// integer; the GIL is released during the launch.  Without SQLLM_WITH_CUDA
// nothing is registered (python/sqllm/kernels_cuda_vq.py checks
// _C.cuda_compiled() first).
#include <cstdint>
#include <string>

#include "bindings.hpp"

#ifdef SQLLM_WITH_CUDA
#include "sqllm_cuda_vq.h"
#endif

namespace sqllm {
namespace bind {

#ifdef SQLLM_WITH_CUDA
namespace {

cuda::DType vq_parse_dtype(const std::string& name) {
  if (name == "float16") return cuda::DType::F16;
  if (name == "bfloat16") return cuda::DType::BF16;
  if (name == "float32") return cuda::DType::F32;
  throw Error("dtype must be 'float16', 'bfloat16' or 'float32', got '" + name + "'");
}

template <class T>
T* vq_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cuda::VqWeights weights(std::int64_t in, std::int64_t out, int v, int k, int k_res, int group_num,
                        std::int64_t group_size, std::uintptr_t indices, std::uintptr_t centroids,
                        std::uintptr_t res_centroids, std::int64_t outlier_size, int v_out, int k_out,
                        std::uintptr_t outlier_indices, std::uintptr_t outlier_centroids,
                        std::uintptr_t perm, std::uintptr_t weight_scale, std::uintptr_t weight_bias) {
  cuda::VqWeights w;
  w.in = in;
  w.out = out;
  w.v = v;
  w.k = k;
  w.k_res = k_res;
  w.group_num = group_num;
  w.group_size = group_size;
  w.indices = vq_ptr<const std::uint32_t>(indices);
  w.centroids = vq_ptr<const float>(centroids);
  w.res_centroids = vq_ptr<const float>(res_centroids);
  w.outlier_size = outlier_size;
  w.v_out = v_out;
  w.k_out = k_out;
  w.outlier_indices = vq_ptr<const std::uint16_t>(outlier_indices);
  w.outlier_centroids = vq_ptr<const float>(outlier_centroids);
  w.perm = vq_ptr<const std::int32_t>(perm);
  w.weight_scale = vq_ptr<const float>(weight_scale);
  w.weight_bias = vq_ptr<const float>(weight_bias);
  return w;
}

}  // namespace
#endif

void init_vq_cuda(py::module_& m) {
#ifdef SQLLM_WITH_CUDA
  m.def(
      "cuda_vq_matmul",
      [](std::uintptr_t x, std::uintptr_t y, std::int64_t batch, std::int64_t x_stride,
         std::uintptr_t bias, const std::string& dtype, std::int64_t in, std::int64_t out, int v,
         int k, int k_res, int group_num, std::int64_t group_size, std::uintptr_t indices,
         std::uintptr_t centroids, std::uintptr_t res_centroids, std::int64_t outlier_size,
         int v_out, int k_out, std::uintptr_t outlier_indices, std::uintptr_t outlier_centroids,
         std::uintptr_t perm, std::uintptr_t weight_scale, std::uintptr_t weight_bias,
         std::uintptr_t stream) {
        cuda::VqMatmulArgs a;
        a.w = weights(in, out, v, k, k_res, group_num, group_size, indices, centroids, res_centroids,
                      outlier_size, v_out, k_out, outlier_indices, outlier_centroids, perm,
                      weight_scale, weight_bias);
        a.x = vq_ptr<const void>(x);
        a.y = vq_ptr<void>(y);
        a.bias = vq_ptr<const float>(bias);
        a.batch = batch;
        a.x_stride = x_stride;
        a.dtype = vq_parse_dtype(dtype);
        a.stream = vq_ptr<void>(stream);
        py::gil_scoped_release release;
        cuda::vq_matmul(a);
      },
      py::arg("x"), py::arg("y"), py::arg("batch"), py::arg("x_stride"), py::arg("bias"),
      py::arg("dtype"), py::arg("in_features"), py::arg("out_features"), py::arg("v"), py::arg("k"),
      py::arg("k_res"), py::arg("group_num"), py::arg("group_size"), py::arg("indices"),
      py::arg("centroids"), py::arg("res_centroids"), py::arg("outlier_size"), py::arg("v_out"),
      py::arg("k_out"), py::arg("outlier_indices"), py::arg("outlier_centroids"), py::arg("perm"),
      py::arg("weight_scale"), py::arg("weight_bias"), py::arg("stream"),
      "Launch the fused VQ GEMV y = x W^T (+ bias) on `stream` (cuda/sqllm_cuda_vq.h).");
  m.def(
      "cuda_vq_dequantize",
      [](std::uintptr_t w_out, const std::string& dtype, std::int64_t in, std::int64_t out, int v,
         int k, int k_res, int group_num, std::int64_t group_size, std::uintptr_t indices,
         std::uintptr_t centroids, std::uintptr_t res_centroids, std::int64_t outlier_size,
         int v_out, int k_out, std::uintptr_t outlier_indices, std::uintptr_t outlier_centroids,
         std::uintptr_t perm, std::uintptr_t weight_scale, std::uintptr_t weight_bias,
         std::uintptr_t stream) {
        cuda::VqDequantizeArgs a;
        a.w = weights(in, out, v, k, k_res, group_num, group_size, indices, centroids, res_centroids,
                      outlier_size, v_out, k_out, outlier_indices, outlier_centroids, perm,
                      weight_scale, weight_bias);
        a.out_w = vq_ptr<void>(w_out);
        a.dtype = vq_parse_dtype(dtype);
        a.stream = vq_ptr<void>(stream);
        py::gil_scoped_release release;
        cuda::vq_dequantize(a);
      },
      py::arg("w"), py::arg("dtype"), py::arg("in_features"), py::arg("out_features"), py::arg("v"),
      py::arg("k"), py::arg("k_res"), py::arg("group_num"), py::arg("group_size"),
      py::arg("indices"), py::arg("centroids"), py::arg("res_centroids"), py::arg("outlier_size"),
      py::arg("v_out"), py::arg("k_out"), py::arg("outlier_indices"),
      py::arg("outlier_centroids"), py::arg("perm"), py::arg("weight_scale"),
      py::arg("weight_bias"), py::arg("stream"),
      "Write the dense W[out, in] (dtype) of a VQ weight on `stream`.");
  m.attr("cuda_vq_gemv_max_batch") = cuda::kVqGemvMaxBatch;
#else
  (void)m;
#endif
}

}  // namespace bind
}  // namespace sqllm
