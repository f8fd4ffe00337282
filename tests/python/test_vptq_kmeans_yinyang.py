"""The Yinyang nearest-centroid search of the vector k-means (#9).

Like the pruned search (test_vptq_kmeans_pruned.py) it must return the
brute-force kernel's assignment exactly, ties included, at every step of a
sequence of centroid sets; its per-group lower bounds must be true lower bounds
(checked in float64); and vec_kmeans must give bit-identical results with it and
with brute force, on any thread count.
"""
import numpy as np
import pytest

from sqllm import _C


def brute(X, C):
    return _C.vec_nearest(X, C, num_threads=1)[0]


def data(rng, n, v):
    X = rng.standard_t(5, size=(n, v)).astype(np.float32)
    X[:, 1:] += 0.5 * X[:, :-1]
    return X


def lloyd_like_sequence(rng, X, k, steps, scale):
    """Centroid sets of successive steps: random points, then moves of every size
    (small jitter, a few far jumps, a swap of two centroids)."""
    C = X[rng.choice(len(X), k, replace=k > len(X))].copy()
    seq = [C]
    for s in range(steps):
        C = (C + rng.normal(scale=scale * (0.3 ** s), size=C.shape)).astype(np.float32)
        C[rng.integers(0, k, 2)] += 4.0  # far movers
        if k > 3:
            C[[1, 2]] = C[[2, 1]]
        seq.append(C)
    return np.stack(seq)


@pytest.mark.parametrize("v,k,n", [(2, 1, 40), (2, 16, 500), (3, 37, 1001), (4, 300, 3000),
                                   (8, 256, 2003), (6, 1500, 4000), (13, 64, 777), (16, 129, 513)])
def test_every_step_equals_brute_force(v, k, n):
    rng = np.random.default_rng(10 * v + k)
    X = data(rng, n, v)
    seq = lloyd_like_sequence(rng, X, k, 5, 0.5)
    idx, lower, group_of = _C.vec_nearest_yinyang(X, seq, num_threads=1)
    for s in range(len(seq)):
        np.testing.assert_array_equal(idx[s], brute(X, seq[s]), err_msg=f"step {s}")
    idx2, lower2, _ = _C.vec_nearest_yinyang(X, seq, num_threads=2)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_array_equal(lower, lower2)
    assert group_of.min() == 0 and np.all(np.bincount(group_of) >= 1)


def test_group_bounds_are_true_lower_bounds_and_useful():
    rng = np.random.default_rng(5)
    v, k, n = 4, 500, 3000
    X = data(rng, n, v)
    for steps in (0, 1, 4):
        seq = lloyd_like_sequence(rng, X, k, steps, 0.05)
        idx, lower, group_of = _C.vec_nearest_yinyang(X, seq)
        C = seq[-1].astype(np.float64)
        d = np.sqrt(((X.astype(np.float64)[:, None, :] - C[None]) ** 2).sum(-1))
        d[np.arange(n), idx[-1]] = np.inf  # the bound covers every centroid but the own one
        G = lower.shape[1]
        for g in range(G):
            members = np.flatnonzero(group_of == g)
            true = d[:, members].min(1)
            assert np.all(lower[:, g].astype(np.float64) <= true), (steps, g)
        # not trivially zero: the nearest other group's bound is a fair share of the true gap
        own = group_of[idx[-1]]
        near = d.min(1)
        assert np.median(lower.min(1) / near) > 0.3
        assert np.mean(lower[np.arange(n), own] > 0) > 0.5


def test_ties_go_to_the_lower_index_as_brute_force():
    """Small-integer points and centroids, moved by integer steps: the kernel's sums are
    exact, so equidistant centroids tie exactly, also across groups; duplicates tie too."""
    rng = np.random.default_rng(9)
    v, k, n = 4, 96, 4000
    X = rng.integers(-3, 4, size=(n, v)).astype(np.float32)
    C = rng.integers(-3, 4, size=(k, v)).astype(np.float32)
    C[50:60] = C[0:10]  # duplicates with higher indices
    C[5] = C[70]        # and one with a lower index
    seq = [C]
    for _ in range(4):
        C = C.copy()
        moved = rng.choice(k, 10, replace=False)
        C[moved] += rng.integers(-1, 2, size=(10, v))
        seq.append(C)
    seq = np.stack(seq).astype(np.float32)
    d = ((X[:, None, :] - seq[-1][None]) ** 2).sum(-1)
    assert np.mean((d == d.min(1, keepdims=True)).sum(1) > 1) > 0.3  # many exact ties
    for threads in (1, 2):
        idx, _, _ = _C.vec_nearest_yinyang(X, seq, num_threads=threads)
        for s in range(len(seq)):
            ref = brute(X, seq[s])
            np.testing.assert_array_equal(ref, ((X[:, None, :] - seq[s][None]) ** 2).sum(-1).argmin(1))
            np.testing.assert_array_equal(idx[s], ref)


