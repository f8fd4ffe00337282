"""GPTQ and the uniform format.

The C++ engine (blocked, lazy updates, inverse factor from one Cholesky) is
compared with a straightforward float64 NumPy GPTQ written here (every update
applied at once, np.linalg.inv + cholesky); the uniform CPU kernel with a
float64 product of the dequantized weight; save -> load with logits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sqllm
from sqllm import _C
from sqllm.gptq import collect_hessians

from conftest import make_tiny_llama

# ---------------------------------------------------------------------------
# A plain NumPy GPTQ: the algorithm as written in the paper, no blocking.


def _np_grid(x: np.ndarray, bits: int, sym: bool):
    """Per-row (scale, zero) of GPTQ's min-max rule, scale rounded to fp16."""
    maxq = 2 ** bits - 1
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = np.maximum(x.max(axis=1), 0.0)
    if sym:
        hi = np.maximum(np.abs(lo), hi)
        lo = np.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo[empty], hi[empty] = -1.0, 1.0
    scale = ((hi - lo) / maxq).astype(np.float32).astype(np.float16).astype(np.float64)
    if sym:
        zero = np.full_like(scale, (maxq + 1) // 2)
    else:
        zero = np.clip(np.round(-lo / scale), 0, maxq)
    return scale, zero


def _np_quant(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int):
    q = np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1)
    return q, scale * (q - zero)


