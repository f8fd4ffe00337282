"""The grouped-lookup-table format (glut): decode, kernel, layer, feedback, allocation."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import sqllm
from sqllm import _C
from sqllm.allocate import solve_mckp
from sqllm.glut import GLUT, glut_quantize
from sqllm.nn_glut import GlutQuantLinear, glut_bits_per_weight, glut_dequantize_numpy
from test_gptq import _correlate_embeddings, proxy
from conftest import make_tiny_llama


def random_glut(rng, out, inn, bits, g):
    """Random packed layer: random codes (packed by a plain NumPy loop), random
    uint8 tables, random fp16 scales/offsets."""
    K = 1 << bits
    G = -(-inn // g)
    codes = rng.integers(0, K, size=(out, inn), dtype=np.uint64)
    words = (inn * bits + 31) // 32
    qw = np.zeros((out, words), dtype=np.uint64)
    for i in range(inn):
        for b in range(bits):
            pos = i * bits + b
            qw[:, pos // 32] |= ((codes[:, i] >> np.uint64(b)) & np.uint64(1)) << np.uint64(pos % 32)
    tables = rng.integers(0, 256, size=(out, G * K), dtype=np.uint8)
    scales = (rng.random((out, G)) * 0.01).astype(np.float16).view(np.uint16)
    offsets = (rng.standard_normal((out, G)) * 0.5).astype(np.float16).view(np.uint16)
    return qw.astype(np.uint32), tables, scales, offsets, codes


SHAPES = [(7, 37, 1, 5), (5, 64, 2, 64), (9, 100, 3, 33), (4, 96, 4, 32), (3, 129, 5, 64),
          (6, 45, 6, 16), (2, 70, 7, 70), (3, 50, 8, 7), (11, 576, 3, 576), (8, 200, 4, 1000)]


@pytest.mark.parametrize("out,inn,bits,g", SHAPES)
def test_decode_kernel_reference_and_numpy_agree_bit_for_bit(out, inn, bits, g):
    rng = np.random.default_rng(out * 1000 + inn + bits)
    qw, tables, scales, offsets, codes = random_glut(rng, out, inn, bits, g)
    fast = _C.glut_dequantize(qw, tables, scales, offsets, bits, g, inn)
    ref = _C.glut_dequantize(qw, tables, scales, offsets, bits, g, inn, reference=True)
    npy = glut_dequantize_numpy(qw, tables, scales, offsets, bits, g, inn)
    assert fast.dtype == np.float32 and fast.shape == (out, inn)
    assert np.array_equal(fast.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(fast.view(np.uint32), npy.view(np.uint32))
    # and the values are the tables' entries at the codes (independent indexing)
    K = 1 << bits
    j = np.arange(inn) // g
    s = scales.view(np.float16).astype(np.float64)
    o = offsets.view(np.float16).astype(np.float64)
    for r in range(out):
        q = tables[r].reshape(-1, K)[j, codes[r].astype(np.int64)]
        assert np.array_equal(fast[r], (s[r, j] * q + o[r, j]).astype(np.float32))


@pytest.mark.parametrize("out,inn,bits,g", SHAPES[:6])
@pytest.mark.parametrize("batch", [1, 3, 33])
def test_matmul_matches_float64(out, inn, bits, g, batch):
    rng = np.random.default_rng(7 + batch)
    qw, tables, scales, offsets, _ = random_glut(rng, out, inn, bits, g)
    W = glut_dequantize_numpy(qw, tables, scales, offsets, bits, g, inn).astype(np.float64)
    x = rng.standard_normal((batch, inn)).astype(np.float32)
    y = _C.glut_matmul(x, qw, tables, scales, offsets, bits, g, inn)
    yref = _C.glut_matmul(x, qw, tables, scales, offsets, bits, g, inn, reference=True)
    exact = x.astype(np.float64) @ W.T
    # fp32 accumulation of `inn` products: |error| <= inn * 2^-24 * sum |x_i w_i|
    # (plus the final rounding); the reference accumulates in double.
    bound = (inn + 2) * 2.0 ** -24 * (np.abs(x).astype(np.float64) @ np.abs(W).T) + 1e-30
    assert np.all(np.abs(y - exact) <= bound)
    assert np.all(np.abs(yref - exact) <= 2.0 ** -24 * np.abs(exact) + 1e-30)


def _weights(rng, out, inn):
    return (rng.standard_normal((out, inn)) * rng.random((out, 1)) * 0.1).astype(np.float32)


@pytest.mark.parametrize("bits,g", [(2, 16), (3, 33), (4, 64), (3, 1000)])
def test_quantizer_codes_nearest_and_sse(bits, g):
    rng = np.random.default_rng(bits + g)
    out, inn = 9, 130
    W = _weights(rng, out, inn)
    F = rng.random((out, inn)).astype(np.float32)
    r = _C.glut_quantize(W, F, bits, g)
    Wq = glut_dequantize_numpy(r["qweight"], r["tables"], r["scales"], r["offsets"], bits, g, inn)
    K = 1 << bits
    G = -(-inn // g)
    s = r["scales"].view(np.float16).astype(np.float64)
    o = r["offsets"].view(np.float16).astype(np.float64)
    ent = (s[:, :, None] * r["tables"].reshape(out, G, K) + o[:, :, None]).astype(np.float32)
    j = np.arange(inn) // g
    d = np.abs(W[:, :, None] - ent[:, j, :])  # out x in x K, float32 as the quantizer
    assert np.all(np.abs(W - Wq) == d.min(axis=2))  # every code is a nearest entry
    sse = np.zeros((out, G))
    np.add.at(sse, (slice(None), j), F * (W.astype(np.float64) - Wq) ** 2)
    np.testing.assert_allclose(r["sse"], sse, rtol=1e-9, atol=1e-18)
    # compact tables cost little next to the float k-means (the optimum for its tables)
    assert np.all(r["sse"] >= r["sse_float"] * (1 - 1e-9) - 1e-18)
    assert r["sse"].sum() <= 1.1 * r["sse_float"].sum() + 1e-12


def test_quantizer_exact_when_a_group_has_few_values():
    W = np.tile(np.array([-0.5, 0.25, 1.0, 3.0], np.float32), (3, 10))  # 4 distinct per group
    r = _C.glut_quantize(W, None, 2, 8)
    Wq = _C.glut_dequantize(r["qweight"], r["tables"], r["scales"], r["offsets"], 2, 8, 40)
    # 8-bit entries on [min, max]: each value within half a step of the range / 255
    assert np.max(np.abs(Wq - W)) <= 0.5 * 3.5 / 255 * 1.01


def test_layer_forward_equals_linear_with_dequantized_weight():
    rng = np.random.default_rng(3)
    out, inn = 21, 77
    W = _weights(rng, out, inn)
    bias = torch.randn(out)
    layer = glut_quantize(torch.from_numpy(W), bits=3, group_size=20, bias=bias)
    assert isinstance(layer, GlutQuantLinear)
    Wd = layer.dequantize()
    for shape in [(1, inn), (5, inn), (2, 40, inn), (64, inn)]:  # kernel and GEMM paths
        x = torch.randn(*shape)
        y = layer(x)
        ref = torch.nn.functional.linear(x.double(), Wd.double(), bias.double())
        bound = (inn + 2) * 2.0 ** -24 * (x.abs().double() @ Wd.abs().double().T) + 1e-6
        assert y.shape == (*shape[:-1], out)
        assert torch.all((y.double() - ref).abs() <= bound + 2.0 ** -24 * ref.abs())
    xh = torch.randn(3, inn).to(torch.bfloat16)
    assert layer(xh).dtype == torch.bfloat16
    assert abs(layer.bits_per_weight() - glut_bits_per_weight(out, inn, 3, 20)) < 1e-12
    # storage: codes + (8 K + 32) bits per table
    assert layer.storage_bits() == out * (32 * ((inn * 3 + 31) // 32) + 4 * (8 * 8 + 32))


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(0)
    W = _weights(rng, 4, 40)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        _C.glut_quantize(W, None, 9, 8)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        _C.glut_quantize(W, None, 3, 0)
    Wn = W.copy()
    Wn[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value .* at \(1, 2\)"):
        _C.glut_quantize(Wn, None, 3, 8)
    with pytest.raises(ValueError, match="sensitivity must be finite and >= 0"):
        _C.glut_quantize(W, -np.ones_like(W), 3, 8)
    with pytest.raises(ValueError, match="sensitivity must have the weight's shape"):
        _C.glut_quantize(W, np.ones((4, 39), np.float32), 3, 8)
    with pytest.raises(ValueError, match="non-empty"):
        _C.glut_quantize(np.zeros((0, 5), np.float32), None, 3, 8)
    with pytest.raises(ValueError, match="float16 range"):
        _C.glut_quantize(W * 1e6, None, 3, 8)
    with pytest.raises(ValueError, match="hessian must have shape"):
        _C.glut_gptq(W, np.eye(39), None, 3, 8)
    r = _C.glut_quantize(W, None, 3, 8)
    ops = [r["qweight"], r["tables"], r["scales"], r["offsets"]]
    with pytest.raises(ValueError, match="tables must have shape"):
        _C.glut_dequantize(ops[0], ops[1][:, :-1], ops[2], ops[3], 3, 8, 40)
    with pytest.raises(ValueError, match="scales and offsets must have shape"):
        _C.glut_dequantize(ops[0], ops[1], ops[2][:, :-1], ops[3], 3, 8, 40)
    with pytest.raises(ValueError, match="words per row"):
        _C.glut_dequantize(ops[0][:, :-1], ops[1], ops[2], ops[3], 3, 8, 40)
    bad = ops[2].copy()
    bad[0, 0] = 0x7C00  # +inf
    with pytest.raises(ValueError, match="not finite"):
        _C.check_glut(ops[0], ops[1], bad, ops[3], 3, 8, 40)
    corrupt = ops[0].copy()
    corrupt[0, -1] |= np.uint32(1 << 31)  # 40*3 = 120 bits: bit 127 is past the last code
    with pytest.raises(ValueError, match="past its last code"):
        _C.check_glut(corrupt, ops[1], ops[2], ops[3], 3, 8, 40)
    with pytest.raises(ValueError, match="x has 39 features"):
        _C.glut_matmul(np.zeros((1, 39), np.float32), *ops, 3, 8, 40)
    layer = glut_quantize(W, bits=3, group_size=8)
    with pytest.raises(ValueError, match="in_features=40"):
        layer(torch.zeros(2, 39))
    with pytest.raises(TypeError, match="bits must be an int"):
        GlutQuantLinear(40, 4, bits=3.5)
    with pytest.raises(ValueError, match="budget"):
        solve_mckp([[5, 6]], [[1.0, 0.5]], 4)


def test_save_load_round_trip_and_bits_from_files(tmp_path, calib_ids):
    model = make_tiny_llama()
    sqllm.quantize(model, method="glut", bits=3, group_size=24, calibration=calib_ids,
                   gptq=False, progress=False)  # the streamed GPTQ path: the budget test
    q = model.model.layers[0].mlp.down_proj
    assert isinstance(q, GlutQuantLinear) and q.group_size == 24
    cfg = model.config.quantization_config
    assert cfg["method"] == "glut"
    ids = calib_ids[:2]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    folder = sqllm.save_quantized(model, tmp_path / "g")
    loaded = sqllm.load_quantized(folder)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)
    from safetensors import safe_open

    nbytes = n = 0
    layers = json.loads((folder / "config.json").read_text())["quantization_config"]["layers"]
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if any(k.startswith(name + ".") for name in layers) and not k.endswith(".bias"):
                    t = st.get_tensor(k)
                    nbytes += t.numel() * t.element_size()
    for name, ent in layers.items():
        p = ent.get("params", ent)
        n += ent["in_features"] * ent["out_features"]
        assert p["bits"] == 3 and p["group_size"] == 24
    expect = sum(glut_bits_per_weight(e["out_features"], e["in_features"], 3, 24) *
                 e["in_features"] * e["out_features"] for e in layers.values())
    assert 8 * nbytes == round(expect)


@pytest.mark.parametrize("bits,g,act", [(3, 16, False), (2, 40, True), (4, 96, False)])
def test_feedback_lowers_the_proxy_error_on_every_layer(calib_ids, bits, g, act):
    from sqllm.gptq import collect_hessians

    model = make_tiny_llama()
    _correlate_embeddings(model)
    layers = sqllm.find_linear_layers(model)
    stats = collect_hessians(model, layers, calib_ids, progress=False)
    rng = np.random.default_rng(0)
    for name, lin in layers.items():
        H = (2.0 * stats["hessian"][name] / stats["hessian_count"][name]).numpy()
        W = lin.weight.detach().numpy()
        F = rng.random(W.shape).astype(np.float32) + 0.1
        plain = glut_quantize(W, F, bits=bits, group_size=g).dequantize().numpy()
        fb, i1 = glut_quantize(W, F, H, bits=bits, group_size=g, refit=False, act_order=act,
                               return_info=True)
        fr, i2 = glut_quantize(W, F, H, bits=bits, group_size=g, refit=True, act_order=act,
                               return_info=True)
        e0, e1, e2 = proxy(W, plain, H), proxy(W, fb.dequantize().numpy(), H), \
            proxy(W, fr.dequantize().numpy(), H)
        assert e1 < e0, name  # GPTQ feedback, same tables
        assert e2 <= e1 * (1 + 1e-9), name  # the refit never makes a row worse
        assert torch.equal(fb.tables, glut_quantize(W, F, bits=bits, group_size=g).tables)
        np.testing.assert_allclose(i1["proxy_error_gptq"], e1, rtol=1e-6)
        np.testing.assert_allclose(i2["proxy_error"], e2, rtol=1e-6)


def test_refit_is_the_least_squares_optimum_for_one_row():
    # One row, H = I + ridge: the refit entry is the mean of the weights with that code
    # (least squares), up to the damping pull and the 8-bit compaction.
    rng = np.random.default_rng(5)
    W = rng.standard_normal((1, 64)).astype(np.float32)
    H = np.eye(64)
    layer, info = glut_quantize(W, None, H, bits=2, group_size=64, percdamp=0.0, return_info=True)
    Wq = layer.dequantize().numpy()[0]
    for v in np.unique(Wq):
        sel = Wq == v
        assert abs(v - W[0, sel].mean()) <= 0.5 * (W.max() - W.min()) / 255 * 1.01 + 1e-6


# ---- allocation -----------------------------------------------------------------

def brute_force(costs, errors, budget):
    best, arg = np.inf, None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(costs[l][k] for l, k in enumerate(pick))
        e = sum(errors[l][k] for l, k in enumerate(pick))
        if c <= budget and e < best - 1e-12:
            best, arg = e, pick
    return best, arg


@pytest.mark.parametrize("seed", range(12))
def test_mckp_optimal_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 6))
    costs = [rng.integers(0, 30, size=int(rng.integers(1, 5))) for _ in range(L)]
    errors = [rng.random(len(c)) * 10 for c in costs]
    budget = int(sum(c.min() for c in costs) + rng.integers(0, 40))
    best, _ = brute_force(costs, errors, budget)
    pick = solve_mckp(costs, errors, budget, resolution=10_000)  # unit 1: exact
    assert sum(costs[l][k] for l, k in enumerate(pick)) <= budget
    assert abs(sum(errors[l][k] for l, k in enumerate(pick)) - best) <= 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_mckp_never_exceeds_the_budget(seed):
    rng = np.random.default_rng(100 + seed)
    L = int(rng.integers(1, 40))
    costs = [rng.integers(1000, 100_000, size=int(rng.integers(1, 6))) for _ in range(L)]
    errors = [rng.random(len(c)) for c in costs]
    lo = sum(int(c.min()) for c in costs)
    hi = sum(int(c.max()) for c in costs)
    budget = float(lo + rng.random() * (hi - lo) * 1.1) + 0.37
    pick = solve_mckp(costs, errors, budget, resolution=int(rng.integers(1, 500)))
    assert sum(int(costs[l][k]) for l, k in enumerate(pick)) <= budget


def test_budget_method_on_a_tiny_model(calib_ids, tmp_path):
    model = make_tiny_llama()
    n = sum(l.weight.numel() for l in sqllm.find_linear_layers(model, exclude=("lm_head",)).values())
    sqllm.quantize(model, method="glut", bits=3.4, calibration=calib_ids, progress=False,
                   candidate_bits=[2, 3, 4], candidate_groups=[16, 32, 64])
    used = sum(m.storage_bits() for m in model.modules() if isinstance(m, GlutQuantLinear))
    assert used <= 3.4 * n
    kinds = {(m.bits, m.group_size) for m in model.modules() if isinstance(m, GlutQuantLinear)}
    assert len(kinds) >= 2  # a real mix, not one width
    loaded = sqllm.load_quantized(sqllm.save_quantized(model, tmp_path / "b"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=calib_ids[:1]).logits,
                           model(input_ids=calib_ids[:1]).logits)
    with pytest.raises(ValueError, match="below the cheapest"):
        sqllm.quantize(make_tiny_llama(), method="glut", bits=1.5, calibration=calib_ids,
                       progress=False, candidate_bits=[2, 3], candidate_groups=[16])
    with pytest.raises(ValueError, match="must be non-empty"):
        GLUT(bits=2.5, candidate_bits=[])
    assert GLUT(bits=4).budget_mode is False and GLUT(bits=4, allocate=True).budget_mode


def test_sensitivity_on_sampled_rows():
    from sqllm.allocate import measure_glut_errors

    rng = np.random.default_rng(2)
    w = {"a": _weights(rng, 50, 40), "b": _weights(rng, 7, 40)}
    f = {k: rng.random(v.shape).astype(np.float32) for k, v in w.items()}
    cands = [(2, 8), (3, 40)]
    full = measure_glut_errors(w, f, cands)
    assert measure_glut_errors(w, f, cands, max_rows=50) == full
    part = measure_glut_errors(w, f, cands, max_rows=10)  # every 5th row of "a", x 5
    assert part["a"][0] == full["a"][0] and part["b"] == measure_glut_errors(
        {"b": w["b"]}, {"b": f["b"]}, cands, max_rows=10)["b"]
    for k, (bits, g) in enumerate(cands):
        r = _C.glut_quantize(np.ascontiguousarray(w["a"][::5]), np.ascontiguousarray(f["a"][::5]),
                             bits, g)
        np.testing.assert_allclose(part["a"][1][k], 5 * r["sse"].sum(), rtol=1e-12)
        r = _C.glut_quantize(w["a"], f["a"], bits, g)
        np.testing.assert_allclose(full["a"][1][k], r["sse"].sum(), rtol=1e-12)
