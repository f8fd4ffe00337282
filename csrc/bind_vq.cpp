// Bindings of the vector k-means, the VPTQ quantizer and the VQ format's
// dequantize/matmul.  Conversion and shape checks only.
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "sqllm/cluster/kmeans_vec.hpp"
#include "sqllm/quant/vptq.hpp"
#include "sqllm/vq_matmul.hpp"

namespace sqllm {
namespace bind {

namespace {

template <class T>
carray<T> vec_to_numpy(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  carray<T> a(shape);
  SQLLM_CHECK(static_cast<std::size_t>(a.size()) == v.size(), "internal: shape mismatch");
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

VecKmeansInit parse_init(const std::string& s) {
  if (s == "random") return VecKmeansInit::Random;
  if (s == "kmeans++") return VecKmeansInit::KMeansPlusPlus;
  throw Error(detail::concat("init must be 'random' or 'kmeans++', got '", s, "'"));
}

VecKmeansAssign parse_assign(const std::string& s) {
  if (s == "auto") return VecKmeansAssign::Auto;
  if (s == "brute") return VecKmeansAssign::Brute;
  if (s == "pruned") return VecKmeansAssign::Pruned;
  if (s == "yinyang") return VecKmeansAssign::Yinyang;
  throw Error(detail::concat("assign must be 'auto', 'brute', 'pruned' or 'yinyang', got '", s, "'"));
}

/// The one place Python arrays become a VqView.
VqView vq_view(std::size_t out, std::size_t in, int v, std::size_t k, std::size_t k_res,
               std::size_t group_num, std::size_t group_size, const carray<std::uint32_t>& indices,
               const carray<float>& centroids, const std::optional<carray<float>>& res_centroids,
               std::size_t outlier_size, int v_out, std::size_t k_out,
               const std::optional<carray<std::uint16_t>>& outlier_indices,
               const std::optional<carray<float>>& outlier_centroids,
               const std::optional<carray<std::int32_t>>& perm,
               const std::optional<carray<float>>& scale, const std::optional<carray<float>>& bias,
               bool validate = true) {
  VqView q;
  q.out = out;
  q.in = in;
  q.v = v;
  q.k = k;
  q.k_res = k_res;
  q.num_groups = group_num;
  q.group_size = group_size;
  q.outlier_size = outlier_size;
  q.v_out = v_out;
  q.k_out = k_out;
  SQLLM_CHECK(v >= 2 && v <= 16, "vq layer: vector length must be in 2..16, got ", v);
  check_ndim(indices, 3, "indices");
  const std::size_t words = packed_words(group_size, q.index_bits());
  SQLLM_CHECK(static_cast<std::size_t>(indices.shape(0)) == group_num &&
                  static_cast<std::size_t>(indices.shape(1)) == q.rows_main() &&
                  static_cast<std::size_t>(indices.shape(2)) == words,
              "indices must have shape (group_num, ceil(out/v), words) = (", group_num, ", ",
              q.rows_main(), ", ", words, "), got (", indices.shape(0), ", ", indices.shape(1), ", ",
              indices.shape(2), ")");
  q.indices = indices.data();
  SQLLM_CHECK(static_cast<std::size_t>(centroids.size()) == group_num * k * static_cast<std::size_t>(v),
              "centroids must hold group_num*k*v = ", group_num * k * static_cast<std::size_t>(v),
              " values, got ", centroids.size());
  q.centroids = centroids.data();
  if (res_centroids) {
    SQLLM_CHECK(static_cast<std::size_t>(res_centroids->size()) == group_num * k_res * static_cast<std::size_t>(v),
                "res_centroids must hold group_num*k_res*v = ", group_num * k_res * static_cast<std::size_t>(v),
                " values, got ", res_centroids->size());
    q.res_centroids = res_centroids->data();
  }
  if (outlier_size > 0) {
    SQLLM_CHECK(outlier_indices && outlier_centroids,
                "outlier_size > 0 needs outlier_indices and outlier_centroids");
    SQLLM_CHECK(v_out >= 2 && v_out <= 16, "vq layer: outlier vector length must be in 2..16, got ", v_out);
    SQLLM_CHECK(static_cast<std::size_t>(outlier_indices->size()) == q.rows_out() * outlier_size,
                "outlier_indices must have ceil(out/v_out)*outlier_size = ", q.rows_out() * outlier_size,
                " entries, got ", outlier_indices->size());
    SQLLM_CHECK(static_cast<std::size_t>(outlier_centroids->size()) == k_out * static_cast<std::size_t>(v_out),
                "outlier_centroids must hold k_out*v_out = ", k_out * static_cast<std::size_t>(v_out),
                " values, got ", outlier_centroids->size());
    q.outlier_indices = outlier_indices->data();
    q.outlier_centroids = outlier_centroids->data();
  }
  if (perm) {
    SQLLM_CHECK(static_cast<std::size_t>(perm->size()) == in, "perm must have in_features=", in,
                " entries, got ", perm->size());
    q.perm = perm->data();
  }
  SQLLM_CHECK(scale.has_value() == bias.has_value(), "weight_scale and weight_bias go together");
  if (scale) {
    SQLLM_CHECK(static_cast<std::size_t>(scale->size()) == in && static_cast<std::size_t>(bias->size()) == in,
                "weight_scale and weight_bias must have in_features=", in, " entries");
    q.scale = scale->data();
    q.bias = bias->data();
  }
  if (validate) check_vq_view(q);
  return q;
}

#define SQLLM_VQ_ARGS                                                                            \
  py::arg("out_features"), py::arg("in_features"), py::arg("v"), py::arg("k"), py::arg("k_res"), \
      py::arg("group_num"), py::arg("group_size"), py::arg("indices"), py::arg("centroids"),      \
      py::arg("res_centroids"), py::arg("outlier_size"), py::arg("v_out"), py::arg("k_out"),      \
      py::arg("outlier_indices"), py::arg("outlier_centroids"), py::arg("perm"),                  \
      py::arg("scale"), py::arg("bias")

}  // namespace

void init_vq(py::module_& m) {
  m.def(
      "vec_kmeans",
      [](const carray<float>& points, std::optional<carray<float>> weights, std::size_t k,
         int iters, double tol, const std::string& init, std::uint64_t seed, int num_threads,
         std::optional<carray<float>> init_centroids, const std::string& assign) {
        check_ndim(points, 2, "points");
        const auto n = static_cast<std::size_t>(points.shape(0));
        const int v = static_cast<int>(points.shape(1));
        VecKmeansParams p;
        p.k = k;
        p.iters = iters;
        p.tol = tol;
        p.init = parse_init(init);
        p.seed = seed;
        p.num_threads = num_threads;
        p.assign = parse_assign(assign);
        if (weights) {
          check_ndim(*weights, 1, "weights");
          SQLLM_CHECK(static_cast<std::size_t>(weights->shape(0)) == n, "weights must have ", n,
                      " entries (one per point), got ", weights->shape(0));
        }
        if (init_centroids) {
          check_ndim(*init_centroids, 2, "init_centroids");
          SQLLM_CHECK(static_cast<std::size_t>(init_centroids->shape(0)) == k &&
                          init_centroids->shape(1) == points.shape(1),
                      "init_centroids must have shape (k, v) = (", k, ", ", v, "), got (",
                      init_centroids->shape(0), ", ", init_centroids->shape(1), ")");
          p.init_centroids = init_centroids->data();
        }
        VecKmeansResult r;
        {
          py::gil_scoped_release nogil;
          r = vec_kmeans(points.data(), n, v, weights ? weights->data() : nullptr, p);
        }
        py::dict d;
        d["centroids"] = vec_to_numpy(r.centroids, {static_cast<py::ssize_t>(k), v});
        d["assign"] = vec_to_numpy(r.assign, {static_cast<py::ssize_t>(n)});
        d["objective"] = r.objective;
        d["iterations"] = r.iterations;
        d["repaired"] = r.repaired;
        d["assign_seconds"] = r.assign_seconds;
        d["seconds"] = r.seconds;
        return d;
      },
      py::arg("points"), py::arg("weights") = py::none(), py::arg("k") = 256, py::arg("iters") = 100,
      py::arg("tol") = 1e-5, py::arg("init") = "random", py::arg("seed") = 0,
      py::arg("num_threads") = 0, py::arg("init_centroids") = py::none(),
      py::arg("assign") = "auto",
      "Weighted k-means of (n, v) float32 points (v = 2..16).  Returns a dict: centroids (k, v),\n"
      "assign (n,) int32, objective (list: after the initial assignment, then each iteration),\n"
      "iterations, repaired (empty clusters refilled), assign_seconds (wall time of each\n"
      "assignment step), seconds (the whole run).  assign: 'auto', 'brute', 'pruned' or\n"
      "'yinyang' (the nearest-centroid search; the same result bit for bit, pruned skips\n"
      "centroids by the triangle inequality, yinyang by group bounds carried across\n"
      "iterations; auto = pruned for k >= 1024 and v <= 6).");

  m.def(
      "vec_nearest_yinyang",
      [](const carray<float>& points, const carray<float>& centroid_seq, int num_threads) {
        check_ndim(points, 2, "points");
        check_ndim(centroid_seq, 3, "centroid_seq");
        const int v = static_cast<int>(points.shape(1));
        SQLLM_CHECK(v >= kVecMinDim && v <= kVecMaxDim, "vector length must be in 2..16, got ", v);
        SQLLM_CHECK(centroid_seq.shape(2) == points.shape(1), "points and centroids must have the ",
                    "same vector length, got ", points.shape(1), " and ", centroid_seq.shape(2));
        const auto n = static_cast<std::size_t>(points.shape(0));
        const auto m = static_cast<std::size_t>(centroid_seq.shape(0));
        const auto k = static_cast<std::size_t>(centroid_seq.shape(1));
        const std::size_t kv = k * static_cast<std::size_t>(v);
        SQLLM_CHECK(m >= 1 && k >= 1 && n >= 1, "vec_nearest_yinyang needs points, k >= 1 and one "
                    "centroid set at least");
        for (std::size_t i = 0; i < n * static_cast<std::size_t>(v); ++i)
          SQLLM_CHECK(std::isfinite(points.data()[i]) && std::fabs(points.data()[i]) < kVecMaxAbs,
                      "points must be finite and below 1e12 in magnitude");
        for (std::size_t i = 0; i < m * kv; ++i)
          SQLLM_CHECK(std::isfinite(centroid_seq.data()[i]) &&
                          std::fabs(centroid_seq.data()[i]) < kVecMaxAbs,
                      "centroids must be finite and below 1e12 in magnitude");
        carray<std::int32_t> idx({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(n)});
        detail::YinyangState s;
        {
          py::gil_scoped_release nogil;
          std::vector<float> drift(k);
          const int nt = detail::vec_threads(num_threads);
          std::int32_t* out = idx.mutable_data();
          for (std::size_t step = 0; step < m; ++step) {
            const float* C = centroid_seq.data() + step * kv;
            if (step > 0) detail::vec_centroid_drift(C, C - kv, k, v, drift.data());
            detail::vec_assign_yinyang(points.data(), n, v, C, k, s, step > 0 ? drift.data() : nullptr,
                                       step > 0 ? out + (step - 1) * n : nullptr, out + step * n, nt);
          }
        }
        return py::make_tuple(idx, vec_to_numpy(s.lower, {static_cast<py::ssize_t>(n),
                                                          static_cast<py::ssize_t>(s.G)}),
                              vec_to_numpy(s.group_of, {static_cast<py::ssize_t>(k)}));
      },
      py::arg("points"), py::arg("centroid_seq"), py::arg("num_threads") = 0,
      "The Yinyang search of vec_kmeans (exposed for tests): centroid_seq (m, k, v) float32 are\n"
      "the centroids of m successive assignment steps (the first evaluates every centroid,\n"
      "each later one starts from the previous assignment and the bounds decayed by how far\n"
      "the centroids moved).  Returns (idx (m, n) int32 -- vec_nearest's result for each\n"
      "set --, lower (n, G) float32: the last step's bound of each point's distance to\n"
      "every centroid of group g but its own, group_of (k,) int32).");

  m.def(
      "vec_nearest",
      [](const carray<float>& points, const carray<float>& centroids, int num_threads) {
        check_ndim(points, 2, "points");
        check_ndim(centroids, 2, "centroids");
        SQLLM_CHECK(points.shape(1) == centroids.shape(1), "points and centroids must have the same ",
                    "vector length, got ", points.shape(1), " and ", centroids.shape(1));
        const auto n = static_cast<std::size_t>(points.shape(0));
        carray<std::int32_t> idx(static_cast<py::ssize_t>(n));
        carray<float> dist(static_cast<py::ssize_t>(n));
        {
          py::gil_scoped_release nogil;
          vec_nearest(points.data(), n, static_cast<int>(points.shape(1)), centroids.data(),
                      static_cast<std::size_t>(centroids.shape(0)), idx.mutable_data(),
                      dist.mutable_data(), num_threads);
        }
        return py::make_tuple(idx, dist);
      },
      py::arg("points"), py::arg("centroids"), py::arg("num_threads") = 0,
      "Nearest centroid (squared L2, ties to the lower index): (idx int32 (n,), dist float32 (n,)).");

  m.def(
      "vec_nearest_guided",
      [](const carray<float>& points, const carray<float>& centroids, const carray<std::int32_t>& guess,
         std::optional<carray<double>> lower, std::optional<carray<float>> drift, int num_threads) {
        check_ndim(points, 2, "points");
        check_ndim(centroids, 2, "centroids");
        check_ndim(guess, 1, "guess");
        const int v = static_cast<int>(points.shape(1));
        SQLLM_CHECK(v >= kVecMinDim && v <= kVecMaxDim, "vector length must be in 2..16, got ", v);
        SQLLM_CHECK(points.shape(1) == centroids.shape(1), "points and centroids must have the same ",
                    "vector length, got ", points.shape(1), " and ", centroids.shape(1));
        const auto n = static_cast<std::size_t>(points.shape(0));
        const auto k = static_cast<std::size_t>(centroids.shape(0));
        SQLLM_CHECK(k >= 1, "nearest centroid: k must be >= 1");
        SQLLM_CHECK(static_cast<std::size_t>(guess.shape(0)) == n, "guess must have ", n,
                    " entries (one per point), got ", guess.shape(0));
        for (std::size_t i = 0; i < n; ++i)
          SQLLM_CHECK(guess.data()[i] >= 0 && static_cast<std::size_t>(guess.data()[i]) < k,
                      "guess[", i, "] = ", guess.data()[i], " is not a centroid index (k = ", k, ")");
        for (std::size_t i = 0; i < n * static_cast<std::size_t>(v); ++i)
          SQLLM_CHECK(std::isfinite(points.data()[i]) && std::fabs(points.data()[i]) < kVecMaxAbs,
                      "points must be finite and below 1e12 in magnitude");
        for (std::size_t i = 0; i < k * static_cast<std::size_t>(v); ++i)
          SQLLM_CHECK(std::isfinite(centroids.data()[i]) && std::fabs(centroids.data()[i]) < kVecMaxAbs,
                      "centroids must be finite and below 1e12 in magnitude");
        SQLLM_CHECK(!drift || lower, "drift needs lower (the bounds it corrects)");
        carray<double> low(static_cast<py::ssize_t>(n));
        if (lower) {
          check_ndim(*lower, 1, "lower");
          SQLLM_CHECK(static_cast<std::size_t>(lower->shape(0)) == n, "lower must have ", n, " entries");
          std::copy(lower->data(), lower->data() + n, low.mutable_data());
        }
        if (drift) {
          check_ndim(*drift, 1, "drift");
          SQLLM_CHECK(static_cast<std::size_t>(drift->shape(0)) == k, "drift must have ", k, " entries");
          for (std::size_t j = 0; j < k; ++j)
            SQLLM_CHECK(std::isfinite(drift->data()[j]) && drift->data()[j] >= 0.0f,
                        "drift must be finite and >= 0");
        }
        carray<std::int32_t> idx(static_cast<py::ssize_t>(n));
        carray<float> dist(static_cast<py::ssize_t>(n));
        {
          py::gil_scoped_release nogil;
          detail::GuidedCentroids g;
          detail::vec_prepare_guided(centroids.data(), k, v, g);
          detail::vec_assign_guided(points.data(), n, v, g, guess.data(), idx.mutable_data(),
                                    dist.mutable_data(), detail::vec_threads(num_threads),
                                    low.mutable_data(), drift ? drift->data() : nullptr);
        }
        return py::make_tuple(idx, dist, low);
      },
      py::arg("points"), py::arg("centroids"), py::arg("guess"), py::arg("lower") = py::none(),
      py::arg("drift") = py::none(), py::arg("num_threads") = 0,
      "The pruned nearest-centroid search of vec_kmeans (exposed for tests): the same\n"
      "(idx, dist) as vec_nearest, searched around guess (n,) int32, plus lower (n,) float64:\n"
      "a lower bound of each point's distance to every centroid but its nearest.  With\n"
      "lower (from a previous call) and drift (k,) float32 (how far each centroid has\n"
      "moved since, upper bounds) points provably still nearest to their guess skip the search.");

  m.def(
      "vptq_quantize",
      [](const carray<float>& weight, const carray<double>& hessian, int v, std::size_t k,
         std::size_t k_res, std::size_t outlier_cols, int v_out, std::size_t k_out, int group_num,
         bool enable_perm, bool enable_norm, bool hessian_weights, int blocksize, double percdamp,
         int kiter, double ktol, const std::string& init, std::uint64_t seed, int num_threads) {
        check_ndim(weight, 2, "weight");
        check_ndim(hessian, 2, "hessian");
        const auto out = static_cast<std::size_t>(weight.shape(0));
        const auto in = static_cast<std::size_t>(weight.shape(1));
        SQLLM_CHECK(static_cast<std::size_t>(hessian.shape(0)) == in &&
                        static_cast<std::size_t>(hessian.shape(1)) == in,
                    "hessian must have shape (in_features, in_features) = (", in, ", ", in, "), got (",
                    hessian.shape(0), ", ", hessian.shape(1), ")");
        VptqParams p;
        p.v = v;
        p.k = k;
        p.k_res = k_res;
        p.outlier_cols = outlier_cols;
        p.v_out = v_out;
        p.k_out = k_out;
        p.group_num = group_num;
        p.enable_perm = enable_perm;
        p.enable_norm = enable_norm;
        p.hessian_weights = hessian_weights;
        p.blocksize = blocksize;
        p.percdamp = percdamp;
        p.kiter = kiter;
        p.ktol = ktol;
        p.init = parse_init(init);
        p.seed = seed;
        p.num_threads = num_threads;
        VptqResult r;
        {
          py::gil_scoped_release nogil;
          r = vptq_quantize(weight.data(), hessian.data(), out, in, p);
        }
        const auto G = static_cast<py::ssize_t>(group_num);
        const auto rm = static_cast<py::ssize_t>(r.rows_main), gs = static_cast<py::ssize_t>(r.group_size);
        py::dict d;
        d["group_size"] = r.group_size;
        d["perm"] = vec_to_numpy(r.perm, {static_cast<py::ssize_t>(in)});
        d["scale"] = enable_norm ? py::object(vec_to_numpy(r.scale, {static_cast<py::ssize_t>(in)})) : py::none();
        d["bias"] = enable_norm ? py::object(vec_to_numpy(r.bias, {static_cast<py::ssize_t>(in)})) : py::none();
        d["centroids"] = vec_to_numpy(r.centroids, {G, static_cast<py::ssize_t>(k) * v});
        d["res_centroids"] = k_res > 0 ? py::object(vec_to_numpy(r.res_centroids, {G, static_cast<py::ssize_t>(k_res) * v}))
                                       : py::none();
        d["main_idx"] = vec_to_numpy(r.main_idx, {G, rm, gs});
        d["res_idx"] = k_res > 0 ? py::object(vec_to_numpy(r.res_idx, {G, rm, gs})) : py::none();
        d["outlier_centroids"] =
            outlier_cols > 0 ? py::object(vec_to_numpy(r.outlier_centroids, {1, static_cast<py::ssize_t>(k_out) * v_out}))
                             : py::none();
        d["outlier_idx"] = outlier_cols > 0 ? py::object(vec_to_numpy(
                                                  r.outlier_idx, {static_cast<py::ssize_t>(r.rows_out),
                                                                  static_cast<py::ssize_t>(outlier_cols)}))
                                            : py::none();
        d["proxy_weight"] = r.proxy_weight;
        d["proxy_nearest"] = r.proxy_nearest;
        d["proxy_gptq"] = r.proxy_gptq;
        d["proxy_residual"] = r.proxy_residual < 0 ? py::object(py::none()) : py::object(py::float_(r.proxy_residual));
        d["kmeans_objective"] = r.kmeans_objective;
        return d;
      },
      py::arg("weight"), py::arg("hessian"), py::arg("v") = 8, py::arg("k") = 4096,
      py::arg("k_res") = 0, py::arg("outlier_cols") = 0, py::arg("v_out") = 0, py::arg("k_out") = 0,
      py::arg("group_num") = 1, py::arg("enable_perm") = true, py::arg("enable_norm") = false,
      py::arg("hessian_weights") = true, py::arg("blocksize") = 128, py::arg("percdamp") = 0.01,
      py::arg("kiter") = 100, py::arg("ktol") = 1e-5, py::arg("init") = "random",
      py::arg("seed") = 0, py::arg("num_threads") = 0,
      "VPTQ on one weight (float32 [out, in]) with its Hessian (float64 [in, in]); returns a dict\n"
      "of codebooks, unpacked indices, perm, norm and the proxy errors (include/sqllm/quant/vptq.hpp).");

  m.def(
      "vq_dequantize",
      [](std::size_t out, std::size_t in, int v, std::size_t k, std::size_t k_res, std::size_t group_num,
         std::size_t group_size, const carray<std::uint32_t>& indices, const carray<float>& centroids,
         const std::optional<carray<float>>& res_centroids, std::size_t outlier_size, int v_out,
         std::size_t k_out, const std::optional<carray<std::uint16_t>>& outlier_indices,
         const std::optional<carray<float>>& outlier_centroids,
         const std::optional<carray<std::int32_t>>& perm, const std::optional<carray<float>>& scale,
         const std::optional<carray<float>>& bias) {
        const VqView q = vq_view(out, in, v, k, k_res, group_num, group_size, indices, centroids,
                                 res_centroids, outlier_size, v_out, k_out, outlier_indices,
                                 outlier_centroids, perm, scale, bias);
        carray<float> w({out, in});
        {
          py::gil_scoped_release nogil;
          vq_dequantize(q, w.mutable_data());
        }
        return w;
      },
      SQLLM_VQ_ARGS, "The (out, in) float32 weight of a VQ layer (validates every buffer).");

  m.def(
      "vq_matmul",
      [](const carray<float>& x, std::size_t out, std::size_t in, int v, std::size_t k,
         std::size_t k_res, std::size_t group_num, std::size_t group_size,
         const carray<std::uint32_t>& indices, const carray<float>& centroids,
         const std::optional<carray<float>>& res_centroids, std::size_t outlier_size, int v_out,
         std::size_t k_out, const std::optional<carray<std::uint16_t>>& outlier_indices,
         const std::optional<carray<float>>& outlier_centroids,
         const std::optional<carray<std::int32_t>>& perm, const std::optional<carray<float>>& scale,
         const std::optional<carray<float>>& bias, int num_threads, bool validate, bool gemm) {
        check_ndim(x, 2, "x");
        SQLLM_CHECK(static_cast<std::size_t>(x.shape(1)) == in, "x must have in_features=", in,
                    " columns, got ", x.shape(1));
        const VqView q = vq_view(out, in, v, k, k_res, group_num, group_size, indices, centroids,
                                 res_centroids, outlier_size, v_out, k_out, outlier_indices,
                                 outlier_centroids, perm, scale, bias, validate);
        const auto N = static_cast<std::size_t>(x.shape(0));
        carray<float> y({N, out});
        {
          py::gil_scoped_release nogil;
          if (gemm) {
            vq_matmul_gemm(q, x.data(), N, y.mutable_data(), num_threads);
          } else {
            vq_matmul(q, x.data(), N, y.mutable_data(), num_threads);
          }
        }
        return y;
      },
      py::arg("x"), py::arg("out_features"), py::arg("in_features"), py::arg("v"), py::arg("k"),
      py::arg("k_res"), py::arg("group_num"), py::arg("group_size"), py::arg("indices"),
      py::arg("centroids"), py::arg("res_centroids"), py::arg("outlier_size"), py::arg("v_out"),
      py::arg("k_out"), py::arg("outlier_indices"), py::arg("outlier_centroids"), py::arg("perm"),
      py::arg("scale"), py::arg("bias"), py::arg("num_threads") = 0, py::arg("validate") = true,
      py::arg("gemm") = false,
      "y = x W^T for a VQ layer: gemm=False gathers codebook vectors (small batches), gemm=True\n"
      "decodes tiles of W and multiplies them by Eigen's GEMM (large batches); W is never\n"
      "materialised whole.");
}

}  // namespace bind
}  // namespace sqllm
