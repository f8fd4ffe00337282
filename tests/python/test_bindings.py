"""The native bindings on NumPy arrays and torch tensors, against independent oracles."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import sqllm
from sqllm import _C


def brute_force_sse(x, w, k):
    """Optimal weighted SSE over all contiguous partitions of the sorted values (float64)."""
    order = np.argsort(x, kind="stable")
    xs, ws = x[order].astype(np.float64), w[order].astype(np.float64)
    n = len(xs)
    best = np.inf
    for cuts in itertools.combinations(range(1, n), min(k, n) - 1):
        sse = 0.0
        for a, b in zip((0,) + cuts, cuts + (n,)):
            seg, sw = xs[a:b], ws[a:b]
            c = (seg * sw).sum() / sw.sum() if sw.sum() > 0 else seg.mean()
            sse += (sw * (seg - c) ** 2).sum()
        best = min(best, sse)
    return best


def weighted_sse(x, w, centroids, labels):
    return float((w.astype(np.float64) * (x - centroids[labels].astype(np.float64)) ** 2).sum())


@pytest.mark.parametrize("seed", range(8))
def test_exact_kmeans_is_optimal_on_small_inputs(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(3, 10)), int(rng.integers(1, 5))
    x = rng.normal(size=n).astype(np.float32)
    w = (rng.random(n) ** 2).astype(np.float32)
    c, labels = sqllm.kmeans1d(x, w, k, method="exact")
    assert c.shape == (k,) and labels.shape == (n,)
    assert np.all(np.diff(c) >= 0)
    got = weighted_sse(x, w, c, labels)
    # float32 centroids: the SSE can exceed the float64 optimum by rounding only.
    assert got == pytest.approx(brute_force_sse(x, w, k), rel=1e-5, abs=1e-9)
    # labels are the nearest centroid
    d = np.abs(x[:, None] - c[None, :])
    assert np.all(d[np.arange(n), labels] <= d.min(1))


def test_torch_and_numpy_inputs_agree_and_lloyd_is_never_better_than_exact():
    rng = np.random.default_rng(0)
    x = rng.laplace(size=4096).astype(np.float32) * 0.02
    w = (rng.standard_t(3, size=4096) ** 2).astype(np.float32)
    c_np, l_np = sqllm.kmeans1d(x, w, 8)
    c_t, l_t = sqllm.kmeans1d(torch.from_numpy(x), torch.from_numpy(w), 8)
    assert np.array_equal(c_np, c_t) and np.array_equal(l_np, l_t)
    c_l, l_l = sqllm.kmeans1d(x, w, 8, method="lloyd")
    exact, lloyd = weighted_sse(x, w, c_np, l_np), weighted_sse(x, w, c_l, l_l)
    assert exact <= lloyd * (1 + 1e-6)
    assert lloyd <= exact * 1.02  # a near-optimal start; measured within 0.6% on LLM-like rows


def test_kmeans_rows_matches_single_row_calls():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 300)).astype(np.float32)
    w = rng.random((5, 300)).astype(np.float32)
    c, labels, sse = _C.kmeans1d_rows(x, w, 4, "exact")
    assert labels.dtype == np.uint8
    for r in range(5):
        c1, l1 = sqllm.kmeans1d(x[r], w[r], 4)
        assert np.array_equal(c[r], c1) and np.array_equal(labels[r], l1)
        assert sse[r] == pytest.approx(weighted_sse(x[r], w[r], c1, l1), rel=1e-6)


def test_fewer_distinct_values_than_clusters_and_zero_weights():
    x = np.array([1.0, 1.0, 2.0, 2.0, 3.0], np.float32)
    c, labels = sqllm.kmeans1d(x, None, 8)
    assert set(c.tolist()) == {1.0, 2.0, 3.0} and np.all(np.diff(c) >= 0)
    assert np.array_equal(c[labels], x)
    c0, l0 = sqllm.kmeans1d(x, np.zeros(5, np.float32), 2)  # all-zero weights = equal weights
    c1, l1 = sqllm.kmeans1d(x, np.ones(5, np.float32), 2)
    assert np.array_equal(c0, c1) and np.array_equal(l0, l1)


def test_pack_unpack_round_trip_from_python():
    rng = np.random.default_rng(2)
    for bits in range(1, 9):
        codes = rng.integers(0, 2 ** bits, size=(3, 77), dtype=np.uint8)
        packed = _C.pack_codes(codes, bits)
        assert packed.shape == (3, _C.packed_words(77, bits)) == (3, (77 * bits + 31) // 32)
        assert np.array_equal(_C.unpack_codes(packed, 77, bits), codes)
        # bit j*bits.. of the row stream holds code j (little-endian stream)
        stream = np.unpackbits(packed[0].view(np.uint8), bitorder="little")
        for j in (0, 31, 76):
            v = sum(int(stream[j * bits + b]) << b for b in range(bits))
            assert v == codes[0, j]


def test_bindings_reject_bad_input_with_clear_messages():
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="same shape"):
        sqllm.kmeans1d(x, np.ones(9, np.float32), 2)
    with pytest.raises(ValueError, match="method"):
        sqllm.kmeans1d(x, None, 2, method="spectral")
    with pytest.raises(TypeError, match="k must be an int"):
        sqllm.kmeans1d(x, None, 2.5)
    with pytest.raises(TypeError, match="values must be a numeric array"):
        sqllm.kmeans1d(np.array(["a", "b"]), None, 2)
    with pytest.raises(ValueError, match="values must be 1-D"):
        sqllm.kmeans1d(np.ones((2, 2)), None, 2)
    bad = x.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="x"):
        sqllm.kmeans1d(bad, None, 2)
    with pytest.raises(ValueError, match="w"):
        sqllm.kmeans1d(x, -np.ones(10, np.float32), 2)
    with pytest.raises(ValueError, match="empty"):
        sqllm.kmeans1d(np.ones(0, np.float32), None, 2)
    with pytest.raises(ValueError, match="k"):
        sqllm.kmeans1d(x, None, 0)
    with pytest.raises(ValueError, match="bits must be in 1..8, got 9"):
        _C.pack_codes(np.zeros((1, 4), np.uint8), 9)
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        _C.pack_codes(np.full((1, 4), 5, np.uint8), 2)
    packed = _C.pack_codes(np.zeros((2, 40), np.uint8), 3)
    tables = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="in_features=40"):
        _C.lut_matmul(np.ones((1, 39), np.float32), packed, tables, 3, 40)
    with pytest.raises(ValueError, match="lookup_table must have shape"):
        _C.lut_matmul(np.ones((1, 40), np.float32), packed, tables[:, :4], 3, 40)
    with pytest.raises(ValueError, match="words per row"):
        _C.lut_matmul(np.ones((1, 40), np.float32), packed[:, :2], tables, 3, 40)
    with pytest.raises(ValueError, match="group_axis"):
        _C.lut_matmul(np.ones((1, 40), np.float32), packed, tables, 3, 40, "diagonal")
    csr = (np.array([0, 1, 1], np.int32), np.array([45], np.int32), np.zeros(1, np.uint16))
    with pytest.raises(ValueError, match="out of range"):
        _C.lut_matmul(np.ones((1, 40), np.float32), packed, tables, 3, 40, "row", csr)
    with pytest.raises(ValueError, match="nuq|weight must be"):
        _C.nuq_quantize(np.ones((0, 4), np.float32))
    with pytest.raises(TypeError):
        _C.nuq_quantize("not an array")


def _integer_lut_problem(rng, out_f, in_f, batch, bits, axis):
    """Small-integer codes, tables and x: every product and partial sum is an
    integer below 2**24, so any fp32 summation order is exact."""
    codes = rng.integers(0, 2 ** bits, (out_f, in_f), dtype=np.uint8)
    groups = out_f if axis == "row" else in_f
    tables = rng.integers(-8, 9, (groups, 2 ** bits)).astype(np.float32)
    x = rng.integers(-8, 9, (batch, in_f)).astype(np.float32)
    w = tables[np.arange(out_f)[:, None], codes] if axis == "row" else \
        tables[np.arange(in_f)[None, :], codes]
    return _C.pack_codes(codes, bits), tables, x, x.astype(np.float64) @ w.T.astype(np.float64)


@pytest.mark.parametrize("kernel", ["scalar", "avx2", "avx512"])
def test_every_cpu_kernel_path_is_exact_on_integer_data(kernel):
    rng = np.random.default_rng(13)
    if kernel not in _C.cpu_kernels():  # this CPU lacks it: forcing it must refuse
        packed, tables, x, _ = _integer_lut_problem(rng, 3, 20, 1, 3, "row")
        with pytest.raises(ValueError, match="not supported"):
            _C.lut_matmul(x, packed, tables, 3, 20, "row", None, 0, False, kernel)
        return
    shapes = [(1, 1, 1), (5, 15, 1), (4, 16, 3), (7, 33, 4), (3, 100, 8), (6, 250, 9),
              (2, 1027, 16), (9, 64, 17), (70, 37, 64), (5, 300, 65)]
    for bits, axis, (out_f, in_f, batch) in itertools.product(range(1, 9), ("row", "column"), shapes):
        packed, tables, x, ref = _integer_lut_problem(rng, out_f, in_f, batch, bits, axis)
        y = _C.lut_matmul(x, packed, tables, bits, in_f, axis, None, 0, False, kernel)
        np.testing.assert_array_equal(y, ref, err_msg=f"{kernel} bits={bits} {axis} "
                                                      f"{out_f}x{in_f} batch={batch}")
    with pytest.raises(ValueError, match="cpu kernel must be"):
        _C.lut_matmul(x, packed, tables, bits, in_f, axis, None, 0, False, "sse9")


def test_cpu_kernel_env_var_forces_a_path():
    import subprocess
    import sys

    code = "from sqllm import _C; print(_C.cpu_kernel())"
    env = dict(__import__("os").environ, SQLLM_CPU_KERNEL="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "scalar"
    assert _C.cpu_kernels()[0] == "scalar" and _C.cpu_kernel() in _C.cpu_kernels()
