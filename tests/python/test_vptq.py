"""Vector k-means, the VPTQ quantizer and the vq format against plain NumPy references."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sqllm
from sqllm import _C
from sqllm.nn_vq import VQQuantLinear

from conftest import make_tiny_llama


# -- references --------------------------------------------------------------------

def np_lloyd(X, w, C0, iters):
    """Weighted Lloyd in float64 from the given centroids (empty clusters keep theirs)."""
    X = X.astype(np.float64)
    C = C0.astype(np.float64).copy()
    objs = []
    for it in range(iters + 1):
        d = ((X[:, None, :] - C[None, :, :]) ** 2).sum(-1)
        a = d.argmin(1)
        objs.append(float((w * d[np.arange(len(X)), a]).sum()))
        if it == iters:
            break
        for j in range(len(C)):
            m = a == j
            if w[m].sum() > 0:
                C[j] = (w[m, None] * X[m]).sum(0) / w[m].sum()
    return C, a, objs


def unpack_stream(words, n, bits):
    """Codes of one LSB-first bit stream of uint32 words (plain Python integers)."""
    big = 0
    for i, wd in enumerate(int(x) & 0xFFFFFFFF for x in words):
        big |= wd << (32 * i)
    return [(big >> (j * bits)) & ((1 << bits) - 1) for j in range(n)]


def pack_stream(codes, bits, nwords):
    big = 0
    for j, c in enumerate(codes):
        big |= int(c) << (j * bits)
    return [(big >> (32 * i)) & 0xFFFFFFFF for i in range(nwords)]


def upstream_decode(t, cfg):
    """Upstream's documented decode (upstream-formats.md), in float64 NumPy."""
    out, inn = cfg["out_features"], cfg["in_features"]
    v_o, v = cfg["vector_lens"]
    k_o, k = cfg["num_centroids"]
    kr = max(cfg["num_res_centroids"][1], 0)
    G, gs, osz = cfg["group_num"], cfg["group_size"], cfg["outlier_size"]
    lk = k.bit_length() - 1
    B = lk + (kr.bit_length() - 1 if kr else 0)
    C = t["centroids.weight"].double().numpy().reshape(G, k, v)
    R = t["res_centroids.weight"].double().numpy().reshape(G, kr, v) if kr else None
    idx = t["indices"].numpy()
    rows = -(-out // v)
    Wp = np.zeros((rows * v, inn))
    for g in range(G):
        for r in range(rows):
            n = min(gs, inn - osz - g * gs)
            for c, code in enumerate(unpack_stream(idx[g, r], n, B)):
                vec = C[g, code & (k - 1)] + (R[g, code >> lk] if kr else 0.0)
                Wp[r * v:(r + 1) * v, osz + g * gs + c] = vec
    if osz:
        OC = t["outlier_centroids.weight"].double().numpy().reshape(k_o, v_o)
        oi = t["outlier_indices"].numpy().view(np.uint16)[0]
        Wo = np.zeros((oi.shape[0] * v_o, osz))
        for r in range(oi.shape[0]):
            for c in range(osz):
                Wo[r * v_o:(r + 1) * v_o, c] = OC[oi[r, c]]
        Wp[:out, :osz] = Wo[:out]
    Wp = Wp[:out]
    W = np.empty_like(Wp)
    if cfg.get("enable_perm"):
        perm = t["perm"].numpy().view(np.uint16).astype(np.int64)
        W[:, perm] = Wp
    else:
        W = Wp
    if cfg.get("enable_norm"):
        W = W * t["weight_scale"].double().numpy() + t["weight_bias"].double().numpy()
    return W


def correlated_hessian(inn, rows=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, inn, generator=g, dtype=torch.float64)
    X[:, 1:] += 0.8 * X[:, :-1].clone()
    X *= torch.linspace(0.2, 2.0, inn, dtype=torch.float64)  # uneven diagonal: perm matters
    return X.T @ X


def proxy(W, Wq, H):
    d = W.double() - Wq.double()
    return float(torch.einsum("oi,ij,oj->", d, H, d))


# -- vector k-means ------------------------------------------------------------------

@pytest.mark.parametrize("v,k", [(2, 5), (4, 16), (8, 7), (16, 3)])
def test_vec_kmeans_matches_numpy_lloyd(v, k):
    rng = np.random.default_rng(v * 10 + k)
    X = rng.normal(size=(300, v)).astype(np.float32)
    w = rng.uniform(0.1, 2.0, 300).astype(np.float32)
    C0 = X[rng.choice(300, k, replace=False)]
    r = _C.vec_kmeans(X, w, k=k, iters=15, tol=0.0, init_centroids=C0)
    C, a, objs = np_lloyd(X, w.astype(np.float64), C0, r["iterations"])
    np.testing.assert_array_equal(r["assign"], a)
    # centroids: fp32 storage of float64 means (relative 2^-24 per coordinate)
    np.testing.assert_allclose(r["centroids"], C, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["objective"], objs, rtol=1e-6)
    assert all(b <= a_ * (1 + 1e-6) for a_, b in zip(r["objective"], r["objective"][1:]))


def test_vec_kmeans_more_centroids_never_hurt_and_is_deterministic():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2000, 6)).astype(np.float32)
    objs = [_C.vec_kmeans(X, k=k, iters=30, init="kmeans++", seed=0)["objective"][-1]
            for k in (8, 32, 128)]
    assert objs[0] > objs[1] > objs[2]
    a = _C.vec_kmeans(X, k=64, iters=10, seed=5, num_threads=1)
    b = _C.vec_kmeans(X, k=64, iters=10, seed=5, num_threads=2)
    np.testing.assert_array_equal(a["centroids"], b["centroids"])


