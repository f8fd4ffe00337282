// sqllm._C -- the pybind11 module.  Each area registers its functions from its
// own bind_*.cpp; this file only creates the module and maps sqllm::Error.
#include <pybind11/pybind11.h>

// <iostream> for its side effect: with GCC >= 13 it makes the link pull in
// libstdc++'s stream initialisation.  A toolchain that links libstdc++
// statically into this module (seen: the custom g++ 13.3 of a CUDA image)
// otherwise leaves std::locale uninitialised, and the first std::ostream
// insert -- building any sqllm::Error message -- crashes the process.
#include <iostream>

#include "bindings.hpp"
#include "sqllm/error.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "sqllm native core: quantizers, packing and LUT kernels";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const sqllm::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  sqllm::bind::init_kmeans(m);
  sqllm::bind::init_quant(m);
  sqllm::bind::init_gptq(m);
  sqllm::bind::init_vq(m);
  sqllm::bind::init_ptq161(m);
  sqllm::bind::init_glut(m);
  sqllm::bind::init_cuda(m);
  sqllm::bind::init_vq_cuda(m);
  sqllm::bind::init_decode(m);
  sqllm::bind::init_glut_cuda(m);
}
