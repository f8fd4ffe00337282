// sqllm._C -- the pybind11 module.  Each area registers its functions from its
// own bind_*.cpp; this file only creates the module and maps sqllm::Error.
#include <pybind11/pybind11.h>

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
  sqllm::bind::init_cuda(m);
}