def test_vec_kmeans_bad_input():
    X = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="vector length must be in 2..16"):
        _C.vec_kmeans(np.zeros((10, 17), np.float32), k=2)
    with pytest.raises(ValueError, match="sample weights must be finite and >= 0"):
        _C.vec_kmeans(X, -np.ones(10, np.float32), k=2)
    with pytest.raises(ValueError, match="weights must have 10 entries"):
        _C.vec_kmeans(X, np.ones(9, np.float32), k=2)
    X[3, 1] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        _C.vec_kmeans(X, k=2)
    with pytest.raises(ValueError, match="init must be"):
        _C.vec_kmeans(np.zeros((10, 4), np.float32), k=2, init="farthest")


# -- the quantizer ---------------------------------------------------------------------

def test_error_feedback_and_residual_lower_the_proxy_error():
    torch.manual_seed(0)
    out, inn = 64, 96
    W = torch.randn(out, inn) * 0.05
    H = correlated_hessian(inn)
    layer, r = sqllm.vptq_quantize(W, H, v=4, k=32, k_res=8, kiter=30, enable_norm=True,
                                   return_result=True)
    assert r["proxy_gptq"] < 0.95 * r["proxy_nearest"]
    assert r["proxy_residual"] < 0.9 * r["proxy_gptq"]
    # The reported error is that of the stored layer (fp16 codebooks/norm, fp32 decode).
    assert proxy(W, layer.dequantize(), H) == pytest.approx(r["proxy_residual"], rel=1e-4)
    assert r["proxy_weight"] == pytest.approx(proxy(W, torch.zeros_like(W), H), rel=1e-9)


@pytest.mark.parametrize("perm,norm,outliers,groups,out", [
    (True, True, 5, 2, 60), (False, True, 0, 3, 64), (True, False, 7, 1, 62), (False, False, 0, 1, 64)])
