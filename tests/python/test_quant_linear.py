"""QuantLinear against F.linear(x, dequantize()) and the quantizer's definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqllm
from sqllm import QuantLinear, _C

EPS32 = float(np.finfo(np.float32).eps)


def _linear(out_f, in_f, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return lin


def _fp32_bound(x, w):
    # |fl32(sum) - sum| <= n * eps * sum |x_i w_i| for any summation order (the
    # standard a-priori bound), plus rounding of the bias add.
    return x.shape[-1] * EPS32 * (x.abs().double() @ w.abs().double().T) + 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("shape", [(7, 33), (64, 96), (5, 1)])
def test_forward_equals_linear_of_dequantized(bits, axis, shape):
    lin = _linear(*shape, seed=bits)
    sens = torch.rand(shape) ** 2
    q = QuantLinear.from_linear(lin, bits=bits, sensitivity=sens, group_axis=axis)
    w = q.dequantize()
    assert w.shape == shape and w.dtype == torch.float32
    for batch in [(1,), (3,), (2, 5), ()]:
        x = torch.randn(*batch, shape[1])
        y = q(x)
        ref = F.linear(x.double(), w.double(), lin.bias.double())
        assert y.shape == (*batch, shape[0]) and y.dtype == torch.float32
        bound = _fp32_bound(x.reshape(-1, shape[1]), w).reshape(ref.shape)
        assert ((y.double() - ref).abs() <= bound).all()


def test_dequantize_uses_at_most_2_pow_bits_values_per_group():
    lin = _linear(16, 40)
    for axis, dim in (("row", 1), ("column", 0)):
        q = QuantLinear.from_linear(lin, bits=3, group_axis=axis)
        w = q.dequantize()
        groups = w if dim == 1 else w.T
        for g, t in zip(groups, q.lookup_table):
            assert set(g.tolist()) <= set(t.tolist())
            assert len(set(g.tolist())) <= 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_input_dtype(dtype):
    lin = _linear(24, 40)
    q = QuantLinear.from_linear(lin, bits=4)
    x = torch.randn(3, 40).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    ref = F.linear(x.double(), q.dequantize().double(), lin.bias.double())
    # One rounding of the fp32 result to the output dtype (relative eps/2), plus
    # the fp32 accumulation bound.
    eps = torch.finfo(dtype).eps
    bound = ref.abs() * eps + _fp32_bound(x.float(), q.dequantize())
    if dtype is torch.bfloat16 and q._bf16_path() and x.shape[0] >= 4:
        # bf16 inputs on a CPU with AVX512-BF16 multiply in bf16: the tables
        # are rounded to bf16 too (relative 2^-8 per weight; test_lut_bf16.py)
        bound = bound + 2.0 ** -8 * (x.abs().double() @ q.dequantize().abs().double().T)
    assert ((y.double() - ref).abs() <= bound).all()


def test_empty_batch_and_noncontiguous_input():
    lin = _linear(6, 32)
    q = QuantLinear.from_linear(lin, bits=3)
    assert q(torch.empty(0, 32)).shape == (0, 6)
    x = torch.randn(32, 5).T  # non-contiguous
    ref = F.linear(x.double(), q.dequantize().double(), lin.bias.double())
    assert torch.allclose(q(x).double(), ref, atol=1e-5, rtol=0)


def test_gradient_flows_to_input():
    lin = _linear(6, 32)
    q = QuantLinear.from_linear(lin, bits=3)
    x = torch.randn(4, 32, requires_grad=True)
    q(x).sum().backward()
    expect = q.dequantize().sum(0).expand(4, -1)
    assert torch.allclose(x.grad, expect, atol=1e-6)


def test_state_dict_round_trip_and_to():
    lin = _linear(10, 70)
    q = QuantLinear.from_linear(lin, bits=3, sparsity=0.05)
    assert q.nnz > 0
    q2 = QuantLinear.from_config(q.layer_config())
    q2.load_state_dict(q.state_dict())
    x = torch.randn(2, 70)
    assert torch.equal(q(x), q2(x))
    q3 = QuantLinear.from_config({**q.layer_config(), "nnz": 0})  # resized on load
    q3.load_state_dict(q.state_dict())
    assert torch.equal(q(x), q3(x))
    q.to(torch.float16)  # tables follow the module dtype; the math stays fp32
    y = q(x.half())
    assert y.dtype == torch.float16


def test_weighted_kmeans_minimises_the_fisher_weighted_error():
    torch.manual_seed(0)
    lin = _linear(32, 128)
    sens = torch.rand(32, 128) ** 4  # very uneven sensitivities
    w = lin.weight.detach()
    weighted = QuantLinear.from_linear(lin, bits=3, sensitivity=sens).dequantize()
    plain = QuantLinear.from_linear(lin, bits=3).dequantize()
    err_w = (sens * (w - weighted) ** 2).sum(1)
    err_p = (sens * (w - plain) ** 2).sum(1)
    # The exact weighted k-means is optimal for the weighted objective, row by row.
    assert (err_w <= err_p * (1 + 1e-5) + 1e-12).all()
    assert err_w.sum() < err_p.sum()


def test_sparse_part_holds_the_chosen_values_and_never_hurts():
    torch.manual_seed(1)
    lin = _linear(48, 200)
    with torch.no_grad():
        lin.weight[3, 7] = 4.0  # an outlier
    sens = torch.rand(48, 200) ** 2
    w = lin.weight.detach()
    dense = QuantLinear.from_linear(lin, bits=3, sensitivity=sens)
    sparse = QuantLinear.from_linear(lin, bits=3, sensitivity=sens, sparsity=0.0045 * 4)
    keep = torch.from_numpy(_C.sparse_select(w.numpy(), sens.numpy(), 0.0045 * 4, 1 / 9)).bool()
    assert sparse.nnz == int(keep.sum()) == round(0.018 * w.numel())
    assert keep[3, 7]
    wq = sparse.dequantize()
    # Kept values are reproduced up to the fp16 rounding of their residual.
    assert torch.allclose(wq[keep], w[keep], rtol=0, atol=2e-3 * w.abs().max().item())
    e_dense = (sens * (w - dense.dequantize()) ** 2).sum()
    e_sparse = (sens * (w - wq) ** 2).sum()
    assert e_sparse <= e_dense
    x = torch.randn(5, 200)
    ref = F.linear(x.double(), wq.double(), lin.bias.double())
    assert ((sparse(x).double() - ref).abs() <= _fp32_bound(x, wq)).all()


def test_bits_per_weight_accounts_for_tables_and_sparse_part():
    lin = _linear(64, 256, bias=False)
    q = QuantLinear.from_linear(lin, bits=3)
    expect = (64 * 24 * 32 + 64 * 8 * 32 + 65 * 32) / (64 * 256)
    assert q.bits_per_weight() == pytest.approx(expect)
    qs = QuantLinear.from_linear(lin, bits=3, sparsity=0.01)
    assert qs.bits_per_weight() == pytest.approx(expect + qs.nnz * 48 / (64 * 256))


def test_bad_inputs_raise_clear_errors():
    lin = _linear(4, 32)
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="bits must be in 1..8, got 9"):
        QuantLinear.from_linear(lin, bits=9)
    with pytest.raises(TypeError, match="bits must be an int"):
        QuantLinear.from_linear(lin, bits=3.0)
    with pytest.raises(ValueError, match="group_axis"):
        QuantLinear.from_linear(lin, group_axis="diagonal")
    with pytest.raises(ValueError, match="sensitivity shape"):
        QuantLinear.from_linear(lin, sensitivity=torch.ones(3, 3))
    with pytest.raises(ValueError, match="sensitivity must be finite and >= 0"):
        QuantLinear.from_linear(lin, sensitivity=-torch.ones(4, 32))
    with pytest.raises(ValueError, match="sparsity"):
        QuantLinear.from_linear(lin, sparsity=1.5)
    with pytest.raises(ValueError, match="kmeans|method"):
        QuantLinear.from_linear(lin, kmeans="spectral")
    bad = _linear(4, 32)
    with torch.no_grad():
        bad.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantLinear.from_linear(bad)
    q = QuantLinear.from_linear(lin, bits=3)
    with pytest.raises(TypeError, match="dtype"):
        q(torch.ones(2, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="in_features=32"):
        q(torch.ones(2, 31))
    with pytest.raises(ValueError, match="in_features and out_features"):
        QuantLinear(0, 4)
    with pytest.raises(ValueError, match="unknown quantized layer format"):
        sqllm.nn.layer_from_config({"format": "nope"})
    q.qweight = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="qweight"):
        q.validate()


def test_corrupt_sparse_part_is_rejected():
    lin = _linear(6, 40)
    q = QuantLinear.from_linear(lin, bits=3, sparsity=0.1)
    sd = q.state_dict()
    sd["sparse_col_idx"] = sd["sparse_col_idx"].clone()
    sd["sparse_col_idx"][0] = 40  # out of range
    q2 = QuantLinear.from_config(q.layer_config())
    q2.load_state_dict(sd)
    with pytest.raises(ValueError, match="out of range"):
        q2(torch.ones(1, 40))
    sd["sparse_col_idx"][0] = 0
    sd["sparse_col_idx"][:2] = torch.tensor([5, 3])  # unsorted within row 0
    q2.load_state_dict(sd)
    with pytest.raises(ValueError, match="strictly increasing|out of range"):
        q2.validate()


def test_cached_operands_follow_in_place_changes_moves_and_pickling():
    import gc
    import io
    import weakref

    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(0))
    q0 = QuantLinear.from_linear(_linear(24, 80, bias=False, seed=3), bits=3, sparsity=0.02)
    with torch.no_grad():
        y1 = q0(x)
        q0.lookup_table.mul_(2.0)  # in place: the cached views must see it
        q0.sparse_values.mul_(2.0)
        y2 = q0(x)
    # Doubling every weight doubles each fp32 product and partial sum exactly.
    assert torch.equal(y2, 2 * y1)

    q = QuantLinear.from_linear(_linear(24, 80, bias=True, seed=3), bits=3, sparsity=0.02)
    # Dtype casts move the bias but never the format's own buffers.
    for cast in (lambda m: m.to(torch.float64), lambda m: m.half(), lambda m: m.float()):
        cast(q)
        assert q.lookup_table.dtype == torch.float32 and q.sparse_values.dtype == torch.float16
        assert q.qweight.dtype == torch.int32
    assert q.bias.dtype == torch.float32
    # The bias went through fp16 (.half()) and back; the weights did not move.
    q_ref = QuantLinear.from_linear(_linear(24, 80, bias=True, seed=3), bits=3, sparsity=0.02)
    with torch.no_grad():
        q_ref.bias.copy_(q.bias)
    assert torch.equal(q(x), q_ref(x))
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    q2 = torch.load(buf, weights_only=False)
    assert torch.equal(q2(x), q(x))
    with pytest.raises(ValueError, match="buffers are on cpu"):
        q(torch.empty(2, 80, device="meta"))
    # Moving the layer releases the old buffers (the cache holds none of them).
    old = weakref.ref(q.qweight)
    q.to("meta")
    gc.collect()
    assert old() is None
