"""PTQ1.61 CPU kernel paths (include/sqllm/binary_matmul.hpp, detail/binary_matmul_simd.hpp).

Every path (scalar sign tables; AVX2 / AVX-512 masked adds below 4 batch rows, per-8
sign tables over 8-row tiles above; the AVX-512 4-bit salient decode by register
table) must give exactly the float64 reference on small-integer data: every
product and partial sum is then an integer below 2^24, exact in fp32 whatever the
order of the additions, so any difference is a wrong index, bit or factor.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sqllm import _C
from sqllm.nn_ptq161 import PTQ161QuantLinear

KERNELS = list(_C.cpu_kernels())  # the paths this CPU and build support


def _int_parts(rng, out, inn, n_sal, wbits, group_size):
    """Unpacked parts whose Ŵ and products with small-integer x are small integers."""
    mask = np.zeros(inn, bool)
    mask[rng.choice(inn, n_sal, replace=False)] = True
    n_bin = inn - n_sal
    groups = 0 if n_sal == 0 else (1 if group_size < 0 else -(-n_sal // group_size))
    f = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return dict(mask=mask, signs=rng.random((out, n_bin)) < 0.5,
                alpha=f(rng.integers(1, 4, out)), mu=f(rng.integers(-2, 3, out)),
                r1=f(rng.integers(1, 3, out)), r2=f(rng.integers(1, 3, n_bin)),
                codes=rng.integers(0, 1 << wbits, (out, n_sal)),
                scales=f(rng.integers(1, 3, (out, groups))),
                zeros=f(rng.integers(0, 1 << wbits, (out, groups))))


def _reference(p, group_size, x):
    """y = x Ŵᵀ in float64, Ŵ from the parts by the format's definition (docs/formats.md)."""
    mask, signs = p["mask"], p["signs"]
    w = np.zeros((signs.shape[0], mask.size))
    s = np.where(signs, 1.0, -1.0)
    w[:, ~mask] = (p["r1"][:, None] * p["r2"][None, :]) * (p["alpha"][:, None] * s + p["mu"][:, None])
    n_sal = int(mask.sum())
    if n_sal:
        g = np.arange(n_sal) // (n_sal if group_size < 0 else group_size)
        w[:, mask] = p["scales"][:, g] * (p["codes"] - p["zeros"][:, g])
    return x.astype(np.float64) @ w.T


