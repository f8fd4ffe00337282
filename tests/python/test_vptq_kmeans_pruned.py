"""The pruned nearest-centroid search of the vector k-means (#9).

The pruned search must return the brute-force kernel's assignment exactly, ties
included (the brute-force kernel is the reference: its arithmetic is the one
both compare, and it is itself checked against NumPy in test_vptq.py); its
lower bounds must be true lower bounds (checked in float64); and vec_kmeans
must give bit-identical results with either search, on any thread count.
"""
import numpy as np
import pytest

from sqllm import _C


def brute(X, C):
    return _C.vec_nearest(X, C, num_threads=1)


def data(rng, n, v, heavy=True):
    X = rng.standard_t(5, size=(n, v)) if heavy else rng.normal(size=(n, v))
    X = X.astype(np.float32)
    X[:, 1:] += 0.5 * X[:, :-1]
    return X


@pytest.mark.parametrize("v,k,n", [(2, 1, 50), (3, 2, 97), (4, 17, 1001), (8, 300, 2003),
                                   (13, 64, 777), (16, 129, 513), (6, 1000, 4000)])
def test_guided_equals_brute_force_for_any_guess(v, k, n):
    rng = np.random.default_rng(100 * v + k)
    X = data(rng, n, v)
    C = X[rng.choice(n, k, replace=k > n)] + rng.normal(scale=0.01, size=(k, v)).astype(np.float32)
    idx_b, dist_b = brute(X, C)
    for guess in (rng.integers(0, k, n).astype(np.int32),        # arbitrary
                  idx_b.copy(),                                   # already nearest
                  np.full(n, k - 1, np.int32)):                   # one far guess for all
        idx, dist, lower = _C.vec_nearest_guided(X, C, guess, num_threads=1)
        np.testing.assert_array_equal(idx, idx_b)
        np.testing.assert_array_equal(dist, dist_b)


def lower_bound_holds(X, C, idx, lower):
    d = np.sqrt(((X.astype(np.float64)[:, None, :] - C.astype(np.float64)[None]) ** 2).sum(-1))
    d[np.arange(len(X)), idx] = np.inf
    second = d.min(1)
    # a true bound: never above the float64 distance to the second-nearest centroid
    assert np.all(lower <= second * (1 + 1e-12)), np.max(lower - second)
    return second


def test_lower_bounds_are_true_and_useful():
    rng = np.random.default_rng(7)
    X = data(rng, 3000, 6)
    C = X[rng.choice(3000, 200, replace=False)]
    guess = rng.integers(0, 200, 3000).astype(np.int32)
    idx, _, lower = _C.vec_nearest_guided(X, C, guess)
    second = lower_bound_holds(X, C, idx, lower)
    assert np.mean(lower > 0) > 0.5 and np.median(lower / second) > 0.3  # not trivially 0


def test_filter_with_drift_stays_exact():
    """After the centroids move, points kept by the bound-minus-drift filter are still right."""
    rng = np.random.default_rng(8)
    X = data(rng, 5000, 4)
    C = X[rng.choice(5000, 300, replace=False)].copy()
    idx0, _ = brute(X, C)
    _, _, lower = _C.vec_nearest_guided(X, C, idx0)
    for scale in (1e-4, 1e-2, 0.3):
        C1 = (C + rng.normal(scale=scale, size=C.shape)).astype(np.float32)
        C1[:5] += 3.0  # a few big movers
        moved = np.sqrt(((C1.astype(np.float64) - C.astype(np.float64)) ** 2).sum(1))
        drift = np.nextafter(moved.astype(np.float32) * np.float32(1 + 1e-6), np.float32(np.inf))
        idx, dist, lower1 = _C.vec_nearest_guided(X, C1, idx0, lower=lower.copy(), drift=drift)
        idx_b, dist_b = brute(X, C1)
        np.testing.assert_array_equal(idx, idx_b)
        np.testing.assert_array_equal(dist, dist_b)
        lower_bound_holds(X, C1, idx, lower1)


