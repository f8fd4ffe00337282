"""End to end on a tiny random LLaMA: quantize, save, load, CLI, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import sqllm
from sqllm import QuantLinear
from sqllm.cli import main as cli_main

from conftest import make_tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quantize_replaces_every_decoder_linear(tiny_llama, calib_ids):
    names = {n for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    sqllm.quantize(tiny_llama, bits=4, calibration=calib_ids, progress=False)
    q = {n for n, m in tiny_llama.named_modules() if isinstance(m, QuantLinear)}
    assert q == names - {"lm_head"}
    assert len(q) == 2 * 7
    assert isinstance(tiny_llama.lm_head, nn.Linear)
    cfg = tiny_llama.config.quantization_config
    assert cfg["quant_method"] == "sqllm" and cfg["method"] == "squeezellm"
    assert cfg["options"]["bits"] == 4
    assert set(cfg["layers"]) == q
    assert cfg["calibration"]["nsamples"] == 4 and cfg["calibration"]["seqlen"] == 32


def test_quantized_logits_track_the_fp_model(calib_ids):
    fp = make_tiny_llama()
    ids = calib_ids[:1]
    ref = _logits(fp, ids)
    errs = {}
    for bits in (2, 4, 8):
        m = make_tiny_llama()
        sqllm.quantize(m, bits=bits, calibration=calib_ids, progress=False)
        errs[bits] = ((_logits(m, ids) - ref).norm() / ref.norm()).item()
    assert errs[8] < errs[4] < errs[2]
    assert errs[8] < 0.02


def test_save_load_gives_identical_logits(tmp_path, tiny_llama, calib_ids):
    sqllm.quantize(tiny_llama, bits=3, calibration=calib_ids, sparsity=0.01, progress=False)
    ids = calib_ids[:2]
    before = _logits(tiny_llama, ids)
    out = sqllm.save_quantized(tiny_llama, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["format_version"] == sqllm.FORMAT_VERSION
    loaded = sqllm.load_quantized(out)
    assert torch.equal(_logits(loaded, ids), before)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    layer = loaded.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.nnz > 0


@pytest.mark.parametrize("method,kwargs", [("rtn", {}), ("squeezellm", {"group_axis": "column"}),
                                           ("squeezellm", {"kmeans": "lloyd"}),
                                           ("squeezellm", {"weighted": False})])
def test_methods_and_options_round_trip(tmp_path, calib_ids, method, kwargs):
    m = make_tiny_llama()
    sqllm.quantize(m, method=method, bits=3, calibration=calib_ids, progress=False, **kwargs)
    ids = calib_ids[:1]
    before = _logits(m, ids)
    loaded = sqllm.load_quantized(sqllm.save_quantized(m, tmp_path / method))
    assert torch.equal(_logits(loaded, ids), before)


def test_failed_save_keeps_the_previous_folder(tmp_path, tiny_llama, calib_ids, monkeypatch):
    sqllm.quantize(tiny_llama, bits=3, calibration=calib_ids, progress=False)
    target = sqllm.save_quantized(tiny_llama, tmp_path / "q")
    good = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(self, folder, **kw):
        Path(folder, "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(type(tiny_llama), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        sqllm.save_quantized(tiny_llama, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == good
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary folder left


def test_corrupt_or_truncated_checkpoints_raise(tmp_path, tiny_llama, calib_ids):
    sqllm.quantize(tiny_llama, bits=3, calibration=calib_ids, progress=False)
    target = sqllm.save_quantized(tiny_llama, tmp_path / "q")
    st = target / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        sqllm.load_quantized(target)
    st.write_bytes(data)
    cfg = json.loads((target / "config.json").read_text())
    layer = "model.layers.0.self_attn.q_proj"
    cfg["quantization_config"]["layers"][layer]["params"]["bits"] = 4
    (target / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        sqllm.load_quantized(target)
    cfg["quantization_config"]["layers"][layer]["params"]["bits"] = 3
    cfg["quantization_config"]["format_version"] = 99
    (target / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version"):
        sqllm.load_quantized(target)
    del cfg["quantization_config"]
    (target / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no sqllm quantization_config"):
        sqllm.load_quantized(target)
    (target / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sqllm.load_quantized(target)


def test_quantize_rejects_bad_arguments(tiny_llama, calib_ids):
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        sqllm.quantize(tiny_llama, method="foo", calibration=calib_ids)
    with pytest.raises(ValueError, match="no option 'sparsity'"):
        sqllm.quantize(tiny_llama, method="rtn", sparsity=0.01)
    with pytest.raises(ValueError, match="calibration data"):
        sqllm.quantize(tiny_llama, bits=3, progress=False)
    with pytest.raises(TypeError, match="calibration must be"):
        sqllm.quantize(tiny_llama, bits=3, calibration=[1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        sqllm.quantize(tiny_llama, bits=3, calibration="austen:emma", progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        sqllm.quantize("model")
    with pytest.raises(ValueError, match="no sqllm quantization_config"):
        sqllm.save_quantized(make_tiny_llama(), "/tmp/never-written")


def test_fisher_is_the_sum_of_squared_per_sequence_gradients(tiny_llama, calib_ids):
    layers = sqllm.find_linear_layers(tiny_llama)
    fisher = sqllm.fisher_diagonal(tiny_llama, calib_ids[:3], layers, progress=False)
    # No gradient is left behind, and requires_grad flags are restored.
    assert all(p.grad is None and p.requires_grad for p in tiny_llama.parameters())
    name = "model.layers.1.mlp.up_proj"
    w = layers[name].weight
    expect = torch.zeros_like(w, dtype=torch.float64)
    for row in calib_ids[:3]:
        tiny_llama.zero_grad()
        ids = row.unsqueeze(0)
        tiny_llama(input_ids=ids, labels=ids).loss.backward()
        expect += w.grad.double() ** 2
    assert torch.allclose(fisher[name].double(), expect, rtol=1e-4, atol=1e-12)


def test_cli_quantize_eval_generate_info(tmp_path, tiny_model_dir, capsys):
    model_dir, text = tiny_model_dir
    out = tmp_path / "q"
    rc = cli_main(["quantize", "--model", str(model_dir), "--out", str(out), "--bits", "4",
                   "--calib-text", str(text), "--nsamples", "4", "--seqlen", "32", "--eval",
                   "--eval-text", str(text), "--eval-seqlen", "64", "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fp perplexity" in printed and "quantized perplexity" in printed
    assert (out / "config.json").is_file()
    assert cli_main(["eval", "--model", str(out), "--eval-text", str(text), "--eval-seqlen",
                     "64", "-q"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert cli_main(["generate", "--model", str(out), "--prompt", "It is",
                     "--max-new-tokens", "5", "-q"]) == 0
    assert capsys.readouterr().out.startswith("It is")
    assert cli_main(["info", str(out)]) == 0
    assert "squeezellm" in capsys.readouterr().out
    assert cli_main(["eval", "--model", str(out), "--eval-text", str(tmp_path / "missing.txt"),
                     "-q"]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_help_for_every_command(capsys):
    for cmd in ("quantize", "eval", "generate", "info", "demo"):
        with pytest.raises(SystemExit) as e:
            cli_main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: sqllm " + cmd in capsys.readouterr().out
