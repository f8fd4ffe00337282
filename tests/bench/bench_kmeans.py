#!/usr/bin/env python3
"""Benchmark sqllm's weighted 1-D k-means against scikit-learn.

Upstream SqueezeLLM builds each row's lookup table with
``sklearn.cluster.KMeans(n_clusters=2**bits, n_init="auto", max_iter=50,
random_state=0).fit(x.reshape(-1, 1), sample_weight=w)``.  This script times
that call per row and sqllm's ``_C.kmeans1d`` ("exact" and "lloyd", one row per
call, so single-threaded) and ``_C.kmeans1d_rows`` (all rows, OpenMP threads),
on LLM-like rows: Laplace / normal values with a few outliers and Fisher-like
weights w = g**2 with heavy-tailed g (Student t, 3 dof).

The weighted SSE sum_i w_i (x_i - c[label_i])**2 of every method is recomputed
here in float64 from the returned centroids and labels; the table gives the
ratio to sklearn's (mean and worst row) and how many rows are at least as good
as sklearn.  sklearn runs single-threaded (threadpoolctl) unless
--sklearn-threads is given.  sqllm is timed before sklearn (sklearn's idle
worker threads spin for a while after it returns).  Times are the best of
--repeat runs over all rows,
divided by the number of rows.

Usage: python tests/bench/bench_kmeans.py [--rows 32] [--n 4096] [--bits 3 4]
(sqllm._C must be importable, e.g. PYTHONPATH=python after a developer build).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import numpy as np


def make_rows(rows: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """LLM-like weight rows and Fisher-like (squared-gradient) weights."""
    rng = np.random.default_rng(seed)
    x = np.empty((rows, n), dtype=np.float32)
    for r in range(rows):
        scale = 0.02 * rng.uniform(0.5, 2.0)
        if r % 2 == 0:
            x[r] = rng.laplace(scale=scale, size=n)
        else:
            x[r] = rng.normal(scale=scale, size=n)
        outliers = rng.choice(n, size=max(1, n // 1000), replace=False)
        x[r, outliers] *= 10.0
    g = rng.standard_t(3.0, size=(rows, n))
    w = (g * g).astype(np.float32)
    return x, w


def weighted_sse(x: np.ndarray, w: np.ndarray, c: np.ndarray, labels: np.ndarray) -> float:
    """sum w (x - c[label])^2 in float64."""
    d = x.astype(np.float64) - np.asarray(c, dtype=np.float64)[labels]
    return float(np.sum(w.astype(np.float64) * d * d))


CLOCK = time.perf_counter  # --cpu-time: time.process_time (all threads of the process)


def best_time(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def run_sklearn(x: np.ndarray, w: np.ndarray, k: int) -> tuple[list[float], Callable[[], None]]:
    from sklearn.cluster import KMeans

    def once() -> list[float]:
        out = []
        for r in range(x.shape[0]):
            km = KMeans(n_clusters=k, n_init="auto", max_iter=50, random_state=0)
            km.fit(x[r].reshape(-1, 1), sample_weight=w[r])
            out.append(weighted_sse(x[r], w[r], km.cluster_centers_.ravel(), km.labels_))
        return out

    return once(), once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, help="rows per bit width (default 32)")
    ap.add_argument("--n", type=int, default=4096, help="row width (default 4096)")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4], help="bit widths (default 3 4)")
    ap.add_argument("--repeat", type=int, default=5, help="timing repetitions, best kept (default 5)")
    ap.add_argument("--threads", type=int, default=0, help="threads of kmeans1d_rows (0: OpenMP default)")
    ap.add_argument("--sklearn-threads", type=int, default=1, help="threads of sklearn (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process CPU clock instead of the wall clock (on a loaded "
                         "machine: what each side computes, not how long it waited; use with "
                         "--threads 1 and OMP_NUM_THREADS=1)")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time

    import sklearn
    from sqllm import _C

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - sklearn depends on threadpoolctl
        threadpool_limits = None

    x, w = make_rows(args.rows, args.n, args.seed)
    print(
        f"# kmeans1d benchmark: {args.rows} rows x {args.n}, Laplace/normal values with outliers, "
        f"w = t3^2; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"sklearn {sklearn.__version__} ({args.sklearn_threads} thread), numpy {np.__version__}; "
        f"{'CPU' if args.cpu_time else 'wall'} time"
    )
    print()
    print("| bits | k | method | us/row | speed-up vs sklearn | SSE/sklearn mean | SSE/sklearn worst | rows SSE <= sklearn |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for bits in args.bits:
        k = 1 << bits
        # sqllm first: right after sklearn, its idle OpenMP / OpenBLAS worker
        # threads keep spinning for a while and steal cores from our threads.
        results: list[tuple[str, float, np.ndarray]] = []
        for method in ("exact", "lloyd"):
            def single(method: str = method) -> list[float]:
                out = []
                for r in range(args.rows):
                    c, lab, _ = _C.kmeans1d(x[r], w[r], k, method=method, max_iter=50)
                    out.append(weighted_sse(x[r], w[r], c, lab))
                return out

            def single_timed(method: str = method) -> None:
                for r in range(args.rows):
                    _C.kmeans1d(x[r], w[r], k, method=method, max_iter=50)

            sse = np.array(single())
            results.append((f"sqllm {method}, 1 row/call", best_time(single_timed, args.repeat) / args.rows, sse))

        nthreads = args.threads if args.threads > 0 else (os.cpu_count() or 1)
        for method in ("exact", "lloyd"):
            c, lab, _ = _C.kmeans1d_rows(x, w, k, method=method, max_iter=50, num_threads=args.threads)
            sse = np.array([weighted_sse(x[r], w[r], c[r], lab[r]) for r in range(args.rows)])

            def rows_timed(method: str = method) -> None:
                _C.kmeans1d_rows(x, w, k, method=method, max_iter=50, num_threads=args.threads)

            results.append((f"sqllm {method}, kmeans1d_rows ({nthreads} threads)",
                            best_time(rows_timed, args.repeat) / args.rows, sse))

        if threadpool_limits is not None:
            with threadpool_limits(limits=args.sklearn_threads):
                sk_sse, sk_once = run_sklearn(x, w, k)
                t_sk = best_time(sk_once, args.repeat) / args.rows
        else:
            sk_sse, sk_once = run_sklearn(x, w, k)
            t_sk = best_time(sk_once, args.repeat) / args.rows
        sk = np.array(sk_sse)
        time.sleep(1.0)  # let sklearn's worker threads go idle before the next bit width

        print(f"| {bits} | {k} | sklearn KMeans | {t_sk * 1e6:.0f} | 1.0 | 1.000 | 1.000 | {args.rows}/{args.rows} |")
        for name, t, sse in results:
            ratio = sse / sk
            better = int(np.sum(sse <= sk * (1 + 1e-12)))
            print(f"| {bits} | {k} | {name} | {t * 1e6:.0f} | {t_sk / t:.0f}x | {ratio.mean():.4f} | "
                  f"{ratio.max():.4f} | {better}/{args.rows} |")
        exact = results[0][2]
        lloyd = results[1][2]
        print(f"|  |  | (lloyd/exact SSE: mean {np.mean(lloyd / exact):.5f}, worst {np.max(lloyd / exact):.5f}) |  |  |  |  |  |")


if __name__ == "__main__":
    main()