def test_ties_go_to_the_lower_index_as_brute_force():
    """Small-integer data and centroids: the kernel's sums are exact, so equidistant
    centroids tie exactly; duplicated centroids tie too."""
    rng = np.random.default_rng(9)
    v, k, n = 4, 96, 4000
    X = rng.integers(-3, 4, size=(n, v)).astype(np.float32)
    C = rng.integers(-3, 4, size=(k, v)).astype(np.float32)
    C[50:60] = C[0:10]      # duplicates with higher indices
    C[5] = C[70]            # and one with a lower index
    idx_b, dist_b = brute(X, C)
    # many exact ties really occur
    d = ((X[:, None, :] - C[None]) ** 2).sum(-1)
    assert np.mean((d == d.min(1, keepdims=True)).sum(1) > 1) > 0.3
    np.testing.assert_array_equal(idx_b, d.argmin(1))  # brute force: the lowest index
    for trial in range(3):
        guess = rng.integers(0, k, n).astype(np.int32)
        idx, dist, _ = _C.vec_nearest_guided(X, C, guess, num_threads=1 + trial % 2)
        np.testing.assert_array_equal(idx, idx_b)
        np.testing.assert_array_equal(dist, dist_b)


def test_far_from_origin_cancellation():
    """Points far from the origin relative to their spread: ||c||^2 - 2x.c cancels
    badly; the pruning's rounding bound must still keep the result exact."""
    rng = np.random.default_rng(10)
    X = (1000.0 + rng.normal(scale=1e-3, size=(3000, 8))).astype(np.float32)
    C = X[rng.choice(3000, 128, replace=False)]
    idx_b, dist_b = brute(X, C)
    idx, dist, _ = _C.vec_nearest_guided(X, C, rng.integers(0, 128, 3000).astype(np.int32))
    np.testing.assert_array_equal(idx, idx_b)
    np.testing.assert_array_equal(dist, dist_b)


@pytest.mark.parametrize("v,k,n,init", [(4, 64, 5000, "random"), (8, 256, 6000, "kmeans++"),
                                        (3, 1024, 3000, "random")])
def test_kmeans_pruned_is_bit_identical_to_brute(v, k, n, init):
    rng = np.random.default_rng(v + k)
    X = data(rng, n, v)
    w = rng.uniform(0.1, 2.0, n).astype(np.float32)
    w[::7] = 0.0  # zero-weight points: empty-cluster repairs happen
    a = _C.vec_kmeans(X, w, k=k, iters=12, tol=0.0, init=init, seed=3, assign="brute", num_threads=1)
    for threads in (1, 2):
        b = _C.vec_kmeans(X, w, k=k, iters=12, tol=0.0, init=init, seed=3, assign="pruned",
                          num_threads=threads)
        np.testing.assert_array_equal(a["assign"], b["assign"])
        np.testing.assert_array_equal(a["centroids"], b["centroids"])
        assert a["objective"] == b["objective"] and a["repaired"] == b["repaired"]
    objs = a["objective"]
    assert all(y <= x * (1 + 1e-6) for x, y in zip(objs, objs[1:]))


def test_kmeans_fewer_points_than_centroids_and_duplicates():
    X = np.repeat(np.arange(10, dtype=np.float32)[:, None], 3, 1)
    X = np.concatenate([X, X])  # every point twice
    for assign in ("brute", "pruned"):
        r = _C.vec_kmeans(X, k=64, iters=5, assign=assign)
        assert r["objective"][-1] == 0.0


def test_bad_input():
    X = np.zeros((10, 4), np.float32)
    C = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="assign must be"):
        _C.vec_kmeans(X, k=2, assign="elkan")
    with pytest.raises(ValueError, match="is not a centroid index"):
        _C.vec_nearest_guided(X, C, np.full(10, 3, np.int32))
    with pytest.raises(ValueError, match="guess must have 10 entries"):
        _C.vec_nearest_guided(X, C, np.zeros(9, np.int32))
    with pytest.raises(ValueError, match="drift needs lower"):
        _C.vec_nearest_guided(X, C, np.zeros(10, np.int32), drift=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="drift must be finite"):
        _C.vec_nearest_guided(X, C, np.zeros(10, np.int32), lower=np.zeros(10),
                              drift=np.full(3, -1.0, np.float32))
    X[2, 1] = np.inf
    with pytest.raises(ValueError, match="points must be finite"):
        _C.vec_nearest_guided(X, C, np.zeros(10, np.int32))