def test_dequantize_equals_the_upstream_decode(perm, norm, outliers, groups, out):
    torch.manual_seed(1)
    inn = 50
    W = torch.randn(out, inn) * 0.1 + 0.02
    H = correlated_hessian(inn, seed=2)
    layer = sqllm.vptq_quantize(W, H, v=4, k=16, k_res=4, outlier_cols=outliers,
                                v_out=2 if outliers else 0, k_out=8 if outliers else 0,
                                group_num=groups, enable_perm=perm, enable_norm=norm, kiter=10)
    t = dict(layer.state_dict())
    cfg = {"in_features": inn, "out_features": out, "vector_lens": [2 if outliers else -1, 4],
           "num_centroids": [8 if outliers else -1, 16], "num_res_centroids": [-1, 4],
           "group_num": groups, "group_size": layer.group_size, "outlier_size": outliers,
           "enable_perm": perm, "enable_norm": norm}
    ref = upstream_decode(t, cfg)
    # fp16 codebook values summed in fp32, then one fp32 multiply-add with fp16 norm values:
    # a few fp32 ulps of |W| ~ 0.3.
    np.testing.assert_allclose(layer.dequantize().double().numpy(), ref, rtol=0, atol=1e-6)
    if perm:
        p = t["perm"].numpy().view(np.uint16).astype(np.int64)
        d = torch.diagonal(H).numpy()
        if norm:
            d = d * t["weight_scale"].double().numpy() ** 2
        assert np.all(np.diff(d[p]) <= 0)  # columns by decreasing (normalised) Hessian diagonal


def test_vq_matmul_equals_dequantize_then_linear():
    torch.manual_seed(2)
    W = torch.randn(40, 72) * 0.1
    H = correlated_hessian(72, seed=3)
    layer = sqllm.vptq_quantize(W, H, v=8, k=64, k_res=16, outlier_cols=4, v_out=4, k_out=32,
                                enable_norm=True, kiter=10, bias=torch.randn(40))
    Wq = layer.dequantize()
    for n in (1, 3, 8, 40):  # gather kernel up to 16 rows, dequantize + GEMM above
        x = torch.randn(n, 72)
        ref = x.double() @ Wq.double().T + layer.bias.double()
        torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=2e-5)
    x = torch.randn(2, 5, 72)[:, ::2]  # non-contiguous, 3-D
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, Wq, layer.bias),
                               rtol=0, atol=2e-5)


def test_quantizer_bad_input():
    W = torch.randn(16, 24)
    H = correlated_hessian(24)
    with pytest.raises(ValueError, match="power of two"):
        sqllm.vptq_quantize(W, H, v=4, k=12)
    with pytest.raises(ValueError, match="vector length must be in 2..16"):
        sqllm.vptq_quantize(W, H, v=1, k=16)
    Hn = H.clone()
    Hn[3, 4] = float("nan")
    with pytest.raises(ValueError, match="Hessian contains NaN"):
        sqllm.vptq_quantize(W, Hn, v=4, k=16)
    with pytest.raises(ValueError, match="hessian must have shape"):
        sqllm.vptq_quantize(W, H[:20, :20], v=4, k=16)
    with pytest.raises(ValueError, match="empty group"):
        sqllm.vptq_quantize(W, H, v=4, k=16, group_num=7)
    from sqllm.vptq import VPTQ
    with pytest.raises(ValueError, match="power of two"):
        VPTQ(vector_lens=[-1, 4], num_centroids=[-1, 1000])
    with pytest.raises(ValueError, match="outlier codebook"):
        VPTQ(npercent=1.0)


# -- the format: upstream layout, save/load --------------------------------------------

