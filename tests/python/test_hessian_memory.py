"""The memory-lean Hessian path: the packed symmetric compensated sum and GPTQ on H's memory.

* ``SymmetricCompensatedSum`` keeps the upper triangle of Σ XᵀX in row blocks;
  checked against an extended-precision reference for widths around the block
  size, for exact symmetry, for its packed pair (what distributed runs merge), and
  for order independence;
* ``overwrite_hessian=True`` runs GPTQ in the Hessian's own memory: the result
  must be bit-identical to the copying path; non-owned / read-only / wrong-dtype
  Hessians are refused or left alone.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sqllm
from sqllm import _C
from sqllm.calib import HessianCollector, find_decoder_blocks, stream_quantize
from sqllm.calib.compensated import SymmetricCompensatedSum, _width_of
from sqllm.gptq import take_hessian
from sqllm.methods import get_method

from conftest import make_tiny_llama

R = SymmetricCompensatedSum.ROWS


def _batches(n: int, seed: int, count: int = 3, rows: int = 40):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((rows, n))
    out = []
    for k in range(count):  # correlated columns, varied scales
        x = base * rng.uniform(0.5, 2.0) + rng.standard_normal((rows, n)) * 0.3
        x[:, :: max(1, n // 5)] *= 100.0
        out.append(x)
    return out


@pytest.mark.parametrize("n", [1, 7, R - 1, R, R + 1, 2 * R + 37])
def test_symmetric_sum_equals_extended_precision_gram(n):
    xs = _batches(n, seed=n)
    acc = SymmetricCompensatedSum(n)
    for x in xs:
        acc.add_gram(torch.from_numpy(x))
    packed = acc.pair()
    H = acc.take().numpy()
    ref = sum(x.astype(np.longdouble).T @ x.astype(np.longdouble) for x in xs)
    mag = sum(np.abs(x).T @ np.abs(x) for x in xs)
    # Each batch's product is a float64 dot of `rows` terms: |error| <= rows*u*Σ|x_i x_j|
    # (the standard dot-product bound); the compensated sum over batches adds ~u*|H|.
    rows = xs[0].shape[0]
    bound = (rows + 2) * 2.0 ** -53 * mag
    assert np.all(np.abs(H - ref.astype(np.float64)) <= bound)
    assert np.array_equal(H, H.T)  # exactly symmetric, by construction
    # The packed pair (what ranks exchange) gives the same matrix, bit for bit.
    assert packed[0].shape == (SymmetricCompensatedSum.packed_len(n),)
    assert torch.equal(SymmetricCompensatedSum.finish_packed(*packed), torch.from_numpy(H))


def test_symmetric_sum_does_not_depend_on_the_batch_order():
    n = R + 20
    xs = _batches(n, seed=5, count=6)
    a, b = SymmetricCompensatedSum(n), SymmetricCompensatedSum(n)
    for x in xs:
        a.add_gram(torch.from_numpy(x))
    for x in reversed(xs):
        b.add_gram(torch.from_numpy(x))
    assert torch.equal(a.take(), b.take())


def test_symmetric_sum_memory_is_one_triangle_pair():
    n = 3 * R + 5
    acc = SymmetricCompensatedSum(n)
    stored = sum(h.numel() for h in acc.hi) + sum(l.numel() for l in acc.lo)
    # the pair of upper triangles plus the lower halves of the diagonal blocks
    assert stored == 2 * SymmetricCompensatedSum.packed_len(n)
    assert stored <= n * (n + 1) + n * R
    H = acc.take()
    assert acc.hi == [] and acc.lo == [] and H.shape == (n, n)


def test_packed_width_is_recovered_and_bad_lengths_are_refused():
    for n in [1, 2, 255, 256, 257, 1000, 11008]:
        assert _width_of(SymmetricCompensatedSum.packed_len(n), SymmetricCompensatedSum.packed_len) == n
    with pytest.raises(ValueError, match="matches no matrix width"):
        _width_of(SymmetricCompensatedSum.packed_len(300) + 1, SymmetricCompensatedSum.packed_len)


def test_hessian_collector_shares_products_only_between_same_width_layers():
    torch.manual_seed(0)
    a, b, c = torch.nn.Linear(16, 8), torch.nn.Linear(16, 4), torch.nn.Linear(24, 16)
    coll = HessianCollector()
    coll.attach({"a": a, "b": b, "c": c})
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        a(x)
        b(x)  # same input: the cached blocks are reused
        h = torch.randn(2, 24)
        c(h)
    coll.detach()
    st = coll.publish({n: coll.layer_state(n) for n in ("a", "b", "c")})
    X = x.reshape(-1, 16).double()
    torch.testing.assert_close(st["hessian"]["a"], X.T @ X, rtol=1e-13, atol=1e-13)
    assert torch.equal(st["hessian"]["a"], st["hessian"]["b"])
    H = h.double()
    torch.testing.assert_close(st["hessian"]["c"], H.T @ H, rtol=1e-13, atol=1e-13)
    assert st["hessian_count"] == {"a": 15, "b": 15, "c": 2}
    assert st["hessian_owned"] == {"a": True, "b": True, "c": True}


# -- GPTQ in the Hessian's memory --------------------------------------------------------------

@pytest.mark.parametrize("out,inp,gs,act", [(13, 75, -1, False), (21, 130, 32, True),
                                            (9, 300, 64, True), (4, 5, -1, True)])
def test_overwrite_hessian_gives_the_same_result(out, inp, gs, act):
    rng = np.random.default_rng(inp)
    W = rng.standard_normal((out, inp)).astype(np.float32)
    X = rng.standard_normal((2 * inp, inp)) @ rng.standard_normal((inp, inp))
    X[:, 1] = 0.0  # a dead column
    H = X.T @ X
    ref = sqllm.gptq_quantize(W, H, bits=3, group_size=gs, act_order=act, return_result=True)
    H2 = torch.empty(inp, inp, dtype=torch.float64)  # torch's allocator: aligned
    H2.copy_(torch.from_numpy(H))
    got = sqllm.gptq_quantize(W, H2, bits=3, group_size=gs, act_order=act, return_result=True,
                              overwrite_hessian=True)
    assert got.hessian_overwritten and not ref.hessian_overwritten
    assert np.array_equal(got.qweight, ref.qweight)
    assert torch.equal(got.weight, ref.weight)
    assert got.proxy_error == ref.proxy_error
    assert not np.array_equal(H2.numpy(), H)  # the memory was used
    # Memory that is not aligned like Eigen's: copied, so the result cannot
    # depend on the address (Eigen's reductions split their sums by it).
    buf = np.empty(inp * inp + 1)
    H3 = buf[1:].reshape(inp, inp)
    H3[...] = H
    mis = sqllm.gptq_quantize(W, H3, bits=3, group_size=gs, act_order=act, return_result=True,
                              overwrite_hessian=True)
    assert not mis.hessian_overwritten and np.array_equal(H3, H)
    assert np.array_equal(mis.qweight, ref.qweight) and mis.proxy_error == ref.proxy_error
    tables = np.sort(rng.standard_normal((out, 8)).astype(np.float32), axis=1)
    p1 = _C.gptq_lut(W, H, tables, 3, act_order=act)
    H4 = torch.empty(inp, inp, dtype=torch.float64)
    H4.copy_(torch.from_numpy(H))
    p2 = _C.gptq_lut(W, H4.numpy(), tables, 3, act_order=act, overwrite_hessian=True)
    assert np.array_equal(p1[0], p2[0]) and np.array_equal(p1[1], p2[1]) and p1[2] == p2[2]


def test_overwrite_hessian_refuses_what_it_cannot_own():
    W = np.ones((3, 10), np.float32)
    H = np.eye(10)
    ro = H.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        sqllm.gptq_quantize(W, ro, overwrite_hessian=True)
    with pytest.raises(ValueError, match="float64"):
        sqllm.gptq_quantize(W, H.astype(np.float32), overwrite_hessian=True)
    with pytest.raises(ValueError, match="contiguous"):
        sqllm.gptq_quantize(W, torch.eye(20, dtype=torch.float64)[::2, ::2], overwrite_hessian=True)
    with pytest.raises(ValueError, match="writable"):
        _C.gptq_lut(W, ro, np.zeros((3, 4), np.float32), 2, overwrite_hessian=True)


def test_take_hessian_only_hands_over_what_the_run_owns():
    H = torch.eye(4, dtype=torch.float64)
    user = {"hessian": {"l": H}, "hessian_count": {"l": 10}}
    h, owned = take_hessian(user, "l")
    assert h is H and not owned and "l" in user["hessian"]  # left in place, never overwritten
    mine = {"hessian": {"l": H.clone()}, "hessian_count": {"l": 10}, "hessian_owned": {"l": True}}
    h, owned = take_hessian(mine, "l")
    assert owned and "l" not in mine["hessian"] and "l" not in mine["hessian_owned"]


def test_streamed_gptq_leaves_precomputed_hessians_intact(calib_ids):
    # Statistics handed in by the caller are used, never overwritten.
    model = make_tiny_llama()
    blocks_name, blocks = find_decoder_blocks(model)
    layers = sqllm.find_linear_layers(model, exclude=("lm_head",))
    from sqllm.gptq import collect_hessians

    pre = collect_hessians(make_tiny_llama(), layers, calib_ids, progress=False)
    before = {k: v.clone() for k, v in pre["hessian"].items()}
    qm = get_method("gptq")(bits=4, group_size=32)
    stream_quantize(model, qm, calib_ids, precomputed={k: dict(v) for k, v in pre.items()},
                    fp_inputs=True, progress=False)
    for k, v in pre["hessian"].items():
        assert torch.equal(v, before[k]), k
    assert isinstance(model.model.layers[0].mlp.down_proj, sqllm.UniformQuantLinear)


def test_written_blocks_keep_no_quantized_weights_alive(tmp_path, calib_ids):
    # A block handed to the writer is released to meta; its quantized layers ran
    # forward (the next block's inputs) and cached kernel operands -- views of
    # the packed buffers -- which must go too, or every written block stays resident.
    src = tmp_path / "src"
    make_tiny_llama().save_pretrained(src)
    model = sqllm.open_on_meta(src)
    sqllm.quantize(model, method="gptq", bits=4, group_size=32, calibration=calib_ids,
                   progress=False, out=tmp_path / "q")
    quantized = [m for m in model.modules() if isinstance(m, sqllm.nn.QuantLinearBase)]
    assert len(quantized) == 2 * 7  # every Linear of both blocks (lm_head excluded)
    for m in quantized:
        assert m._cache == {}
        assert all(b is None or b.is_meta for b in m._buffers.values())
