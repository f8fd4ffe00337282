"""Quantized token embeddings and the tied lm_head sharing their storage (nn_embedding.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import sqllm
from sqllm.nn import QuantLinear
from sqllm.nn_embedding import QuantEmbedding, quantize_embeddings

from conftest import make_tiny_llama


def _unpack_rows(qweight: torch.Tensor, bits: int, n: int) -> np.ndarray:
    """Reference decode of docs/formats.md's bit stream: code i of a row sits at
    bits [i*bits, (i+1)*bits) of the row's little-endian uint32 words."""
    words = qweight.numpy().view(np.uint32).astype(np.uint64)
    codes = np.zeros((words.shape[0], n), dtype=np.int64)
    for i in range(n):
        pos = i * bits
        w, off = divmod(pos, 32)
        v = words[:, w] >> np.uint64(off)
        if off + bits > 32:
            v |= words[:, w + 1] << np.uint64(32 - off)
        codes[:, i] = (v & np.uint64((1 << bits) - 1)).astype(np.int64)
    return codes


def _reference_matrix(q: QuantLinear) -> np.ndarray:
    codes = _unpack_rows(q.qweight, q.bits, q.in_features)
    tables = q.lookup_table.double().numpy()
    return np.take_along_axis(tables, codes, axis=1)


def _quantized(bits: int, tie: bool = True, seed: int = 0) -> nn.Module:
    model = make_tiny_llama(seed, tie=tie)
    sqllm.quantize(model, method="rtn", bits=4, progress=False, quantize_embeddings=bits)
    return model


@pytest.mark.parametrize("bits", [4, 8, 3])
def test_tied_embedding_shares_storage_and_matches_reference(bits):
    fp = make_tiny_llama(0)
    w = fp.get_input_embeddings().weight.detach().clone()
    model = _quantized(bits)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.tied
    assert isinstance(head, QuantLinear) and emb.storage is head
    assert head.bits == bits and head.group_axis == "row" and head.nnz == 0
    assert (head.out_features, head.in_features) == tuple(w.shape)
    ref = _reference_matrix(head)
    # Gathering rows decodes the same codes and tables: exact (fp32 table values).
    ids = torch.tensor([[0, 5, 256, 5], [17, 1, 2, 255]])
    got = emb(ids)
    assert got.shape == (2, 4, w.shape[1]) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.double().numpy(), ref[ids.numpy()])
    err = np.abs(ref - w.double().numpy())
    wd = w.double().numpy()
    if bits > 4:
        # A uniform grid over each row's range: error at most half a step
        # (plus the fp32 rounding of the table entries).
        lo, hi = wd.min(1, keepdims=True), wd.max(1, keepdims=True)
        step = (hi - lo) / (2 ** bits - 1)
        np.testing.assert_allclose(head.lookup_table.double().numpy(),
                                   lo + step * np.arange(2 ** bits), rtol=0, atol=1e-6)
        assert (err <= step / 2 + 1e-6).all()
    else:
        # Per-row k-means of the fp32 rows: each value's error is at most the
        # largest gap between the row's sorted centers (it is assigned to a
        # center no farther than its neighbours).
        gaps = np.diff(np.sort(head.lookup_table.double().numpy(), axis=1), axis=1).max(axis=1)
        span = w.double().numpy().max(1) - w.double().numpy().min(1)
        assert (err.max(axis=1) <= np.maximum(gaps, 1e-12) + 1e-6).all()
        assert (err.max(axis=1) <= span).all()