def test_far_from_origin_cancellation():
    """||c||^2 - 2x.c cancels badly far from the origin: the rounding bound must hold."""
    rng = np.random.default_rng(10)
    X = (1000.0 + rng.normal(scale=1e-3, size=(3000, 8))).astype(np.float32)
    seq = lloyd_like_sequence(rng, X, 128, 3, 1e-4)
    seq[1:, :, :] = np.where(np.abs(seq[1:] - 1000) > 1, seq[:1], seq[1:])  # drop the far jumps
    idx, _, _ = _C.vec_nearest_yinyang(X, seq.astype(np.float32))
    for s in range(len(seq)):
        np.testing.assert_array_equal(idx[s], brute(X, seq[s]))


@pytest.mark.parametrize("v,k,n,init", [(4, 64, 5000, "random"), (8, 256, 6000, "kmeans++"),
                                        (3, 1024, 3000, "random"), (5, 100, 2000, "random"),
                                        (6, 1500, 20000, "random")])
def test_kmeans_yinyang_is_bit_identical_to_brute(v, k, n, init):
    rng = np.random.default_rng(v + k)
    X = data(rng, n, v)
    w = rng.uniform(0.1, 2.0, n).astype(np.float32)
    w[::7] = 0.0  # zero-weight points: empty-cluster repairs happen
    a = _C.vec_kmeans(X, w, k=k, iters=12, tol=0.0, init=init, seed=3, assign="brute", num_threads=1)
    for threads in (1, 2):
        b = _C.vec_kmeans(X, w, k=k, iters=12, tol=0.0, init=init, seed=3, assign="yinyang",
                          num_threads=threads)
        np.testing.assert_array_equal(a["assign"], b["assign"])
        np.testing.assert_array_equal(a["centroids"], b["centroids"])
        assert a["objective"] == b["objective"] and a["repaired"] == b["repaired"]
    objs = b["objective"]
    assert all(y <= x * (1 + 1e-6) for x, y in zip(objs, objs[1:]))  # never increases


def test_kmeans_yinyang_small_cases():
    X = np.repeat(np.arange(10, dtype=np.float32)[:, None], 3, 1)
    X = np.concatenate([X, X])  # every point twice
    r = _C.vec_kmeans(X, k=64, iters=5, assign="yinyang")
    assert r["objective"][-1] == 0.0
    r1 = _C.vec_kmeans(X, k=1, iters=3, assign="yinyang")
    np.testing.assert_allclose(r1["centroids"][0], X.mean(0), rtol=1e-6)
    # init_centroids: the same run as brute force from the same start
    C0 = X[[0, 3, 7]]
    a = _C.vec_kmeans(X, k=3, iters=4, tol=0.0, init_centroids=C0, assign="brute")
    b = _C.vec_kmeans(X, k=3, iters=4, tol=0.0, init_centroids=C0, assign="yinyang")
    np.testing.assert_array_equal(a["centroids"], b["centroids"])


def test_bad_input():
    X = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="'yinyang'"):
        _C.vec_kmeans(X, k=2, assign="elkan")
    with pytest.raises(ValueError, match="centroid_seq"):
        _C.vec_nearest_yinyang(X, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="same vector length"):
        _C.vec_nearest_yinyang(X, np.zeros((1, 3, 5), np.float32))
    C = np.zeros((2, 3, 4), np.float32)
    C[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="centroids must be finite"):
        _C.vec_nearest_yinyang(X, C)
    X[2, 1] = np.inf
    with pytest.raises(ValueError, match="points must be finite"):
        _C.vec_nearest_yinyang(X, np.zeros((1, 3, 4), np.float32))
