"""PTQ1.61: the packed format and its kernel, the quantizer pieces, block training, LET."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import sqllm
from sqllm import _C
from sqllm.nn_ptq161 import PTQ161QuantLinear, pack_bits, unpack_bits
from sqllm.ptq161 import (PTQ161, binarize, find_norm_groups, fold_let, ptq161_linear,
                          salient_grid, salient_mask)

from conftest import make_tiny_llama

U32 = np.finfo(np.float32).eps


def _random_parts(rng, out, inn, n_sal, wbits, group_size):
    """Fresh random unpacked parts of a layer (fp16-exact floats)."""
    mask = np.zeros(inn, bool)
    mask[rng.choice(inn, n_sal, replace=False)] = True
    n_bin = inn - n_sal
    h = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    groups = 0 if n_sal == 0 else (1 if group_size < 0 else -(-n_sal // group_size))
    return dict(mask=mask, signs=rng.random((out, n_bin)) < 0.5,
                alpha=h(rng.uniform(0.01, 0.1, out)), mu=h(rng.normal(0, 0.01, out)),
                r1=h(rng.uniform(0.5, 1.5, out)), r2=h(rng.uniform(0.5, 1.5, n_bin)),
                codes=rng.integers(0, 1 << wbits, (out, n_sal)),
                scales=h(rng.uniform(0.001, 0.02, (out, groups))),
                zeros=rng.integers(0, 1 << wbits, (out, groups)).astype(np.float32))


def _reference_weight(p, group_size):
    """Ŵ from the unpacked parts by the format's definition (NumPy, float32, the kernel's order)."""
    mask, signs = p["mask"], p["signs"]
    out = signs.shape[0]
    w = np.zeros((out, mask.size), np.float32)
    pm = np.where(signs, p["alpha"][:, None], -p["alpha"][:, None]) + p["mu"][:, None]
    w[:, ~mask] = (p["r1"][:, None] * p["r2"][None, :]) * pm
    n_sal = int(mask.sum())
    if n_sal:
        gs = n_sal if group_size < 0 else group_size
        g = np.arange(n_sal) // gs
        w[:, mask] = p["scales"][:, g] * (p["codes"].astype(np.float32) - p["zeros"][:, g])
    return w


SHAPES = [(1, 1, 0), (1, 1, 1), (7, 9, 2), (37, 53, 11), (5, 8, 0), (16, 200, 40),
          (33, 130, 130), (3, 17, 16), (64, 256, 51)]


@pytest.mark.parametrize("out,inn,n_sal", SHAPES)
@pytest.mark.parametrize("wbits,group_size", [(4, -1), (2, 32), (8, 128), (3, 64)])
def test_packed_forward_equals_linear_with_dequantized_weight(out, inn, n_sal, wbits, group_size):
    rng = np.random.default_rng(out * 1000 + inn + wbits)
    p = _random_parts(rng, out, inn, n_sal, wbits, group_size)
    bias = torch.from_numpy(rng.normal(size=out).astype(np.float32))
    layer = PTQ161QuantLinear.from_parts(**p, wbits=wbits, group_size=group_size, bias=bias)
    wref = _reference_weight(p, group_size)
    # dequantize is the definition, evaluated in the same fp32 order: exact
    assert np.array_equal(layer.dequantize().numpy(), wref)
    for batch in (1, 3, 8, 13, 17):
        x = torch.from_numpy(rng.normal(size=(batch, inn)).astype(np.float32))
        ref = x.double() @ torch.from_numpy(wref).double().T + bias.double()
        y = layer(x)
        # fp32 sums of at most in+8 terms (the tables' partial sums, the group sums, α·Σ + μ·Σ):
        # |error| <= (in + 16) u Σ_i |term_i|, with the binary terms bounded by
        # |r1| (|α| + |μ|) |r2_j| |x_j| and the salient ones by |Ŵ_oi| |x_i|
        xa = x.abs().double().numpy()
        bin_mag = (np.abs(p["r1"]) * (np.abs(p["alpha"]) + np.abs(p["mu"])))[:, None] * \
            np.abs(p["r2"])[None, :]
        mag = xa[:, ~p["mask"]] @ bin_mag.T + xa[:, p["mask"]] @ np.abs(wref[:, p["mask"]]).T
        tol = (inn + 16) * U32 * mag + 1e-7 * np.abs(bias.numpy())
        assert np.all(np.abs(y.double().numpy() - ref.numpy()) <= tol + 1e-30)
        # the scalar C++ reference (double accumulation) agrees with float64 torch
        yr = _C.ptq161_matmul(x.numpy(), *layer._operands(), wbits, group_size, inn, 0, False, True)
        np.testing.assert_allclose(yr + bias.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_kernel_is_independent_of_the_thread_count_and_batch_split():
    rng = np.random.default_rng(3)
    p = _random_parts(rng, 45, 203, 41, 4, -1)
    layer = PTQ161QuantLinear.from_parts(**p, wbits=4, group_size=-1)
    x = rng.normal(size=(19, 203)).astype(np.float32)
    ops = layer._operands()
    y1 = _C.ptq161_matmul(x, *ops, 4, -1, 203, 1, False, False)
    y2 = _C.ptq161_matmul(x, *ops, 4, -1, 203, 2, False, False)
    assert np.array_equal(y1, y2)
    # rows of a full tile of 8 and single rows go through different table widths
    for b in (0, 8, 16, 18):
        yb = _C.ptq161_matmul(x[b:b + 1], *ops, 4, -1, 203, 0, False, False)
        np.testing.assert_allclose(yb[0], y1[b], rtol=1e-5, atol=1e-6)


def test_bit_packing_layout():
    bits = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 1, 1]], bool)
    assert pack_bits(bits).tolist() == [[1, 3]]  # little-endian in each byte, zero padding
    assert np.array_equal(unpack_bits(pack_bits(bits), 10), bits)


def test_memory_really_drops():
    rng = np.random.default_rng(0)
    p = _random_parts(rng, 576, 576, 115, 4, -1)
    layer = PTQ161QuantLinear.from_parts(**p, wbits=4, group_size=-1)
    # signs 461 bits + codes 115*4 bits per row, per-row fp16 α, μ, r1 + grid, r2, mask
    expect = 576 * (58 * 8 + 15 * 32 + 3 * 16 + 2 * 16) + 461 * 16 + 72 * 8
    assert layer.storage_bits() == expect
    assert layer.bits_per_weight() < 2.0


def test_bad_inputs_raise():
    rng = np.random.default_rng(1)
    p = _random_parts(rng, 6, 20, 5, 4, -1)
    good = PTQ161QuantLinear.from_parts(**p, wbits=4, group_size=-1)
    with pytest.raises(ValueError, match="signs must have shape"):
        PTQ161QuantLinear.from_parts(**{**p, "signs": p["signs"][:, 1:]}, wbits=4, group_size=-1)
    with pytest.raises(ValueError, match="alpha has NaN"):
        PTQ161QuantLinear.from_parts(**{**p, "alpha": np.full(6, np.nan, np.float32)}, wbits=4,
                                     group_size=-1)
    with pytest.raises(ValueError, match="codes must be in 0..15"):
        PTQ161QuantLinear.from_parts(**{**p, "codes": p["codes"] + 16}, wbits=4, group_size=-1)
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        PTQ161QuantLinear.from_parts(**p, wbits=1, group_size=-1)
    with pytest.raises(ValueError, match="group_size"):
        PTQ161QuantLinear.from_parts(**p, wbits=4, group_size=48)
    with pytest.raises(ValueError, match="r2 must have shape"):
        PTQ161QuantLinear.from_parts(**{**p, "r2": p["r2"][:-1]}, wbits=4, group_size=-1)
    with pytest.raises(ValueError, match="in_features=20"):
        good(torch.randn(3, 21))
    with pytest.raises(TypeError, match="dtype"):
        good(torch.ones(3, 20, dtype=torch.int32))
    # corrupt buffers as a loaded file could hold them
    bad = copy.deepcopy(good)
    bad.mask[-1] |= 0x80  # a bit past in_features=20
    with pytest.raises(ValueError, match="past in_features|mask marks"):
        bad.validate()
    bad = copy.deepcopy(good)
    bad.signs[0, -1] |= 0x80  # a sign past the 15 binarised channels
    with pytest.raises(ValueError, match="past its 15 binarised"):
        bad.validate()
    bad = copy.deepcopy(good)
    bad.r1[2] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        bad.validate()
    bad = copy.deepcopy(good)
    bad.scales.zero_()
    with pytest.raises(ValueError):
        bad.validate()
    ops = list(good._operands())
    ops[1] = ops[1][:, :1]  # truncated signs
    with pytest.raises(ValueError, match="signs must have 2 bytes"):
        _C.ptq161_matmul(np.zeros((1, 20), np.float32), *ops, 4, -1, 20, 0, False, False)
    with pytest.raises(ValueError, match="n_salient must be"):
        PTQ161QuantLinear(20, 6, n_salient=21)


# -- the quantizer pieces -----------------------------------------------------------

def test_mask_picks_the_channels_the_statistic_ranks_highest():
    g = torch.Generator().manual_seed(0)
    for n, ratio in ((576, 0.2), (53, 0.2), (10, 0.0), (10, 1.0), (7, 0.5)):
        stat = torch.rand(n, generator=g)
        m = salient_mask(stat, ratio)
        k = int(round(ratio * n))
        assert int(m.sum()) == k
        top = set(np.argsort(-stat.numpy())[:k].tolist())
        assert set(torch.nonzero(m).flatten().tolist()) == top
        if 0 < k < n:
            assert stat[m].min() >= stat[~m].max()
    with pytest.raises(ValueError, match="NaN"):
        salient_mask(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="salient_ratio"):
        salient_mask(torch.ones(4), 1.5)


def test_closed_form_alpha_is_the_l2_optimum_for_fixed_signs():
    rng = np.random.default_rng(5)
    w = rng.standard_t(4, size=(23, 67))
    mask = np.zeros(67, bool)
    mask[rng.choice(67, 13, replace=False)] = True
    signs, alpha, mu = binarize(torch.from_numpy(w), torch.from_numpy(mask))
    wb = w[:, ~mask]
    np.testing.assert_allclose(mu.numpy(), wb.mean(axis=1), rtol=1e-12)
    d = wb - wb.mean(axis=1, keepdims=True)
    s = np.where(d >= 0, 1.0, -1.0)
    assert np.array_equal(signs.numpy(), d >= 0)
    for o in range(w.shape[0]):  # least squares d ≈ α s, one unknown per row
        a_ls = np.linalg.lstsq(s[o][:, None], d[o], rcond=None)[0][0]
        np.testing.assert_allclose(alpha[o].item(), a_ls, rtol=1e-12)
        err = lambda a: np.sum((d[o] - a * s[o]) ** 2)  # noqa: E731
        assert err(alpha[o].item()) <= min(err(alpha[o].item() * 1.01), err(alpha[o].item() * 0.99))


def test_salient_grid_and_codes():
    rng = np.random.default_rng(2)
    w = torch.from_numpy(rng.normal(size=(9, 40)).astype(np.float32))
    mask = torch.zeros(40, dtype=torch.bool)
    mask[torch.tensor([0, 3, 5, 7, 11, 20, 21, 22, 30, 39])] = True
    layer = ptq161_linear(w, mask, wbits=4, group_size=-1)
    wh = layer.dequantize()
    ws = w[:, mask]
    lo = ws.min(dim=1).values.clamp(max=0)
    hi = ws.max(dim=1).values.clamp(min=0)
    scale = layer.scales.float()[:, 0]
    np.testing.assert_allclose(scale.numpy(), ((hi - lo) / 15).half().float().numpy())
    # in range, a weight is at most half a step from its code (plus the fp16 rounding of the scale)
    assert torch.all((wh[:, mask] - ws).abs() <= scale[:, None] * 0.5 + 1e-3 * scale[:, None])
    # the binarised part is r1 r2 (α s + μ) with r1 = r2 = 1: ±α + μ, the signs of w - μ
    signs, alpha, mu = binarize(w, mask)
    expect = torch.where(signs, alpha.half().float()[:, None], -alpha.half().float()[:, None]) + \
        mu.half().float()[:, None]
    assert torch.equal(wh[:, ~mask], expect)
    assert torch.equal(layer.salient_mask(), mask)
    # group grids over the salient columns
    s, z = salient_grid(ws, 3, 32)
    assert s.shape == (9, 1) and z.shape == (9, 1)
    s, z = salient_grid(torch.randn(9, 70), 3, 32)
    assert s.shape == (9, 3) and torch.all((z >= 0) & (z <= 7))


def test_quantizer_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        ptq161_linear(torch.full((3, 4), float("nan")), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        ptq161_linear(torch.randn(3, 4), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bits must be 1"):
        PTQ161(bits=2)
    with pytest.raises(ValueError, match="salient_ratio"):
        PTQ161(salient_ratio=-0.1)
    with pytest.raises(ValueError, match="group_size"):
        PTQ161(group_size=100)
    with pytest.raises(ValueError, match="abits"):
        PTQ161(abits=0)
    with pytest.raises(ValueError, match="calibration"):
        sqllm.quantize(make_tiny_llama(), method="ptq161", progress=False)


# -- LET ------------------------------------------------------------------------

def _block0_io(model, ids):
    from sqllm.calib.blocks import find_decoder_blocks
    from sqllm.calib.streamer import BlockInputs, capture_block_inputs

    name, blocks = find_decoder_blocks(model)
    hidden, args, kwargs = capture_block_inputs(model, name, blocks, ids)
    return blocks[0], BlockInputs(hidden, args[0], kwargs[0])


def test_let_folding_leaves_the_function_unchanged(calib_ids):
    model = make_tiny_llama()
    block, inputs = _block0_io(model, calib_ids)
    before = inputs.run(block)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    groups = find_norm_groups(block, linears, lambda b: inputs.run(b))
    assert dict(groups) == {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj",
                                                "self_attn.v_proj"],
                            "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}
    g = torch.Generator().manual_seed(0)
    for norm, names in groups:
        s = torch.exp(torch.randn(64, generator=g))
        fold_let(block.get_submodule(norm), [linears[n] for n in names], s)
    after = inputs.run(block)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32, a factor e^±3 moved


def test_let_fold_with_a_shift_needs_and_uses_a_norm_bias():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(12)
    torch.nn.init.normal_(norm.bias)
    lins = [torch.nn.Linear(12, 5), torch.nn.Linear(12, 7, bias=False)]
    x = torch.randn(4, 12)
    before = [lin(norm(x)) for lin in lins]
    fold_let(norm, lins, torch.rand(12) + 0.5, shift=torch.randn(12))
    for a, lin in zip(before, lins):
        torch.testing.assert_close(lin(norm(x)), a, rtol=1e-5, atol=1e-5)
    rms = torch.nn.RMSNorm(12) if hasattr(torch.nn, "RMSNorm") else None
    if rms is not None:
        with pytest.raises(ValueError, match="needs a norm with a bias"):
            fold_let(rms, lins, torch.ones(12), shift=torch.ones(12))
    with pytest.raises(ValueError, match="non-zero"):
        fold_let(norm, lins, torch.zeros(12))


# -- the method -----------------------------------------------------------------

def _logit_error(model, ref, ids):
    with torch.no_grad():
        return float(((model(ids).logits - ref) ** 2).mean())


def test_block_training_lowers_the_output_error(calib_ids):
    fp = make_tiny_llama()
    with torch.no_grad():
        ref = fp(calib_ids).logits
    errs = {}
    for epochs in (0, 6):
        model = make_tiny_llama()
        qm_opts = dict(epochs=epochs, alpha_lr=5e-3, factor_lr=1e-2)
        sqllm.quantize(model, method="ptq161", calibration=calib_ids, progress=False, **qm_opts)
        errs[epochs] = _logit_error(model, ref, calib_ids)
        assert isinstance(model.model.layers[1].mlp.down_proj, PTQ161QuantLinear)
    assert errs[6] < 0.9 * errs[0], errs


def test_training_lowers_each_blocks_loss_and_is_seeded(calib_ids):
    from sqllm.calib.streamer import stream_quantize

    outs = []
    for _ in range(2):
        model = make_tiny_llama()
        qm = PTQ161(epochs=5, lwc=True, alpha_lr=5e-3, factor_lr=1e-2, seed=3)
        stream_quantize(model, qm, calib_ids, progress=False)
        for hist in qm.history.values():
            assert len(hist) == 5 and hist[-1] < hist[0]
        outs.append(model.model.layers[1].self_attn.o_proj.state_dict())
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_lwc_let_abits_options_save_and_load(tmp_path, calib_ids):
    model = make_tiny_llama()
    sqllm.quantize(model, method="ptq161", calibration=calib_ids, progress=False, epochs=2,
                   lwc=True, let=True, abits=8, salient_ratio=0.25, group_size=32)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PTQ161QuantLinear)
    assert layer.n_salient == 16 and layer.abits == 8 and layer.group_size == 32
    opts = model.config.quantization_config["options"]
    assert opts["let"] and opts["lwc"] and opts["salient_ratio"] == 0.25
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    assert torch.isfinite(before).all()
    folder = sqllm.save_quantized(model, tmp_path / "q")
    loaded = sqllm.load_quantized(folder)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    # masks reused for a second PTQ (the step after the restorative LoRA)
    again = make_tiny_llama()
    sqllm.quantize(again, method="ptq161", calibration=calib_ids, progress=False, epochs=0,
                   salient_ratio=0.5, masks=str(folder))
    for name, m in again.named_modules():
        if isinstance(m, PTQ161QuantLinear):
            assert torch.equal(m.mask, loaded.get_submodule(name).mask), name


def test_cli_quantize_ptq161(tmp_path, tiny_model_dir, capsys):
    from sqllm.cli import main

    model_dir, text = tiny_model_dir
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "ptq161", "--help"])
    helptext = capsys.readouterr().out
    for flag in ("--wbits", "--group-size", "--abits", "--lwc", "--let", "--lwc-lr", "--let-lr",
                 "--epochs", "--salient-ratio", "--masks"):
        assert flag in helptext, flag
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--out", str(out), "--method", "ptq161",
                 "--epochs", "1", "--lwc", "--nsamples", "2", "--seqlen", "16",
                 "--calib-text", str(text), "-q"]) == 0
    qc = sqllm.read_quantization_config(out)
    assert qc.method == "ptq161" and qc.options["epochs"] == 1 and qc.options["lwc"]
    loaded = sqllm.load_quantized(out)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, PTQ161QuantLinear)


# -- restorative LoRA ----------------------------------------------------------------

def test_restorative_lora_merges_the_adapters_and_resumes(tmp_path, calib_ids):
    pytest.importorskip("peft")
    from sqllm.ptq161_lora import restorative_lora

    q = make_tiny_llama()
    sqllm.quantize(q, method="ptq161", calibration=calib_ids, progress=False, epochs=0)
    fp = make_tiny_llama()
    before = {n: m.weight.detach().clone() for n, m in fp.named_modules()
              if isinstance(m, torch.nn.Linear)}
    restorative_lora(fp, q, calib_ids, r=4, steps=4, lr=1e-3, state_dir=tmp_path / "s",
                     save_every=2, progress=False)
    changed = {n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)
               and not torch.equal(m.weight, before[n])}
    # upstream's targets: q/k/v/gate/up/down of both blocks, not o_proj, not lm_head
    assert changed == {f"model.layers.{i}.{p}" for i in (0, 1) for p in
                       ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    # the merged change is the adapters' product B·A·(alpha/r), from the saved state
    st = torch.load(tmp_path / "s" / "lora_state.pt", weights_only=False)
    assert st["step"] == 4
    name = "model.layers.1.mlp.up_proj"
    a = next(v for k, v in st["adapter"].items() if name in k and "lora_A" in k)
    b = next(v for k, v in st["adapter"].items() if name in k and "lora_B" in k)
    torch.testing.assert_close(fp.get_submodule(name).weight - before[name], b @ a * (16 / 4),
                               rtol=1e-4, atol=1e-6)
    # a rerun with the same state resumes at the end: no further training, same merge
    fp2 = make_tiny_llama()
    restorative_lora(fp2, q, calib_ids, r=4, steps=4, lr=1e-3, state_dir=tmp_path / "s",
                     progress=False)
    assert torch.equal(fp2.get_submodule(name).weight, fp.get_submodule(name).weight)
    with pytest.raises(ValueError, match="other LoRA settings"):
        restorative_lora(make_tiny_llama(), q, calib_ids, r=8, steps=4,
                         state_dir=tmp_path / "s", progress=False)


def test_lora_steps_in_the_cli(tmp_path, tiny_model_dir):
    pytest.importorskip("peft")
    from sqllm.cli import main

    model_dir, text = tiny_model_dir
    common = ["--calib-text", str(text), "--nsamples", "2", "--seqlen", "16", "-q"]
    q1, merged, q2, one = (tmp_path / n for n in ("q1", "merged", "q2", "one"))
    assert main(["quantize", "--model", str(model_dir), "--out", str(q1), "--method", "ptq161",
                 "--epochs", "1", *common]) == 0
    assert main(["ptq161-lora", "--model", str(model_dir), "--quantized", str(q1), "--merge-only",
                 "--out", str(merged), "--lora-r", "4", "--lora-steps", "2", *common]) == 0
    assert main(["quantize", "--model", str(merged), "--out", str(q2), "--method", "ptq161",
                 "--masks", str(q1), "--epochs", "1", *common]) == 0
    assert main(["ptq161-lora", "--model", str(model_dir), "--out", str(one), "--lora-r", "4",
                 "--lora-steps", "2", "--epochs", "1", *common]) == 0
    a, b, c = (sqllm.load_quantized(f) for f in (q1, q2, one))
    for name, m in a.named_modules():
        if isinstance(m, PTQ161QuantLinear):
            assert torch.equal(b.get_submodule(name).mask, m.mask)
            assert torch.equal(c.get_submodule(name).mask, m.mask)  # same data, same first pass


def test_activation_statistics_are_saved_and_reused(tmp_path, calib_ids):
    sd = tmp_path / "stats"
    a = make_tiny_llama()
    sqllm.quantize(a, method="ptq161", calibration=calib_ids, progress=False, epochs=0,
                   stats_dir=sd)
    files = sorted((sd / "act_stats").glob("*.safetensors"))
    assert len(files) == 14  # 7 Linears x 2 blocks
    stamp = {f: f.stat().st_mtime_ns for f in files}
    b = make_tiny_llama()
    sqllm.quantize(b, method="ptq161", calibration=calib_ids, progress=False, epochs=0,
                   stats_dir=sd)
    assert {f: f.stat().st_mtime_ns for f in files} == stamp  # read, not rewritten
    for name, m in a.named_modules():
        if isinstance(m, PTQ161QuantLinear):
            assert torch.equal(b.get_submodule(name).mask, m.mask)
