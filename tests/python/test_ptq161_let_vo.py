"""PTQ1.61's v→o LET (upstream's out-projection smoothing): folding and training."""
from __future__ import annotations

import pytest
import torch

import sqllm
from sqllm.calib.streamer import stream_quantize
from sqllm.nn_ptq161 import PTQ161QuantLinear
from sqllm.ptq161 import PTQ161, expand_vo_scale, fold_let_vo, vo_heads

from conftest import make_tiny_llama


def _block0_io(model, ids):
    from sqllm.calib.blocks import find_decoder_blocks
    from sqllm.calib.streamer import BlockInputs, capture_block_inputs

    name, blocks = find_decoder_blocks(model)
    hidden, args, kwargs = capture_block_inputs(model, name, blocks, ids)
    return blocks[0], BlockInputs(hidden, args[0], kwargs[0])


def test_expansion_follows_grouped_query_attention():
    # query head h reads kv head h // groups (transformers' repeat_kv): o_proj column
    # h * head_dim + d carries the scale of value channel (h // groups) * head_dim + d
    heads, kv, hd = 6, 2, 5
    groups = heads // kv
    s = torch.arange(kv * hd, dtype=torch.float32) + 1
    want = torch.tensor([float(s[(h // groups) * hd + d]) for h in range(heads) for d in range(hd)])
    assert torch.equal(expand_vo_scale(s, hd, groups), want)


def test_vo_folding_leaves_the_block_function_unchanged(calib_ids):
    model = make_tiny_llama()  # 4 query heads, 2 kv heads: grouped-query attention
    block, inputs = _block0_io(model, calib_ids)
    before = inputs.run(block)
    linears = {f"model.layers.0.{n}": m for n, m in block.named_modules()
               if isinstance(m, torch.nn.Linear)}
    vo = vo_heads(block, linears)
    assert vo == ("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj", 16, 2)
    w_o = linears[vo[1]].weight.clone()
    s = torch.exp(torch.randn(32, generator=torch.Generator().manual_seed(0)))
    fold_let_vo(linears[vo[0]], linears[vo[1]], s, vo[2], vo[3])
    assert not torch.allclose(linears[vo[1]].weight, w_o)  # the weights did change
    after = inputs.run(block)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32, a factor e^±3 moved
    with pytest.raises(ValueError, match="non-zero"):
        fold_let_vo(linears[vo[0]], linears[vo[1]], torch.zeros(32), 16, 2)
    with pytest.raises(ValueError, match="32 entries"):
        fold_let_vo(linears[vo[0]], linears[vo[1]], torch.ones(64), 16, 2)


def test_training_with_the_vo_scale(calib_ids):
    outs = {}
    for let_vo in (False, True):
        model = make_tiny_llama()
        qm = PTQ161(epochs=2, let=True, let_vo=let_vo, alpha_lr=5e-3, factor_lr=1e-2, seed=1)
        stream_quantize(model, qm, calib_ids, progress=False)
        for hist in qm.history.values():
            assert len(hist) == 2 and all(torch.isfinite(torch.tensor(hist)))
        o = model.model.layers[0].self_attn.o_proj
        assert isinstance(o, PTQ161QuantLinear)
        with torch.no_grad():
            logits = model(calib_ids).logits
        assert torch.isfinite(logits).all()
        outs[let_vo] = o.dequantize()
    # the v→o scale was trained and folded into o_proj's columns
    assert not torch.equal(outs[False], outs[True])


def test_let_vo_option_in_the_quantize_api(calib_ids):
    model = make_tiny_llama()
    sqllm.quantize(model, method="ptq161", calibration=calib_ids, progress=False, epochs=1,
                   let=True, let_vo=False)
    assert model.config.quantization_config["options"]["let_vo"] is False
