// sqllm._C: weighted 1-D k-means (sqllm/kmeans1d.hpp).  Conversion and shape
// checks only; the GIL is released while the library computes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "bindings.hpp"
#include "sqllm/kmeans1d.hpp"

namespace sqllm {
namespace bind {

namespace {

KMeans1DParams make_params(int k, const std::string& method, int max_iter) {
  KMeans1DParams p;
  p.k = k;
  p.method = parse_kmeans_method(method);
  p.max_iter = max_iter;
  check_kmeans_params(p);  // before allocating k centroids
  return p;
}

py::tuple kmeans1d(const carray<float>& values, const std::optional<carray<float>>& weights,
                   int k, const std::string& method, int max_iter) {
  check_ndim(values, 1, "values");
  const py::ssize_t n = values.shape(0);
  SQLLM_CHECK(n > 0, "values is empty");
  const float* w = nullptr;
  if (weights) {
    check_ndim(*weights, 1, "weights");
    SQLLM_CHECK(weights->shape(0) == n, "weights must have the shape of values: values has shape (",
                n, ",), weights (", weights->shape(0), ",)");
    w = weights->data();
  }
  const KMeans1DParams p = make_params(k, method, max_iter);
  py::array_t<float> centroids(k);
  py::array_t<std::int32_t> labels(n);
  float* c = centroids.mutable_data();
  std::int32_t* l = labels.mutable_data();
  const float* x = values.data();
  double sse = 0;
  {
    py::gil_scoped_release nogil;
    thread_local KMeans1D<float> solver;  // scratch reused across calls on this thread
    sse = solver.fit(x, w, static_cast<std::size_t>(n), p, c, l);
  }
  return py::make_tuple(centroids, labels, sse);
}

template <class Label>
py::array rows_impl(const float* x, const float* w, std::size_t rows, std::size_t n,
                    const KMeans1DParams& p, float* c, double* sse, int num_threads) {
  py::array_t<Label> labels({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(n)});
  Label* l = labels.mutable_data();
  {
    py::gil_scoped_release nogil;
    kmeans1d_rows(x, w, rows, n, p, c, l, sse, num_threads);
  }
  return labels;
}

py::tuple kmeans1d_rows_py(const carray<float>& values, const std::optional<carray<float>>& weights,
                           int k, const std::string& method, int max_iter, int num_threads) {
  check_ndim(values, 2, "values");
  const py::ssize_t rows = values.shape(0), n = values.shape(1);
  SQLLM_CHECK(n > 0, "values has no columns (shape (", rows, ", 0))");
  const float* w = nullptr;
  if (weights) {
    check_ndim(*weights, 2, "weights");
    SQLLM_CHECK(weights->shape(0) == rows && weights->shape(1) == n,
                "weights must have the shape of values: values has shape (", rows, ", ", n,
                "), weights (", weights->shape(0), ", ", weights->shape(1), ")");
    w = weights->data();
  }
  const KMeans1DParams p = make_params(k, method, max_iter);
  py::array_t<float> centroids({rows, static_cast<py::ssize_t>(k)});
  py::array_t<double> sse(rows);
  const auto r = static_cast<std::size_t>(rows);
  const auto cols = static_cast<std::size_t>(n);
  py::array labels =
      k <= 256 ? rows_impl<std::uint8_t>(values.data(), w, r, cols, p, centroids.mutable_data(),
                                         sse.mutable_data(), num_threads)
               : rows_impl<std::int32_t>(values.data(), w, r, cols, p, centroids.mutable_data(),
                                         sse.mutable_data(), num_threads);
  return py::make_tuple(centroids, labels, sse);
}

}  // namespace

void init_kmeans(py::module_& m) {
  m.def("kmeans1d", &kmeans1d, py::arg("values"), py::arg("weights"), py::arg("k"),
        py::arg("method") = "exact", py::arg("max_iter") = 50,
        R"doc(Weighted 1-D k-means of one vector (SqueezeLLM lookup table).

Parameters
----------
values : numpy.ndarray
    1-D values, converted to float32.
weights : numpy.ndarray or None
    1-D non-negative weights of the same shape (None or all zero: equal weights).
k : int
    Number of centroids, 1..65536.
method : str
    "exact" (globally optimal, dynamic programming) or "lloyd" (fast).
max_iter : int
    Lloyd iteration cap (ignored by "exact").

Returns
-------
centroids : numpy.ndarray
    float32[k], ascending; with fewer distinct values than k the largest repeats.
labels : numpy.ndarray
    int32[n], index of the nearest centroid (ties to the lower index).
sse : float
    Weighted sum of squared errors with the weights used.

Raises
------
ValueError
    Bad shapes, k or method, NaN/Inf values or weights, negative weights.)doc");

  m.def("kmeans1d_rows", &kmeans1d_rows_py, py::arg("values"), py::arg("weights"), py::arg("k"),
        py::arg("method") = "exact", py::arg("max_iter") = 50, py::arg("num_threads") = 0,
        R"doc(Weighted 1-D k-means of every row of a matrix, in parallel over rows.

Parameters
----------
values : numpy.ndarray
    2-D (rows, n), converted to float32.
weights : numpy.ndarray or None
    Non-negative weights of the same shape, or None (equal weights).
k : int
    Number of centroids per row, 1..65536.
method : str
    "exact" or "lloyd".
max_iter : int
    Lloyd iteration cap.
num_threads : int
    OpenMP threads; <= 0 uses the OpenMP default.

Returns
-------
centroids : numpy.ndarray
    float32[rows, k], each row ascending.
labels : numpy.ndarray
    uint8[rows, n] when k <= 256, else int32[rows, n].
sse : numpy.ndarray
    float64[rows], the weighted SSE of each row.

Raises
------
ValueError
    As kmeans1d; messages name the row and column of a bad value.)doc");
}

}  // namespace bind
}  // namespace sqllm