def np_gptq(W, H, bits, group_size=-1, act_order=False, static_groups=False, sym=False,
            percdamp=0.01):
    """Returns (codes [out, in] in original order, Q, proxy error)."""
    W0 = W.astype(np.float64)
    H0 = H.astype(np.float64)
    W = W0.copy()
    H = (H0 + H0.T) / 2
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = group_size if group_size > 0 else cols
    static = {}
    if group_size > 0 and static_groups:
        for g in range(0, cols, gs):
            static[g // gs] = _np_grid(W[:, g:g + gs], bits, sym)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    W = W[:, perm]
    H = H[perm][:, perm]
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(cols)
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # H^-1 = U^T U
    Q = np.zeros_like(W)
    C = np.zeros_like(W)
    grid = None
    for j in range(cols):
        if group_size > 0 and static_groups:
            grid = static[perm[j] // gs]
        elif j % gs == 0:
            grid = _np_grid(W[:, j:j + gs], bits, sym)
        C[:, j], Q[:, j] = _np_quant(W[:, j], *grid, bits)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j + 1:] -= np.outer(err, U[j, j + 1:])
    codes = np.empty_like(C)
    codes[:, perm] = C
    Qo = np.empty_like(Q)
    Qo[:, perm] = Q
    dW = W0 - Qo
    return codes.astype(np.int64), Qo, float(np.einsum("ri,ij,rj->", dW, H0, dW))


def correlated_x(n, cols, seed, rho=0.8):
    """Rows of an AR(1) process along the features: strongly correlated inputs."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, cols))
    x = np.empty_like(z)
    x[:, 0] = z[:, 0]
    for c in range(1, cols):
        x[:, c] = rho * x[:, c - 1] + z[:, c]
    return x * rng.uniform(0.2, 3.0, size=cols)  # unequal scales: act-order has work to do


def proxy(W, Q, H):
    dW = W.astype(np.float64) - Q.astype(np.float64)
    return float(np.einsum("ri,ij,rj->", dW, H, dW))


CASES = [  # out, in, bits, group_size, act_order, static_groups, sym, blocksize
    (13, 75, 4, -1, False, False, False, 128),
    (13, 75, 3, -1, True, False, False, 16),
    (21, 130, 4, 32, False, False, False, 50),
    (21, 130, 3, 32, True, False, False, 128),
    (21, 130, 4, 64, True, True, False, 40),
    (9, 200, 2, 128, True, False, True, 64),
    (9, 200, 8, 32, False, True, True, 7),
    (5, 97, 4, 32, True, True, False, 128),
]


@pytest.mark.parametrize("out,inp,bits,gs,act,static,sym,bs", CASES)
def test_gptq_equals_plain_numpy_gptq(out, inp, bits, gs, act, static, sym, bs):
    rng = np.random.default_rng(out * 1000 + inp + bits)
    W = rng.standard_normal((out, inp)).astype(np.float32)
    X = correlated_x(3 * inp, inp, seed=inp + bits)
    H = 2.0 * X.T @ X / X.shape[0]
    res = sqllm.gptq_quantize(W, H, bits=bits, group_size=gs, act_order=act, blocksize=bs,
                              static_groups=static, sym=sym, return_result=True)
    codes, Q, err = np_gptq(W, H, bits, gs, act, static, sym)
    got = _C.unpack_codes(res.qweight, inp, bits).astype(np.int64)
    assert np.array_equal(got, codes)
    np.testing.assert_allclose(res.weight.numpy(), Q.astype(np.float32), rtol=0, atol=0)
    assert res.proxy_error == pytest.approx(err, rel=1e-6)
    assert res.proxy_error == pytest.approx(proxy(W, res.weight.numpy(), H), rel=1e-6)
    # The layer these codes make dequantizes to the same weight.
    layer = res.to_layer()
    assert torch.equal(layer.dequantize(), res.weight)
    assert (layer.g_idx is not None) == (act and not static and gs > 0)


def test_gptq_dead_columns_and_hessian_scale():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((11, 60)).astype(np.float32)
    X = correlated_x(200, 60, seed=4)
    X[:, [5, 17]] = 0.0  # inputs that never fire
    H = X.T @ X
    res = sqllm.gptq_quantize(W, H, bits=3, group_size=32, act_order=True, return_result=True)
    codes, Q, err = np_gptq(W, H, 3, 32, True)
    assert np.array_equal(_C.unpack_codes(res.qweight, 60, 3), codes)
    assert res.proxy_error == pytest.approx(err, rel=1e-6)
    assert np.all(res.weight.numpy()[:, [5, 17]] == 0)
    # Damping is relative: any positive multiple of H gives the same codes.
    res2 = sqllm.gptq_quantize(W, 37.0 * H, bits=3, group_size=32, act_order=True,
                               return_result=True)
    assert np.array_equal(res2.qweight, res.qweight)


def test_gptq_same_result_for_any_thread_count():
    rng = np.random.default_rng(9)
    W = rng.standard_normal((300, 150)).astype(np.float32)  # several row chunks
    X = correlated_x(300, 150, seed=10)
    H = X.T @ X
    runs = [sqllm.gptq_quantize(W, H, bits=3, group_size=32, act_order=True, blocksize=40,
                                return_result=True, num_threads=t) for t in (1, 2, 3)]
    for r in runs[1:]:
        assert np.array_equal(r.qweight, runs[0].qweight)
        assert torch.equal(r.weight, runs[0].weight)
        assert r.proxy_error == runs[0].proxy_error


def test_gptq_returns_a_tensor_and_accepts_torch():
    W = torch.randn(8, 64)
    H = torch.eye(64, dtype=torch.float64)
    out = sqllm.gptq_quantize(W, H, bits=4)
    assert isinstance(out, torch.Tensor) and out.shape == (8, 64) and out.dtype == torch.float32
    # identity Hessian: no feedback, so this is RTN
    packed, scales, zeros = _C.uniform_rtn(W.numpy(), 4, -1, False)
    rtn = _C.uniform_dequantize(packed, scales, zeros, None, 4, -1, 64)
    assert torch.equal(out, torch.from_numpy(rtn))


@pytest.mark.parametrize("kwargs,H_fix,match", [
    ({}, lambda H: H * np.nan, "Hessian contains NaN or Inf"),
    ({}, lambda H: H - 10 * np.eye(len(H)) * H.diagonal().max(), "not positive semi-definite"),
    ({}, lambda H: H + np.diag(np.ones(len(H) - 1) * 50 * H.max(), 1)
     + np.diag(np.ones(len(H) - 1) * 50 * H.max(), -1), "not positive definite even after damping"),
    ({}, lambda H: H[:-1, :-1], r"hessian must have shape \(in_features, in_features\) = \(40, 40\)"),
    ({"bits": 9}, lambda H: H, "bits must be in 2..8, got 9"),
    ({"bits": 1}, lambda H: H, "bits must be in 2..8, got 1"),
    ({"group_size": 48}, lambda H: H, "group_size must be -1"),
    ({"blocksize": 0}, lambda H: H, "blocksize must be >= 1"),
    ({"percdamp": -0.5}, lambda H: H, "percdamp must be finite and >= 0"),
])
def test_gptq_bad_inputs_raise_clear_errors(kwargs, H_fix, match):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 40)).astype(np.float32)
    X = correlated_x(100, 40, seed=1)
    H = H_fix(X.T @ X)
    with pytest.raises(ValueError, match=match):
        sqllm.gptq_quantize(W, H, **kwargs)


def test_gptq_rejects_bad_weights():
    H = np.eye(10)
    W = np.ones((3, 10), np.float32)
    W[1, 2] = np.inf
    with pytest.raises(ValueError, match="weight contains NaN or Inf at row 1, column 2"):
        sqllm.gptq_quantize(W, H)
    with pytest.raises(ValueError, match="W must be 2-D"):
        sqllm.gptq_quantize(np.ones(10, np.float32), H)
    with pytest.raises(TypeError, match="W must be a torch.Tensor or numpy array"):
        sqllm.gptq_quantize([[1.0]], H)


# ---------------------------------------------------------------------------
# Packing, kernel, layer.


def test_pack_codes32_round_trip_every_width():
    rng = np.random.default_rng(5)
    for bits in range(1, 33):
        codes = rng.integers(0, 2 ** bits, size=(3, 77), dtype=np.uint64).astype(np.uint32)
        packed = _C.pack_codes32(codes, bits)
        assert packed.shape == (3, _C.packed_words(77, bits) if bits <= 8 else -(-77 * bits // 32))
        assert np.array_equal(_C.unpack_codes32(packed, 77, bits), codes)
        if bits <= 8:  # the <= 8-bit layout is unchanged
            assert np.array_equal(_C.pack_codes(codes.astype(np.uint8), bits), packed)
    with pytest.raises(ValueError, match="code bits must be in 1..32, got 33"):
        _C.pack_codes32(np.zeros((1, 4), np.uint32), 33)
    with pytest.raises(ValueError, match="does not fit in 5 bits"):
        _C.pack_codes32(np.full((1, 4), 32, np.uint32), 5)


#: fp32 unit roundoff.
U32 = 2.0 ** -24


def fp32_dot_bound(n: int) -> float:
    """Worst-case |fp32 dot - exact| / sum|x_i w_i| for n terms: one rounding
    of s*(q - z), one per product, n - 1 in the running sum (first order)."""
    return (n + 2) * U32


@pytest.mark.parametrize("bits,gs,act", [(4, -1, False), (3, 32, True), (2, 64, False),
                                         (8, 128, True), (5, 32, False)])
@pytest.mark.parametrize("batch", [1, 3, 70])
def test_uniform_kernel_matches_float64(bits, gs, act, batch):
    out, inp = 29, 193
    rng = np.random.default_rng(bits * 10 + batch)
    W = rng.standard_normal((out, inp)).astype(np.float32)
    H = correlated_x(400, inp, seed=2).T @ correlated_x(400, inp, seed=2)
    layer = sqllm.gptq_quantize(W, H, bits=bits, group_size=gs, act_order=act,
                                return_result=True).to_layer(bias=torch.randn(out))
    x = torch.randn(batch, inp)
    y = layer(x)
    w64 = layer.dequantize().double()
    ref = x.double() @ w64.T
    bound = fp32_dot_bound(inp) * (x.double().abs() @ w64.abs().T) + \
        U32 * (ref + layer.bias.double()).abs()  # the bias add: one more rounding
    assert torch.all((y.double() - ref - layer.bias.double()).abs() <= bound)
    # non-contiguous input of another dtype and leading shape
    xt = torch.randn(inp, 2, batch).permute(1, 2, 0)
    assert torch.equal(layer(xt), layer(xt.contiguous()))


def test_uniform_layer_validates_and_keeps_fp16_grids():
    W = torch.randn(16, 64)
    layer = sqllm.gptq_quantize(W, torch.eye(64, dtype=torch.float64), bits=4, group_size=32,
                                return_result=True).to_layer()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.zeros.dtype == torch.float16
    layer.zeros[0, 0] = 99.0
    layer._checked = False
    with pytest.raises(ValueError, match="zero at row 0, group 0 must be in"):
        layer(torch.randn(1, 64))
    with pytest.raises(ValueError, match="group_size must be -1"):
        sqllm.UniformQuantLinear(64, 16, 4, group_size=16)


# ---------------------------------------------------------------------------
# Methods on a tiny model.


def _correlate_embeddings(model: torch.nn.Module, seed: int = 0) -> None:
    """Make every decoder input strongly correlated across features."""
    emb = model.get_input_embeddings().weight
    x = correlated_x(emb.shape[0], emb.shape[1], seed=seed, rho=0.9)
    with torch.no_grad():
        emb.copy_(torch.from_numpy(x).float())


def test_collected_hessian_is_xtx_of_the_inputs(calib_ids):
    model = make_tiny_llama()
    layers = sqllm.find_linear_layers(model)
    name = "model.layers.1.mlp.down_proj"
    seen = []
    h = layers[name].register_forward_hook(lambda m, i, o: seen.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    stats = collect_hessians(model, layers, calib_ids[:3], progress=False)
    h.remove()
    X = torch.cat(seen).double()
    assert stats["hessian_count"][name] == X.shape[0] == 3 * calib_ids.shape[1]
    torch.testing.assert_close(stats["hessian"][name], X.T @ X, rtol=1e-12, atol=1e-12)
    assert stats["hessian"][name].dtype == torch.float64


@pytest.mark.parametrize("gs,act", [(-1, False), (32, True)])
def test_gptq_proxy_error_below_rtn_on_every_layer(calib_ids, gs, act):
    model = make_tiny_llama()
    _correlate_embeddings(model)
    layers = sqllm.find_linear_layers(model)
    stats = collect_hessians(model, layers, calib_ids, progress=False)
    for name, lin in layers.items():
        H = (2.0 * stats["hessian"][name] / stats["hessian_count"][name]).numpy()
        W = lin.weight.detach().numpy()
        packed, scales, zeros = _C.uniform_rtn(W, 3, gs, False)
        rtn = _C.uniform_dequantize(packed, scales, zeros, None, 3, gs, W.shape[1])
        g = sqllm.gptq_quantize(W, H, bits=3, group_size=gs, act_order=act, return_result=True)
        assert g.proxy_error < proxy(W, rtn, H), name


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gptq_method_save_load_identical_logits(tmp_path, calib_ids):
    model = make_tiny_llama()
    sqllm.quantize(model, method="gptq", bits=4, group_size=32, act_order=True,
                   calibration=calib_ids, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, sqllm.UniformQuantLinear) and q.g_idx is not None
    cfg = model.config.quantization_config
    assert cfg["method"] == "gptq" and cfg["layers"]["model.layers.0.self_attn.q_proj"]["format"] == "uniform"
    before = _logits(model, calib_ids[:2])
    loaded = sqllm.load_quantized(sqllm.save_quantized(model, tmp_path / "g"))
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, sqllm.UniformQuantLinear)
    assert torch.equal(_logits(loaded, calib_ids[:2]), before)


def test_rtn_method_is_uniform_and_needs_no_calibration(tmp_path):
    model = make_tiny_llama()
    sqllm.quantize(model, method="rtn", bits=4, group_size=64, sym=True, progress=False)
    layer = model.model.layers[1].mlp.up_proj
    assert isinstance(layer, sqllm.UniformQuantLinear) and layer.group_size == 64
    assert torch.all(layer.zeros == 8)
    ids = torch.randint(0, 256, (1, 16))
    before = _logits(model, ids)
    loaded = sqllm.load_quantized(sqllm.save_quantized(model, tmp_path / "r"))
    assert torch.equal(_logits(loaded, ids), before)
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        sqllm.quantize(make_tiny_llama(), method="rtn", bits=1, progress=False)
    with pytest.raises(ValueError, match="gptq.* needs calibration data"):
        sqllm.quantize(make_tiny_llama(), method="gptq", progress=False)


def test_squeezellm_with_gptq_feedback_lowers_the_proxy_error(calib_ids):
    from sqllm.methods import SqueezeLLM

    model = make_tiny_llama()
    _correlate_embeddings(model)
    layers = sqllm.find_linear_layers(model)
    plain = SqueezeLLM(bits=3, weighted=False)
    fb = SqueezeLLM(bits=3, weighted=False, gptq=True)
    assert fb.required_stats() == ("hessian",) and fb.needs_calibration
    stats = fb.collect(model, layers, calib_ids, progress=False)
    for name, lin in layers.items():
        H = (2.0 * stats["hessian"][name] / stats["hessian_count"][name]).numpy()
        W = lin.weight.detach().numpy()
        a = plain.quantize_layer(name, lin, stats)
        b = fb.quantize_layer(name, lin, stats)
        assert torch.equal(a.lookup_table, b.lookup_table)  # same tables, other codes
        wb = b.dequantize().numpy()
        assert proxy(W, wb, H) < proxy(W, a.dequantize().numpy(), H), name
    with pytest.raises(ValueError, match="dense-only"):
        SqueezeLLM(gptq=True, sparsity=0.01)
