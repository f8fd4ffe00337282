"""Vector k-means vs faiss-cpu's k-means, and the VQ CPU kernel vs torch.

    python tests/bench/bench_vq.py [--threads 2] [--quick] [--only kmeans]
        [--search brute pruned yinyang] [--cases 8:4096:131072 4:1024:131072]

Part 1 clusters the same weighted data with both (same k, v, iterations, no
subsampling, same thread count; random initialisation from the data in both)
and prints the time ratios (of the min and of the median over --repeats runs;
sqllm with each of its searches: brute force, pruned, Yinyang) and the ratio of the final weighted objectives
(sqllm / faiss; <= 1.0 means sqllm's clustering is at least as good).  Part 2
times y = x W^T for one VQ layer: the gather kernel, torch dequantize +
F.linear, and fp32 F.linear on the dense weight, at batch 1 and 8.  Ratios
only: on a shared machine absolute times are noisy (medians of repeats).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.extend(p for p in os.environ.get("SQLLM_BENCH_EXTRA_PATH", "").split(":") if p)

from sqllm import _C  # noqa: E402
from sqllm.nn_vq import VQQuantLinear  # noqa: E402


#: "median" (default) or "min" over the repeats (--stat; min suits an overloaded machine,
#: where a median includes time slices lost to other processes).
STAT = "median"


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) if STAT == "min" else statistics.median(ts)


def objective(X, w, C):
    idx, _ = _C.vec_nearest(X, C.astype(np.float32))
    d = ((X.astype(np.float64) - C.astype(np.float64)[idx]) ** 2).sum(1)
    return float((w * d).sum())


def bench_kmeans(threads, quick, repeats=3, cases=None, searches=("brute", "pruned", "yinyang"),
                 same_init=False):
    """sqllm (each search in `searches`) vs faiss: the same data, k, v, 10
    iterations, threads; each timed `repeats` times, ratios of min and median.
    The last column splits sqllm's median run: its first assignment step, the
    later ones together, and the rest (updates, objectives, initialisation).
    same_init: both start from the same k random data points (otherwise each
    draws its own), so the objective ratio compares the iterations alone."""
    try:
        import faiss
    except ImportError:
        print("faiss-cpu is not installed (pip install faiss-cpu): skipping the k-means comparison")
        return
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(0)
    if cases is None:
        cases = [(8, 256, 65536), (8, 4096, 131072), (6, 4096, 131072), (4, 1024, 131072),
                 (4, 4096, 262144)]
        if quick:
            cases = cases[:2]
    iters = 10
    print(f"k-means, {iters} iterations, {threads} threads, weighted (w ~ U(0.1, 2)), "
          f"{repeats} repeats (times: min / median, s), "
          f"{'the same random start in both' if same_init else 'each its own random start'}")
    print(f"{'v':>3} {'k':>6} {'n':>8} {'assign':>7} {'sqllm s':>13} {'faiss s':>13} "
          f"{'faiss/sqllm (min, median)':>26} {'obj sqllm/faiss':>16}  "
          f"{'first / later / rest s':>22}")
    for v, k, n in cases:
        # Weight-like data: a heavy-tailed mixture (Student t), correlated coordinates.
        X = rng.standard_t(5, size=(n, v)).astype(np.float32)
        X[:, 1:] += 0.5 * X[:, :-1]
        w = rng.uniform(0.1, 2.0, n).astype(np.float32)
        C0 = (X[np.random.default_rng(k + n).choice(n, k, replace=False)].copy()
              if same_init else None)
        t_faiss, km = [], None
        for _ in range(repeats):
            km = faiss.Kmeans(v, k, niter=iters, seed=0, max_points_per_centroid=10**9,
                              min_points_per_centroid=1, verbose=False)
            t0 = time.perf_counter()
            km.train(X, weights=w, init_centroids=C0)
            t_faiss.append(time.perf_counter() - t0)
        o_faiss = objective(X, w, km.centroids)
        for assign in searches:
            t_ours, runs = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = _C.vec_kmeans(X, w, k=k, iters=iters, tol=0.0, init="random", seed=0,
                                  num_threads=threads, assign=assign, init_centroids=C0)
                t_ours.append(time.perf_counter() - t0)
                runs.append(r)
            r = runs[sorted(range(repeats), key=t_ours.__getitem__)[repeats // 2]]  # the median run
            o_ours = objective(X, w, r["centroids"])
            a_s = r["assign_seconds"]
            split = f"{a_s[0]:.3f} / {sum(a_s[1:]):.3f} / {r['seconds'] - sum(a_s):.3f}"
            tmin, tmed = min(t_ours), statistics.median(t_ours)
            fmin, fmed = min(t_faiss), statistics.median(t_faiss)
            print(f"{v:>3} {k:>6} {n:>8} {assign:>7} {tmin:>6.3f}/{tmed:<6.3f} {fmin:>6.3f}/{fmed:<6.3f} "
                  f"{fmin / tmin:>12.2f}, {fmed / tmed:<12.2f} {o_ours / o_faiss:>16.4f}  {split:>22}",
                  flush=True)


def random_vq_layer(out, inn, v, k, k_res):
    layer = VQQuantLinear(inn, out, v, k, k_res, enable_perm=True, enable_norm=True, bias=False)
    g = torch.Generator().manual_seed(0)
    layer.indices.copy_(torch.randint(-2**31, 2**31 - 1, layer.indices.shape, generator=g,
                                      dtype=torch.int64).to(torch.int32))
    if layer.index_bits * layer.group_size % 32:
        layer.indices[..., -1] &= (1 << (layer.index_bits * layer.group_size % 32)) - 1
    layer.centroids.weight.copy_(torch.randn(layer.centroids.weight.shape, generator=g) * 0.05)
    if layer.res_centroids is not None:
        layer.res_centroids.weight.copy_(torch.randn(layer.res_centroids.weight.shape, generator=g) * 0.01)
    layer.perm.copy_(torch.randperm(inn, generator=g).to(torch.int16))
    layer.weight_scale.fill_(1.0)
    layer.validate()
    return layer


def bench_kernel(threads, quick, batches=(1, 8)):
    torch.set_num_threads(threads)
    shapes = [(576, 1536), (2048, 2048), (4096, 4096)]
    if quick:
        shapes = shapes[:2]
    configs = [(6, 4096, 0), (8, 65536, 256)]
    print(f"\nVQ matmul, {threads} threads ({STAT}s; times in ms)")
    print(f"{'out x in':>11} {'v/k/k_res':>14} {'batch':>5} {'gather':>8} {'deq+linear':>11} "
          f"{'fp32 linear':>12} {'deq/gather':>11} {'fp32/gather':>12}")
    for out, inn in shapes:
        for v, k, kr in configs:
            layer = random_vq_layer(out, inn, v, k, kr)
            W = layer.dequantize()
            for n in batches:
                x = torch.randn(n, inn)
                layer(x)  # warm the caches (fp32 codebooks)
                reps = 30 if out * inn < 2**22 else 10
                with torch.no_grad():
                    t_g = median_time(lambda: layer(x), reps)
                    t_d = median_time(lambda: torch.nn.functional.linear(x, layer.dequantize()), reps)
                    t_f = median_time(lambda: torch.nn.functional.linear(x, W), reps)
                print(f"{out:>5}x{inn:<5} {f'{v}/{k}/{kr}':>14} {n:>5} {t_g * 1e3:>8.3f} "
                      f"{t_d * 1e3:>11.3f} {t_f * 1e3:>12.3f} {t_d / t_g:>11.2f} {t_f / t_g:>12.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["kmeans", "kernel"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                    help="batch sizes of the kernel table (above 16 rows the layer takes the "
                         "tiled dequantize + GEMM path)")
    ap.add_argument("--repeats", type=int, default=3, help="k-means timing repeats")
    ap.add_argument("--search", nargs="+", default=["brute", "pruned", "yinyang"],
                    choices=["auto", "brute", "pruned", "yinyang"], help="sqllm k-means searches to time")
    ap.add_argument("--same-init", action="store_true",
                    help="start sqllm and faiss from the same random data points")
    ap.add_argument("--cases", nargs="+", metavar="V:K:N",
                    help="k-means settings (default: the five of the docs' tables)")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="statistic over the repeats of each kernel timing")
    a = ap.parse_args()
    global STAT
    STAT = a.stat
    if a.only != "kernel":
        cases = [tuple(int(x) for x in c.split(":")) for c in a.cases] if a.cases else None
        bench_kmeans(a.threads, a.quick, a.repeats, cases, a.search, a.same_init)
    if a.only != "kmeans":
        bench_kernel(a.threads, a.quick, a.batches)


if __name__ == "__main__":
    main()