CASES = [  # out, in, salient channels, wbits, group_size
    (1, 1, 0, 4, -1), (1, 1, 1, 4, -1), (3, 7, 2, 4, -1), (5, 8, 0, 4, -1), (7, 9, 1, 4, -1),
    (17, 31, 5, 4, -1), (33, 100, 20, 4, -1), (16, 129, 0, 4, -1), (9, 40, 40, 4, -1),
    (21, 260, 52, 4, 32), (13, 300, 75, 4, 64), (11, 333, 130, 4, 128), (6, 97, 33, 4, 32),
    (19, 150, 30, 2, -1), (8, 201, 41, 3, 32), (12, 77, 15, 8, -1), (10, 90, 64, 5, 64),
    (40, 576, 115, 4, -1),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("out,inn,n_sal,wbits,group_size", CASES)
def test_every_path_is_exact_on_small_integer_data(kernel, out, inn, n_sal, wbits, group_size):
    rng = np.random.default_rng(out * 7919 + inn * 31 + n_sal + wbits)
    p = _int_parts(rng, out, inn, n_sal, wbits, group_size)
    layer = PTQ161QuantLinear.from_parts(**p, wbits=wbits, group_size=group_size)
    ops = layer._operands()
    for batch in (1, 2, 3, 4, 5, 8, 9, 17, 24):
        x = rng.integers(-3, 4, (batch, inn)).astype(np.float32)
        ref = _reference(p, group_size, x)
        assert np.abs(ref).max() < 2 ** 22  # every partial sum is exact in fp32
        for nt in (1, 2):
            y = _C.ptq161_matmul(x, *ops, wbits, group_size, inn, num_threads=nt, kernel=kernel)
            assert y.dtype == np.float32 and y.shape == (batch, out)
            assert np.array_equal(y.astype(np.float64), ref), (kernel, batch, nt)


@pytest.mark.parametrize("kernel", KERNELS)
def test_paths_agree_on_random_data_and_do_not_depend_on_threads(kernel):
    # large enough for the row-parallel (batch < 4), shared-table (one tile) and
    # tile-parallel (>= 2 tiles) schedules: out * in * batch >= 2^20
    rng = np.random.default_rng(11)
    out, inn, n_sal = 300, 517, 103
    p = _int_parts(rng, out, inn, n_sal, 4, 32)
    h = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    p.update(alpha=h(rng.uniform(0.01, 0.1, out)), mu=h(rng.normal(0, 0.01, out)),
             r2=h(rng.uniform(0.5, 1.5, inn - n_sal)), scales=h(rng.uniform(0.001, 0.02, p["scales"].shape)))
    layer = PTQ161QuantLinear.from_parts(**p, wbits=4, group_size=32)
    ops = layer._operands()
    for batch in (1, 3, 8, 40):
        x = rng.normal(size=(batch, inn)).astype(np.float32)
        y1 = _C.ptq161_matmul(x, *ops, 4, 32, inn, num_threads=1, kernel=kernel)
        y2 = _C.ptq161_matmul(x, *ops, 4, 32, inn, num_threads=2, kernel=kernel)
        assert np.array_equal(y1, y2)  # each output summed by one thread in a fixed order
        ref = _reference(p, 32, x)
        # fp32 sums of at most in + 32 terms, each at most the magnitudes below (the
        # binary part as c1 P + c0 S: |c1| + |c0| <= r1 (3|α| + |μ|) per |r2 x|):
        # |error| <= (in + 32) u Σ |term|
        bin_mag = (p["r1"] * (3 * np.abs(p["alpha"]) + np.abs(p["mu"])))[:, None] * p["r2"][None, :]
        g = np.arange(n_sal) // 32
        sal_mag = p["scales"][:, g] * np.maximum(p["codes"], p["zeros"][:, g])
        xa = np.abs(x).astype(np.float64)
        mag = xa[:, ~p["mask"]] @ bin_mag.T + xa[:, p["mask"]] @ sal_mag.T
        assert np.all(np.abs(y1 - ref) <= (inn + 32) * np.finfo(np.float32).eps * mag)


def test_the_layer_uses_a_handle_that_follows_its_buffers():
    rng = np.random.default_rng(5)
    p = _int_parts(rng, 9, 70, 14, 4, -1)
    layer = PTQ161QuantLinear.from_parts(**p, wbits=4, group_size=-1)
    x = torch.from_numpy(rng.integers(-3, 4, (2, 70)).astype(np.float32))
    with torch.no_grad():
        assert np.array_equal(layer(x).double().numpy(), _reference(p, -1, x.numpy()))
        hd = _C.Ptq161Handle(*layer._operands(), 4, -1, 70)
        assert np.array_equal(hd.matmul(x.numpy()), layer(x).numpy())
        # an in-place edit of a buffer is seen by the next forward (version counters)
        layer.signs[0, 0] ^= 1
        p["signs"][0, :8] = np.unpackbits(layer.signs[0, :1].numpy(), bitorder="little")[:8].astype(bool)
        assert np.array_equal(layer(x).double().numpy(), _reference(p, -1, x.numpy()))


def test_kernel_choice_errors():
    rng = np.random.default_rng(2)
    p = _int_parts(rng, 4, 16, 3, 4, -1)
    layer = PTQ161QuantLinear.from_parts(**p, wbits=4, group_size=-1)
    x = np.ones((1, 16), np.float32)
    with pytest.raises(ValueError, match="cpu kernel must be"):
        _C.ptq161_matmul(x, *layer._operands(), 4, -1, 16, kernel="avx9000")
    for k in ("avx2", "avx512"):
        if k not in KERNELS:
            with pytest.raises(ValueError, match="not supported"):
                _C.ptq161_matmul(x, *layer._operands(), 4, -1, 16, kernel=k)
    hd = _C.Ptq161Handle(*layer._operands(), 4, -1, 16)
    with pytest.raises(ValueError, match="features"):
        hd.matmul(np.ones((1, 15), np.float32))
    bad = list(layer._operands())
    bad[1] = bad[1].copy()
    bad[1][0, -1] |= 0x80  # a sign bit past the 13 binarised channels
    with pytest.raises(ValueError, match="past"):
        _C.Ptq161Handle(*bad, 4, -1, 16)
