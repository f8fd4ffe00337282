"""Upstream SqueezeLLM checkpoints: written here by an independent packer that
follows the upstream description word by word, then loaded by sqllm."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import sqllm
from sqllm import QuantLinear
from sqllm.upstream import load_squeezellm_checkpoint, save_squeezellm_checkpoint

from conftest import make_tiny_llama


def upstream_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes (out, in) -> qweight int32 (in*bits/32, out), per the upstream layout."""
    out_f, in_f = codes.shape
    words = np.zeros((in_f * bits // 32, out_f), dtype=np.uint64)
    c = codes.T.astype(np.uint64)  # (in, out)
    if bits == 4:
        for r in range(in_f // 8):
            for j in range(8):
                words[r] |= c[8 * r + j] << np.uint64(4 * j)
    elif bits == 3:
        for blk in range(in_f // 32):
            x = c[32 * blk: 32 * blk + 32]
            w0 = np.zeros(out_f, np.uint64)
            w1 = np.zeros(out_f, np.uint64)
            w2 = np.zeros(out_f, np.uint64)
            for j in range(10):
                w0 |= x[j] << np.uint64(3 * j)
            w0 |= (x[10] & np.uint64(3)) << np.uint64(30)
            w1 |= (x[10] >> np.uint64(2)) & np.uint64(1)
            for j in range(11, 21):
                w1 |= x[j] << np.uint64(3 * (j - 11) + 1)
            w1 |= (x[21] & np.uint64(1)) << np.uint64(31)
            w2 |= x[21] >> np.uint64(1)
            for j in range(22, 32):
                w2 |= x[j] << np.uint64(3 * (j - 22) + 2)
            words[3 * blk], words[3 * blk + 1], words[3 * blk + 2] = w0, w1, w2
    else:
        raise AssertionError(bits)
    return (words & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


def write_upstream(tmp_path, model, bits, sparse, rng, column=False, full=False):
    """Random codes/tables per Linear; returns (path, reference weights)."""
    state, ref = {}, {}
    for name, lin in model.named_modules():
        if not isinstance(lin, nn.Linear) or name == "lm_head":
            continue
        out_f, in_f = lin.weight.shape
        codes = rng.integers(0, 2 ** bits, size=(out_f, in_f))
        groups = in_f if column else out_f
        lut = np.sort(rng.normal(0, 0.05, size=(groups, 2 ** bits)).astype(np.float32), axis=1)
        w = lut[np.arange(out_f)[:, None], codes] if not column else lut[np.arange(in_f)[None, :], codes]
        state[name + ".qweight"] = torch.from_numpy(upstream_pack(codes, bits))
        state[name + ".lookup_table"] = torch.from_numpy(lut)
        if sparse:
            mask = rng.random((out_f, in_f)) < 0.02
            vals = rng.normal(0, 0.3, size=int(mask.sum())).astype(np.float16).astype(np.float32)
            rows = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
            cols = np.nonzero(mask)[1].astype(np.int32)
            state[name + ".rows"] = torch.from_numpy(rows)
            state[name + ".cols"] = torch.from_numpy(cols)
            state[name + ".vals"] = torch.from_numpy(vals)
            state["sparse_threshold." + name] = torch.tensor(int(mask.sum()))
            w = w.copy()
            w[mask] += vals
        ref[name] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    if full:
        for k, v in model.state_dict().items():
            if k.rsplit(".", 1)[0] not in ref:
                state[k] = v
    path = tmp_path / "sq.pt"
    torch.save(state, path)
    (tmp_path / "quant_config.json").write_text(json.dumps({"wbits": bits}))
    return path, ref


def _reference_model(ref):
    m = make_tiny_llama()
    with torch.no_grad():
        for name, w in ref.items():
            m.get_submodule(name).weight.copy_(w)
    return m


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sparse", [False, True])
def test_upstream_checkpoint_loads_with_matching_logits(tmp_path, bits, sparse):
    rng = np.random.default_rng(bits * 10 + sparse)
    path, ref = write_upstream(tmp_path, make_tiny_llama(), bits, sparse, rng)
    model = load_squeezellm_checkpoint(path, make_tiny_llama())
    for name, w in ref.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.bits == bits
        assert (layer.nnz > 0) == sparse
        # Sparse values were already fp16-representable, so the weight is exact.
        assert torch.equal(layer.dequantize(), w)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        expect = _reference_model(ref)(input_ids=ids).logits
    # Same weights; only the fp32 summation order differs (relative ~1e-6).
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-4)


def test_column_grouped_variant_and_full_checkpoint(tmp_path):
    rng = np.random.default_rng(7)
    base = make_tiny_llama(seed=3)
    path, ref = write_upstream(tmp_path, base, 4, False, rng, column=True, full=True)
    # A non-square layer's table shape tells the variant; a square one's cannot.
    auto = load_squeezellm_checkpoint(path, make_tiny_llama(seed=5))
    assert auto.model.layers[0].mlp.up_proj.group_axis == "column"  # 96 x 64
    assert auto.model.layers[0].self_attn.q_proj.group_axis == "row"  # 64 x 64: ambiguous
    # other weights come from the file
    model = load_squeezellm_checkpoint(path, make_tiny_llama(seed=5), group_axis="column")
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    for name, w in ref.items():
        assert torch.equal(model.get_submodule(name).dequantize(), w)


def test_round_trip_through_our_writer_and_sqllm_format(tmp_path):
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    m = sqllm.quantize(make_tiny_llama(), bits=3, calibration=calib, sparsity=0.01,
                       progress=False)
    ids = calib[:1]
    with torch.no_grad():
        before = m(input_ids=ids).logits
    save_squeezellm_checkpoint(m, tmp_path / "up" / "model.pt")
    loaded = load_squeezellm_checkpoint(tmp_path / "up" / "model.pt", make_tiny_llama())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)
    # and from there into sqllm's own format
    again = sqllm.load_quantized(sqllm.save_quantized(loaded, tmp_path / "ours"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)


def test_malformed_upstream_checkpoints_raise(tmp_path):
    rng = np.random.default_rng(1)
    path, _ = write_upstream(tmp_path, make_tiny_llama(), 3, True, rng)
    state = torch.load(path, weights_only=True)
    name = "model.layers.0.self_attn.q_proj"

    def load_with(mutate, match, **kw):
        s = {k: v.clone() for k, v in state.items()}
        mutate(s)
        torch.save(s, path)
        with pytest.raises(ValueError, match=match):
            load_squeezellm_checkpoint(path, make_tiny_llama(), **kw)

    load_with(lambda s: s.__setitem__(name + ".qweight", s[name + ".qweight"][:-1]), "qweight must have shape")
    load_with(lambda s: s.__setitem__(name + ".lookup_table", s[name + ".lookup_table"][:, :4]), "lookup_table")
    load_with(lambda s: s[name + ".cols"].__setitem__(0, 10_000), "out of range")
    load_with(lambda s: s.__setitem__(name + ".rows", s[name + ".rows"][:-1]), "rows must have")
    load_with(lambda s: s.pop(name + ".cols"), "incomplete sparse part")
    load_with(lambda s: s.__setitem__("model.layers.9.mlp.up_proj.qweight", s[name + ".qweight"]), "not in the model")
    load_with(lambda s: None, "unsupported SqueezeLLM bit width", wbits=5)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_squeezellm_checkpoint(path, make_tiny_llama())
    (tmp_path / "quant_config.json").unlink()
    with pytest.raises(ValueError, match="wbits"):
        load_squeezellm_checkpoint(path, make_tiny_llama())
