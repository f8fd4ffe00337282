"""The CPU LUT matmul for bf16 activations (include/sqllm/lut_matmul_bf16.hpp).

Arithmetic under test: y = sum_i bf16(T[o, c_oi]) * x_i with x in bf16, the
products exact in fp32 (8-bit x 8-bit significands), accumulated in fp32;
the sparse part added in fp32.  References are float64 over the same bf16
operands, so the only differences are the fp32 sums' roundings.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sqllm
from sqllm import QuantLinear, _C
from sqllm import nn as sqnn

U32 = 2.0 ** -24  # unit roundoff of fp32
U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits)

needs_bf16 = pytest.mark.skipif(not _C.has_bf16_matmul(),
                                reason="CPU without AVX512-BF16 (or SQLLM_CPU_KERNEL forces another path)")


def _bf16_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def _round_bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(torch.bfloat16).double().numpy()


def _layer(rng, out_f, in_f, bits, integer, nnz=0):
    k = 2 ** bits
    codes = rng.integers(0, k, size=(out_f, in_f), dtype=np.uint8)
    packed = np.zeros((out_f, -(-in_f * bits // 32)), dtype=np.uint32)
    for o in range(out_f):  # LSB-first bit stream (docs/formats.md), written here independently
        stream = 0
        for i in range(in_f):
            stream |= int(codes[o, i]) << (i * bits)
        for w in range(packed.shape[1]):
            packed[o, w] = (stream >> (32 * w)) & 0xFFFFFFFF
    if integer:
        tables = rng.integers(-8, 9, size=(out_f, k)).astype(np.float32)
    else:
        tables = rng.standard_normal((out_f, k)).astype(np.float32)
    sparse = None
    dense_sp = np.zeros((out_f, in_f))
    if nnz:
        flat = rng.choice(out_f * in_f, size=min(nnz, out_f * in_f), replace=False)
        flat.sort()
        rows, cols = np.divmod(flat, in_f)
        vals = (rng.integers(-3, 4, size=len(flat)) if integer else rng.standard_normal(len(flat)))
        vals = vals.astype(np.float16)
        row_ptr = np.zeros(out_f + 1, dtype=np.int32)
        np.add.at(row_ptr, rows + 1, 1)
        row_ptr = np.cumsum(row_ptr).astype(np.int32)
        sparse = (row_ptr, cols.astype(np.int32), vals.view(np.uint16))
        dense_sp[rows, cols] = vals.astype(np.float64)
    w_bf16 = _round_bf16(tables)[np.arange(out_f)[:, None], codes]  # the weights the path multiplies
    return packed, tables, sparse, w_bf16, dense_sp


def _reference(x_bits, w_bf16, dense_sp):
    x = torch.from_numpy(x_bits.view(np.int16)).view(torch.bfloat16).double().numpy()
    return x @ (w_bf16 + dense_sp).T, np.abs(x) @ (np.abs(w_bf16) + np.abs(dense_sp)).T


@needs_bf16
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("in_f", [1, 31, 32, 33, 100, 576])
def test_exact_on_small_integers(bits, in_f):
    """Small-integer tables, x and sparse values: every partial sum is an integer
    below 2^24, so any fp32 summation order is exact."""
    rng = np.random.default_rng(bits * 1000 + in_f)
    for out_f, batch, nnz in [(1, 1, 0), (2, 3, 0), (17, 9, 5), (6, 20, 11)]:
        packed, tables, sparse, w, sp = _layer(rng, out_f, in_f, bits, integer=True, nnz=nnz)
        x = _bf16_bits(torch.from_numpy(rng.integers(-4, 5, size=(batch, in_f)).astype(np.float32)))
        y = _C.lut_matmul_bf16(x, packed, tables, bits, in_f, sparse)
        ref, _ = _reference(x, w, sp)
        assert y.dtype == np.float32 and y.shape == (batch, out_f)
        np.testing.assert_array_equal(y.astype(np.float64), ref)


@needs_bf16
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_random_data_within_fp32_summation_bound(bits):
    """|fl32(sum) - sum| <= n*u/(1-n*u) * sum|terms| for any order of n additions
    (n: the terms of the row plus the 16 lanes' final sum)."""
    rng = np.random.default_rng(7 + bits)
    for out_f, in_f, batch, nnz in [(33, 4096, 4, 40), (8, 1000, 17, 0), (5, 77, 1, 3)]:
        packed, tables, sparse, w, sp = _layer(rng, out_f, in_f, bits, integer=False, nnz=nnz)
        x = _bf16_bits(torch.randn(batch, in_f, generator=torch.Generator().manual_seed(bits)))
        y = _C.lut_matmul_bf16(x, packed, tables, bits, in_f, sparse)
        ref, mag = _reference(x, w, sp)
        n = in_f + nnz + 16
        bound = n * U32 / (1 - n * U32) * mag
        assert (np.abs(y - ref) <= bound).all()


@needs_bf16
def test_thread_count_does_not_change_the_result():
    rng = np.random.default_rng(3)
    packed, tables, sparse, _, _ = _layer(rng, 301, 640, 4, integer=False, nnz=30)
    x = _bf16_bits(torch.randn(9, 640))
    y1 = _C.lut_matmul_bf16(x, packed, tables, 4, 640, sparse, num_threads=1)
    y2 = _C.lut_matmul_bf16(x, packed, tables, 4, 640, sparse, num_threads=2)
    np.testing.assert_array_equal(y1, y2)


@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
def test_quantlinear_bf16_input_takes_the_bf16_path(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=bias)
    q = QuantLinear.from_linear(lin, bits=3)
    x = torch.randn(2, 5, 96).to(torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 40)
    xb = _bf16_bits(x.reshape(-1, 96))
    k = torch.from_numpy(_C.lut_matmul_bf16(xb, q.qweight.numpy().view(np.uint32),
                                            q.lookup_table.numpy(), 3, 96))
    if bias:
        k = k + lin.bias.detach()
    assert torch.equal(y.reshape(-1, 40), k.to(torch.bfloat16))
    # below 4 rows the fp32 kernel (x converted exactly to fp32)
    x1 = x[0, :3]
    k1 = torch.from_numpy(_C.lut_matmul(x1.float().numpy(), q.qweight.numpy().view(np.uint32),
                                        q.lookup_table.numpy(), 3, 96))
    if bias:
        k1 = k1 + lin.bias.detach()
    assert torch.equal(q(x1), k1.to(torch.bfloat16))
    # and against the float64 reference over the bf16-rounded weights: the fp32
    # bound, one rounding to bf16 of the result, and the tables' rounding to bf16
    w = q.dequantize().double()
    xd = x.reshape(-1, 96).double()
    ref = F.linear(xd, w, lin.bias.double() if bias else None)
    mag = xd.abs() @ w.abs().T
    bound = (96 + 16) * U32 * mag + U_BF16 * mag + U_BF16 * ref.abs() + 1e-6
    assert ((y.reshape(-1, 40).double() - ref).abs() <= bound).all()


def test_quantlinear_bf16_falls_back_to_fp32_path(monkeypatch):
    """Without the bf16 kernel (or for formats it does not cover: column
    grouping, 1 bit, more than 4 bits) bf16 inputs go through the fp32 kernel."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 24)
    x = torch.randn(7, 64).to(torch.bfloat16)
    cases = [(QuantLinear.from_linear(lin, bits=4), False),
             (QuantLinear.from_linear(lin, bits=4, group_axis="column"), True),
             (QuantLinear.from_linear(lin, bits=1), True),
             (QuantLinear.from_linear(lin, bits=5), True)]
    for q, keep_kernel in cases:
        if not keep_kernel:
            monkeypatch.setattr(sqnn, "_HAS_BF16", False)
        y = q(x)
        expect = (torch.from_numpy(_C.lut_matmul(x.float().numpy(), q.qweight.numpy().view(np.uint32),
                                                 q.lookup_table.numpy(), q.bits, 64, q.group_axis))
                  + lin.bias.detach()).to(torch.bfloat16)
        assert torch.equal(y, expect)
        monkeypatch.undo()


@needs_bf16
def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    packed, tables, _, _, _ = _layer(rng, 4, 64, 4, integer=True)
    x = _bf16_bits(torch.randn(2, 64))
    with pytest.raises(ValueError, match="in_features=64"):
        _C.lut_matmul_bf16(_bf16_bits(torch.randn(2, 63)), packed, tables, 4, 64)
    with pytest.raises(ValueError, match="2-D"):
        _C.lut_matmul_bf16(x.reshape(-1), packed, tables, 4, 64)
    p1, t1, _, _, _ = _layer(rng, 4, 64, 1, integer=True)
    with pytest.raises(ValueError, match="2..4-bit"):
        _C.lut_matmul_bf16(x, p1, t1, 1, 64)
    with pytest.raises(ValueError):
        _C.lut_matmul_bf16(x, packed[:, :3], tables, 4, 64)  # codes too short for in_features
    assert _C.lut_matmul_bf16(x[:0], packed, tables, 4, 64).shape == (0, 4)