def _write_upstream_folder(folder, model, seed=0):
    """An independent writer of VPTQ's published layout (from the documented format):
    random codebooks and codes for every decoder Linear, the rest of the model as is."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    cfg = model.config.to_dict()
    layers, tensors, expected = {}, {}, {}
    lins = {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    v, k, kr, vo, ko, G = 4, 16, 4, 2, 8, 2
    for name, lin in lins.items():
        out, inn = lin.out_features, lin.in_features
        osz = 3
        gs = -(-(inn - osz) // G)
        B = 4 + 2
        rows = -(-out // v)
        words = -(-gs * B // 32)
        main = rng.integers(0, k, (G, rows, gs))
        res = rng.integers(0, kr, (G, rows, gs))
        idx = np.zeros((G, rows, words), np.int64)
        for g in range(G):
            n = min(gs, inn - osz - g * gs)
            for r in range(rows):
                slots = [int(main[g, r, c]) | (int(res[g, r, c]) << 4) for c in range(n)]
                idx[g, r] = pack_stream(slots, B, words)
        t = {"indices": torch.from_numpy(idx.astype(np.uint32).view(np.int32)),
             "centroids.weight": torch.from_numpy(rng.normal(0, 0.5, (G, k * v))).half(),
             "res_centroids.weight": torch.from_numpy(rng.normal(0, 0.05, (G, kr * v))).half(),
             "outlier_indices": torch.from_numpy(
                 rng.integers(0, ko, (1, -(-out // vo), osz)).astype(np.int16)),
             "outlier_centroids.weight": torch.from_numpy(rng.normal(0, 1, (1, ko * vo))).half(),
             "perm": torch.from_numpy(rng.permutation(inn).astype(np.uint16).view(np.int16)),
             "weight_scale": torch.from_numpy(rng.uniform(0.05, 0.2, inn)).half(),
             "weight_bias": torch.from_numpy(rng.normal(0, 0.01, inn)).half()}
        lcfg = {"in_features": inn, "out_features": out, "vector_lens": [vo, v],
                "num_centroids": [ko, k], "num_res_centroids": [-1, kr], "group_num": G,
                "group_size": gs, "outlier_size": osz, "is_indice_packed": True,
                "enable_norm": True, "enable_perm": True, "bias": False}
        layers[name] = lcfg
        expected[name] = upstream_decode(t, lcfg)
        for key, val in t.items():
            tensors[f"{name}.{key}"] = val.contiguous()
    for n, p in model.state_dict().items():
        if not any(n.startswith(lname + ".") for lname in lins):
            tensors[n] = p.detach().clone().contiguous()
    tensors.pop("lm_head.weight", None)  # tied to the embeddings in the tiny model
    cfg["quantization_config"] = {"quant_method": "vptq", "config_for_layers": layers,
                                  "shared_layer_config": {}}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"))
    return expected


def test_a_folder_in_vptq_published_layout_loads(tmp_path):
    model = make_tiny_llama()
    expected = _write_upstream_folder(tmp_path / "vptq", model)
    loaded = sqllm.load_quantized(tmp_path / "vptq")
    for name, W in expected.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, VQQuantLinear)
        np.testing.assert_allclose(layer.dequantize().double().numpy(), W, rtol=0, atol=1e-5)
    ids = torch.randint(0, 256, (1, 12))
    assert torch.isfinite(loaded(ids).logits).all()
    # Round trip through sqllm's own folder keeps every tensor.
    again = sqllm.load_quantized(sqllm.save_quantized(loaded, tmp_path / "ours"))
    for name in expected:
        assert torch.equal(again.get_submodule(name).dequantize(), loaded.get_submodule(name).dequantize())


def test_corrupt_upstream_indices_are_rejected(tmp_path):
    from safetensors.torch import load_file

    model = make_tiny_llama()
    _write_upstream_folder(tmp_path / "bad", model)
    sd = load_file(str(tmp_path / "bad" / "model.safetensors"))
    key = next(k for k in sd if k.endswith("outlier_indices"))
    sd[key][0, 0, 0] = 8  # k_o = 8 centroids
    save_file(sd, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match="corrupt outlier index 8"):
        sqllm.load_quantized(tmp_path / "bad")
    sd[key][0, 0, 0] = 0
    pkey = next(k for k in sd if k.endswith(".perm"))
    sd[pkey][1] = sd[pkey][0]
    save_file(sd, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match="perm is not a permutation"):
        sqllm.load_quantized(tmp_path / "bad")


def test_quantize_method_vptq_saves_and_loads(tmp_path, calib_ids, caplog, capsys):
    model = make_tiny_llama()
    with caplog.at_level("INFO", logger="sqllm.vptq"):
        sqllm.quantize(model, method="vptq", calibration=calib_ids, progress=False,
                       vector_lens=[-1, 4], num_centroids=[-1, 64], num_res_centroids=[-1, 16],
                       kiter=10, method_options={"seed": 1})
    assert any("after residual" in r.message for r in caplog.records)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, VQQuantLinear) and layer.num_res_centroids == 16
    assert model.config.quantization_config["options"]["seed"] == 1
    ids = torch.randint(0, 256, (2, 16))
    before = model(ids).logits
    folder = sqllm.save_quantized(model, tmp_path / "q")
    loaded = sqllm.load_quantized(folder)
    assert torch.equal(loaded(ids).logits, before)
    from sqllm.cli import main

    capsys.readouterr()
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    bpw = sqllm.size_report(loaded)["quantized_bits_per_weight"]
    assert "num_centroids=64, num_res_centroids=16" in text
    assert f"quantized layers: {bpw:.3f} bits/weight" in text


def test_vq_layer_rejects_bad_parameters():
    with pytest.raises(ValueError, match="num_centroids must be a power of two"):
        VQQuantLinear(64, 32, vector_len=4, num_centroids=1000)
    with pytest.raises(ValueError, match="vector_len must be in 2..16"):
        VQQuantLinear(64, 32, vector_len=17, num_centroids=256)
    with pytest.raises(ValueError, match="do not cover"):
        VQQuantLinear(64, 32, vector_len=4, num_centroids=256, group_num=2, group_size=20)
    with pytest.raises(ValueError, match="outliers need"):
        VQQuantLinear(64, 32, vector_len=4, num_centroids=256, outlier_size=3)
    # out not a multiple of v: padded rows are dropped by the decode
    torch.manual_seed(3)
    W = torch.randn(30, 24) * 0.1
    layer = sqllm.vptq_quantize(W, correlated_hessian(24), v=8, k=16, kiter=5)
    assert layer.indices.shape[1] == 4 and layer.dequantize().shape == (30, 24)


# -- Hessians in upstream's file layout (--hessian-path) -------------------------------

def _write_upstream_hessians(folder, model, calib_ids):
    """An independent writer of upstream's Hessian folders (the QuIP# collector VPTQ reads):
    per decoder layer and input (qkv, o, up, down) a torch.save'd dict with the covariance
    Σxxᵀ/ct − μμᵀ as its lower triangle row by row (float32), mu, n and ct.  Returns the
    second moments E[xxᵀ] (float64, from the float32-stored values) it encodes."""
    folder.mkdir()
    inputs = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for mod, key in ((layer.self_attn.q_proj, "qkv"), (layer.self_attn.o_proj, "o"),
                         (layer.mlp.up_proj, "up"), (layer.mlp.down_proj, "down")):
            def hook(m, args, out, tag=f"{i}_{key}"):
                inputs.setdefault(tag, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for row in calib_ids:
            model(row[None])
    for h in hooks:
        h.remove()
    second = {}
    for tag, xs in inputs.items():
        X = torch.cat(xs).double().numpy()
        ct, n = X.shape
        mu = X.mean(0)
        cov = X.T @ X / ct - np.outer(mu, mu)
        flat = np.array([cov[r, c] for r in range(n) for c in range(r + 1)], np.float32)
        mu32 = mu.astype(np.float32)
        torch.save({"flatH": torch.from_numpy(flat), "mu": torch.from_numpy(mu32), "n": n, "ct": ct},
                   folder / f"{tag}.pt")
        full = np.zeros((n, n))
        j = 0
        for r in range(n):
            for c in range(r + 1):
                full[r, c] = full[c, r] = float(flat[j])
                j += 1
        second[tag] = full + np.outer(mu32.astype(np.float64), mu32.astype(np.float64))
    return second


def test_hessians_in_upstream_layout_are_read(tmp_path, calib_ids):
    from sqllm.vptq import load_upstream_hessian, upstream_hessian_file

    model = make_tiny_llama()
    second = _write_upstream_hessians(tmp_path / "hess", model, calib_ids)
    assert sorted(second) == sorted(f"{i}_{k}" for i in range(2) for k in ("qkv", "o", "up", "down"))
    h, ct = load_upstream_hessian(tmp_path / "hess" / "1_up.pt", 64)
    assert ct == calib_ids.numel()
    np.testing.assert_array_equal(h.numpy(), second["1_up"])  # same float64 sums
    assert upstream_hessian_file(tmp_path, "model.layers.1.mlp.gate_proj").name == "1_up.pt"
    assert upstream_hessian_file(tmp_path, "model.layers.0.self_attn.v_proj").name == "0_qkv.pt"

    # Quantizing with hessian_path (no calibration data) equals quantizing each layer with
    # the second moment the files encode.
    opts = dict(v=4, k=16, kiter=5, enable_norm=True)
    ref = {}
    for name, lin in model.named_modules():
        if isinstance(lin, torch.nn.Linear) and name != "lm_head":
            key = upstream_hessian_file("", name).stem
            ref[name] = sqllm.vptq_quantize(lin.weight, torch.from_numpy(second[key]), **opts,
                                            bias=lin.bias).dequantize()
    sqllm.quantize(model, method="vptq", progress=False, vector_lens=[-1, 4],
                   num_centroids=[-1, 16], kiter=5, method_options={"hessian_path": str(tmp_path / "hess")})
    assert model.config.quantization_config["calibration"].get("text") is None
    for name, w in ref.items():
        assert torch.equal(model.get_submodule(name).dequantize(), w), name


def test_bad_upstream_hessian_files(tmp_path):
    from sqllm.vptq import VPTQ, load_upstream_hessian, upstream_hessian_file

    n = 6
    good = {"flatH": torch.ones(n * (n + 1) // 2), "mu": torch.zeros(n), "n": n, "ct": 10}
    with pytest.raises(ValueError, match="does not exist"):
        load_upstream_hessian(tmp_path / "0_qkv.pt")
    torch.save(good, tmp_path / "g.pt")
    with pytest.raises(ValueError, match="is 6x6, the layer has 8 inputs"):
        load_upstream_hessian(tmp_path / "g.pt", 8)
    torch.save({**good, "flatH": torch.ones(20)}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="needs flatH of 21 values"):
        load_upstream_hessian(tmp_path / "short.pt")
    bad = good["flatH"].clone()
    bad[3] = float("nan")
    torch.save({**good, "flatH": bad}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_upstream_hessian(tmp_path / "nan.pt")
    torch.save({"flatH": good["flatH"], "n": n}, tmp_path / "nomu.pt")
    with pytest.raises(ValueError, match="flatH, mu and n"):
        load_upstream_hessian(tmp_path / "nomu.pt")
    raw = (tmp_path / "g.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="could not be read"):
        load_upstream_hessian(tmp_path / "trunc.pt")
    torch.save({**good, "flatH": torch.zeros(21)}, tmp_path / "zero.pt")
    with pytest.raises(ValueError, match="non-positive mean diagonal"):
        load_upstream_hessian(tmp_path / "zero.pt")
    with pytest.raises(ValueError, match="no file in upstream's Hessian layout"):
        upstream_hessian_file(tmp_path, "lm_head")
    with pytest.raises(ValueError, match="is not a folder"):
        VPTQ(bits=2, hessian_path=str(tmp_path / "nope"))
    assert VPTQ(bits=2, hessian_path=str(tmp_path)).needs_calibration is False


def test_cli_has_hessian_path_flag():
    from sqllm.cli import _method_args, _parser

    args = _parser("vptq").parse_args(["quantize", "--method", "vptq", "--out", "o",
                                       "--hessian-path", "/h"])
    assert _method_args(args) == {"hessian_path": "/h"}


# -- saving in upstream's layout (config_for_layers) -------------------------------------

def _read_as_upstream(folder):
    """An independent reader of VPTQ's published layout, written from the layout description
    (upstream-formats.md): config.json's quantization_config with quant_method "vptq" and
    config_for_layers; each module's tensors under <module>.<key> in the safetensors files,
    decoded by upstream's formula (upstream_decode).  Returns {module: dense float64 W}."""
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "vptq"
    tensors = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    out = {}
    for name, entry in q["config_for_layers"].items():
        e = {**q.get("shared_layer_config", {}), **entry}
        for key in ("in_features", "out_features", "vector_lens", "num_centroids",
                    "num_res_centroids", "group_num", "group_size", "outlier_size",
                    "is_indice_packed", "enable_norm", "enable_perm", "bias"):
            assert key in e, (name, key)
        assert e["is_indice_packed"] is True
        t = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        G, gs, out_f, in_f = e["group_num"], e["group_size"], e["out_features"], e["in_features"]
        v, k = e["vector_lens"][1], e["num_centroids"][1]
        kr = max(e["num_res_centroids"][1], 0)
        B = (k.bit_length() - 1) + (kr.bit_length() - 1 if kr else 0)
        assert t["indices"].dtype == torch.int32
        assert tuple(t["indices"].shape) == (G, -(-out_f // v), -(-gs * B // 32))
        assert t["centroids.weight"].dtype in (torch.float16, torch.bfloat16)
        assert tuple(t["centroids.weight"].shape) == (G, k * v)
        if kr:
            assert tuple(t["res_centroids.weight"].shape) == (G, kr * v)
        if e["outlier_size"]:
            vo, ko = e["vector_lens"][0], e["num_centroids"][0]
            assert t["outlier_indices"].dtype == torch.int16
            assert tuple(t["outlier_indices"].shape) == (1, -(-out_f // vo), e["outlier_size"])
            assert tuple(t["outlier_centroids.weight"].shape) == (1, ko * vo)
        if e["enable_perm"]:
            assert t["perm"].dtype == torch.int16 and tuple(t["perm"].shape) == (in_f,)
        if e["enable_norm"]:
            assert tuple(t["weight_scale"].shape) == tuple(t["weight_bias"].shape) == (in_f,)
        assert ("bias" in t) == e["bias"]
        out[name] = upstream_decode(t, e)
    return out


def test_saved_folder_reads_in_upstream_layout(tmp_path, calib_ids):
    model = make_tiny_llama()
    sqllm.quantize(model, method="vptq", calibration=calib_ids, progress=False,
                   vector_lens=[2, 4], num_centroids=[8, 32], num_res_centroids=[-1, 4],
                   npercent=5.0, group_num=2, kiter=5)
    folder = sqllm.save_quantized(model, tmp_path / "q")
    dense = _read_as_upstream(folder)
    names = [n for n, m in model.named_modules() if isinstance(m, VQQuantLinear)]
    assert sorted(dense) == sorted(names) and len(names) == 14
    for name in names:
        layer = model.get_submodule(name)
        assert layer.outlier_size == -(-5 * layer.in_features // 100) and layer.group_num == 2
        np.testing.assert_allclose(layer.dequantize().double().numpy(), dense[name], rtol=0, atol=1e-6)
    # sqllm reads its own metadata back from the same folder
    qc = sqllm.read_quantization_config(folder)
    assert qc.method == "vptq" and qc.options["npercent"] == 5.0 and qc.options["group_num"] == 2
    loaded = sqllm.load_quantized(folder)
    ids = torch.randint(0, 256, (1, 10))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.config.quantization_config["quant_method"] == "sqllm"
    # saving over it is allowed (it is an sqllm folder) and stays in upstream's layout
    sqllm.save_quantized(loaded, folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "vptq"


# -- the CPU GEMM path (large batches) -----------------------------------------------

def random_layer(in_f, out_f, v, k, kr, groups=1, outliers=0, vo=0, ko=0, perm=True, norm=True,
                 seed=0):
    """A VQ layer with random slots, codebooks, perm, norm and bias (no quantizer involved)."""
    g = torch.Generator().manual_seed(seed)
    layer = VQQuantLinear(in_f, out_f, v, k, kr, groups, -1, outliers, vo, ko, perm, norm,
                          bias=True)
    B = layer.index_bits
    idx = torch.randint(0, 2 ** 31 - 1, layer.indices.shape, generator=g, dtype=torch.int64)
    layer.indices.copy_(idx.to(torch.int32))
    if (layer.group_size * B) % 32:  # tail bits past the last slot: zero, as upstream writes
        layer.indices[..., -1] &= (1 << ((layer.group_size * B) % 32)) - 1
    layer.centroids.weight.copy_(torch.randn(layer.centroids.weight.shape, generator=g))
    if kr:
        layer.res_centroids.weight.copy_(0.1 * torch.randn(layer.res_centroids.weight.shape, generator=g))
    if outliers:
        layer.outlier_indices.copy_(torch.randint(0, ko, layer.outlier_indices.shape, generator=g))
        layer.outlier_centroids.weight.copy_(3 * torch.randn(layer.outlier_centroids.weight.shape,
                                                             generator=g))
    if perm:
        layer.perm.copy_(torch.randperm(in_f, generator=g).to(torch.int16))
    if norm:
        layer.weight_scale.copy_(0.05 + 0.25 * torch.rand(in_f, generator=g))
        layer.weight_bias.copy_(0.05 * torch.randn(in_f, generator=g))
    layer.bias.copy_(torch.randn(out_f, generator=g))
    layer.validate()
    return layer


def reference(layer):
    """(W64, |W'| s + |t| per element) in float64 from the documented decode."""
    from sqllm.config import LayerFormat
    from sqllm.vptq import upstream_layer_entry

    cfg = upstream_layer_entry(LayerFormat.from_layer(layer))
    t = {k: v.cpu() for k, v in layer.state_dict().items()}
    W = upstream_decode(t, cfg)
    if not layer.enable_norm:
        return W, np.abs(W)
    s = t["weight_scale"].double().numpy()
    b = t["weight_bias"].double().numpy()
    Wn = upstream_decode(t, {**cfg, "enable_norm": False})
    return W, np.abs(Wn) * np.abs(s) + np.abs(b)


@pytest.mark.parametrize("batch", [1, 17, 40])
def test_cpu_gemm_path_equals_float64(batch):
    from sqllm.nn_vq import GATHER_MAX_BATCH

    layer = random_layer(300, 77, 6, 256, 16, groups=2, outliers=7, vo=3, ko=5, seed=batch)
    W, mag = reference(layer)
    x = torch.randn(batch, 300, generator=torch.Generator().manual_seed(2))
    xd = x.double().numpy()
    ref = xd @ W.T
    U = 2.0 ** -24
    gam = 310 * U / (1 - 310 * U)
    bound = gam * (np.abs(xd) @ mag.T)
    y = _C.vq_matmul(x.numpy(), *layer._operands(), 0, True, True)
    assert np.all(np.abs(y - ref) <= bound), float(np.max(np.abs(y - ref) / bound))
    # forward takes this path above GATHER_MAX_BATCH rows (and the gather one below)
    got = (layer(x) - layer.bias).double().numpy()
    assert np.all(np.abs(got - ref) <= 2 * bound + 1e-6)
    if batch > GATHER_MAX_BATCH:
        assert np.array_equal(layer(x).numpy(), (torch.from_numpy(y) + layer.bias).numpy())


def test_cli_quantize_streams_with_upstream_hessians(tmp_path, tiny_model_dir, calib_ids):
    """`sqllm quantize --method vptq --hessian-path DIR` on a folder (streamed, block by block):
    no calibration pass, every layer's Hessian read from the files."""
    from sqllm.cli import main

    model_dir, _ = tiny_model_dir
    second = _write_upstream_hessians(tmp_path / "hess", make_tiny_llama(), calib_ids)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--method", "vptq", "--hessian-path",
                 str(tmp_path / "hess"), "--vector-lens", "4", "--num-centroids", "16",
                 "--kiter", "3", "--quiet", "--out", str(out)]) == 0
    q = sqllm.load_quantized(out)
    lin = make_tiny_llama().model.layers[1].mlp.down_proj
    ref = sqllm.vptq_quantize(lin.weight, torch.from_numpy(second["1_down"]), v=4, k=16, kiter=3,
                              enable_norm=True).dequantize()
    assert torch.equal(q.model.layers[1].mlp.down_proj.dequantize(), ref)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "vptq" and cfg["options"]["hessian_path"] == str(tmp_path / "hess")