def test_tied_logits_equal_dequantized_reference_model():
    model = _quantized(4)
    head = model.get_output_embeddings()
    ref_model = make_tiny_llama(0)
    # Same decoder layers as the quantized model, embedding = the dequantized storage.
    for name, m in model.named_modules():
        if isinstance(m, sqllm.QuantLinearBase) and name != "lm_head":
            lin = ref_model.get_submodule(name)
            lin.weight.data = m.dequantize().float()
    ref_model.get_input_embeddings().weight.data = torch.from_numpy(
        _reference_matrix(head)).float()
    assert ref_model.lm_head.weight is ref_model.get_input_embeddings().weight
    ids = torch.randint(0, 257, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids).logits
        want = ref_model(ids).logits
    # fp32 both sides, different summation orders over 64..96 terms.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_size_counts_the_shared_storage_once():
    fp = make_tiny_llama(0)
    before = sqllm.size_report(fp)
    model = _quantized(4)
    rep = sqllm.size_report(model)
    head = model.get_output_embeddings()
    emb_fp32 = 257 * 64 * 4
    emb_q = sum(b.numel() * b.element_size() for n, b in head.named_buffers())
    # fp32 model counts the tied matrix once; so does the quantized one.
    assert rep["total_bytes"] < before["total_bytes"] - emb_fp32 + emb_q + 1
    names = {n for n, _ in model.named_buffers()}
    assert "lm_head.qweight" in names
    assert not any(n.startswith("model.embed_tokens") for n in names)
    cfg = model.config.quantization_config
    assert cfg["embeddings"] == {"model.embed_tokens": {"storage": "lm_head", "tied": True,
                                                         "bits": 4, "padding_idx": 256}}
    assert "lm_head" in cfg["layers"]


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_roundtrip(tmp_path, tie):
    model = _quantized(4, tie=tie)
    ids = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).logits
    sqllm.save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert "model.embed_tokens" in cfg["embeddings"]
    loaded = sqllm.load_quantized(tmp_path / "q")
    emb = loaded.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.tied is tie
    if tie:
        assert emb.storage is loaded.get_output_embeddings()
    else:
        assert isinstance(loaded.get_output_embeddings(), nn.Linear)
        assert "model.embed_tokens.rows.qweight" in dict(loaded.named_buffers())
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    out = loaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 12)


def test_untied_keeps_lm_head_and_quantizes_embedding_only():
    fp = make_tiny_llama(0, tie=False)
    head_w = fp.lm_head.weight.detach().clone()
    model = _quantized(8, tie=False)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and not emb.tied
    assert isinstance(model.lm_head, nn.Linear)
    torch.testing.assert_close(model.lm_head.weight, head_w, rtol=0, atol=0)
    assert "model.embed_tokens.rows" in model.config.quantization_config["layers"]


def test_bad_input():
    for bad in (1, 9, True, 4.0):
        with pytest.raises(ValueError, match="quantize_embeddings"):
            sqllm.quantize(make_tiny_llama(0), method="rtn", bits=4, progress=False,
                           quantize_embeddings=bad)
    # NaN in the embedding fails after the decoder layers were quantized: the
    # model gets all its original modules back.
    model = make_tiny_llama(0)
    with torch.no_grad():
        model.get_input_embeddings().weight[3, 5] = float("nan")
    originals = dict(model.named_modules())
    with pytest.raises(ValueError, match="NaN|finite"):
        sqllm.quantize(model, method="rtn", bits=4, progress=False, quantize_embeddings=4)
    assert dict(model.named_modules()).keys() == originals.keys()
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="in-memory"):
        sqllm.quantize(make_tiny_llama(0), method="rtn", bits=4, progress=False,
                       quantize_embeddings=4, stream=True)
    q = _quantized(4)
    emb = q.get_input_embeddings()
    with pytest.raises(IndexError, match="token ids"):
        emb(torch.tensor([0, 257]))
    with pytest.raises(IndexError, match="token ids"):
        emb(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        emb(torch.tensor([0.0]))
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 64)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_embeddings(q, 4)


def test_corrupt_config_is_refused(tmp_path):
    model = _quantized(4)
    sqllm.save_quantized(model, tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    good = json.loads(path.read_text())
    for entry, msg in (({"storage": "nope", "tied": True}, "not in quantization_config.layers"),
                       ({"storage": "lm_head"}, "'tied'"),
                       ("x", "must be an object")):
        cfg = json.loads(json.dumps(good))
        cfg["quantization_config"]["embeddings"]["model.embed_tokens"] = entry
        path.write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=msg):
            sqllm.load_quantized(tmp_path / "q")
