// Shared helpers of the pybind11 module (conversion only; no algorithms here).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "sqllm/error.hpp"

namespace sqllm {
namespace bind {

namespace py = pybind11;

void init_kmeans(py::module_& m);
void init_quant(py::module_& m);
void init_gptq(py::module_& m);
void init_vq(py::module_& m);     // vector k-means, VPTQ, the VQ format
void init_ptq161(py::module_& m);  // the PTQ1.61 format's matmul/dequantize
void init_glut(py::module_& m);  // grouped lookup tables (glut format)
void init_cuda(py::module_& m);  // always defined; reports has_cuda() == False without nvcc
void init_vq_cuda(py::module_& m);  // the CUDA VQ kernels (registers nothing without CUDA)
void init_decode(py::module_& m);  // the C++ LLaMA decoder (llama_decode.hpp)

void init_glut_cuda(py::module_& m);  // the CUDA glut kernels (registers nothing without CUDA)

/// A C-contiguous array of T, converting (copying) only when needed.  Raises
/// TypeError naming `arg` if the input cannot be converted.
template <class T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;

/// Check the number of dimensions of `a`, naming the argument in the error.
template <class T>
void check_ndim(const carray<T>& a, int ndim, const char* arg) {
  SQLLM_CHECK(a.ndim() == ndim, arg, " must be ", ndim, "-D, got ", a.ndim(), "-D");
}

}  // namespace bind
}  // namespace sqllm
