"""transformers' AutoModelForCausalLM.from_pretrained reads sqllm folders (after `import sqllm`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sqllm
from sqllm import QuantLinear

from conftest import make_tiny_llama

DATA = Path(__file__).resolve().parent.parent / "data"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method,kwargs", [
    ("squeezellm", {"sparsity": 0.02}),
    ("squeezellm", {"group_axis": "column", "sparsity": 0.02}),
    ("rtn", {}),
])
def test_from_pretrained_equals_load_quantized(tmp_path, calib_ids, method, kwargs):
    m = make_tiny_llama()
    sqllm.quantize(m, method=method, bits=3, calibration=calib_ids, progress=False, **kwargs)
    ids = calib_ids[:2]
    before = _logits(m, ids)
    folder = sqllm.save_quantized(m, tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    ours = sqllm.load_quantized(folder)
    quantized = {n: type(mod) for n, mod in hf.named_modules()
                 if isinstance(mod, sqllm.QuantLinearBase)}
    assert set(quantized) == set(sqllm.read_quantization_config(folder).layers)
    assert isinstance(hf.lm_head, torch.nn.Linear) and not hf.training
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    layer = hf.model.layers[0].mlp.down_proj
    if method == "rtn":  # RTN stores the uniform format
        assert isinstance(layer, sqllm.UniformQuantLinear)
    else:
        assert isinstance(layer, QuantLinear)
        assert layer.group_axis == kwargs.get("group_axis", "row")
        assert (layer.nnz > 0) == ("sparsity" in kwargs)
    got = _logits(hf, ids)
    assert torch.equal(got, _logits(ours, ids))
    assert torch.equal(got, before)
    # The config on the model is transformers' wrapper of the sqllm object.
    qc = hf.config.quantization_config
    assert qc.quant_method == "sqllm"
    assert qc.sqllm_config == sqllm.read_quantization_config(folder)
    # save_pretrained writes it back unchanged; sqllm.save_quantized takes the model too.
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"] == \
        json.loads((folder / "config.json").read_text())["quantization_config"]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids), before)
    again = sqllm.save_quantized(hf, tmp_path / "again")
    assert torch.equal(_logits(sqllm.load_quantized(again), ids), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_pretrained_with_a_dtype_equals_load_quantized(tmp_path, calib_ids, dtype):
    m = make_tiny_llama()
    sqllm.quantize(m, bits=4, calibration=calib_ids, sparsity=0.02, progress=False)
    folder = sqllm.save_quantized(m, tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    ours = sqllm.load_quantized(folder, dtype=dtype)
    assert hf.model.embed_tokens.weight.dtype == ours.model.embed_tokens.weight.dtype == dtype
    for model in (hf, ours):  # the format's own buffers keep their dtypes
        layer = model.model.layers[1].self_attn.v_proj
        assert layer.lookup_table.dtype == torch.float32
        assert layer.sparse_values.dtype == torch.float16
    assert torch.equal(_logits(hf, calib_ids[:1]), _logits(ours, calib_ids[:1]))


def test_from_pretrained_reads_a_version_1_folder():
    from safetensors.torch import load_file

    expected = load_file(str(DATA / "v1_tiny_expected.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(DATA / "v1_tiny")
    ours = sqllm.load_quantized(DATA / "v1_tiny")
    ids = expected["input_ids"]
    assert torch.equal(_logits(hf, ids), _logits(ours, ids))
    assert hf.config.quantization_config.to_dict()["format_version"] == 2


def test_from_pretrained_errors_are_sqllm_messages(tmp_path, calib_ids):
    m = make_tiny_llama()
    sqllm.quantize(m, method="rtn", bits=4, progress=False)
    folder = sqllm.save_quantized(m, tmp_path / "q")
    cfg_file = folder / "config.json"
    good = cfg_file.read_text()
    cfg = json.loads(good)
    cfg["quantization_config"]["format_version"] = 3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 3 was written by a newer sqllm"):
        AutoModelForCausalLM.from_pretrained(folder)
    cfg = json.loads(good)
    cfg["quantization_config"]["layers"]["model.ghost"] = \
        cfg["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="names layer 'model.ghost', which the model does not have"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_from_pretrained_refuses_to_quantize_on_load(tiny_model_dir):
    from sqllm.hf_integration import SqllmHfConfig

    m = make_tiny_llama()
    sqllm.quantize(m, method="rtn", bits=4, progress=False)
    cfg = SqllmHfConfig.from_dict(m.config.quantization_config)
    model_dir, _ = tiny_model_dir
    with pytest.raises(ValueError, match="only loads sqllm folders"):
        AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg)


_CHILD = textwrap.dedent("""
    import sys, torch
    {first}
    import sqllm
    hooked = "transformers.quantizers.auto" not in sys.modules
    from transformers import AutoModelForCausalLM
    folder = sys.argv[1]
    a = AutoModelForCausalLM.from_pretrained(folder)
    b = sqllm.load_quantized(folder)
    ids = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        same = torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    print(type(a.model.layers[0].self_attn.q_proj).__name__, hooked, same)
""")


@pytest.mark.parametrize("first,hooked", [("", "True"),
                                          ("import transformers.quantizers.auto", "False")])
def test_registration_in_a_fresh_interpreter(first, hooked):
    """`import sqllm` before transformers (registers through the import hook, without
    importing transformers' quantizers itself) and after it (registers at once)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(sqllm.__file__).parent.parent),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _CHILD.format(first=first), str(DATA / "v1_tiny")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["QuantLinear", hooked, "True"]


def test_dequantize_returns_plain_linears_with_the_represented_weights(tmp_path, calib_ids):
    m = make_tiny_llama()
    sqllm.quantize(m, bits=3, calibration=calib_ids, sparsity=0.02, progress=False)
    folder = sqllm.save_quantized(m, tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    weights = {n: mod.dequantize() for n, mod in hf.named_modules() if isinstance(mod, QuantLinear)}
    ids = calib_ids[:1]
    before = _logits(hf, ids)
    plain = hf.dequantize()
    assert not any(isinstance(mod, sqllm.QuantLinearBase) for mod in plain.modules())
    assert getattr(plain.config, "quantization_config", None) is None
    for n, w in weights.items():
        lin = plain.get_submodule(n)
        assert type(lin) is torch.nn.Linear and torch.equal(lin.weight, w)
    # Same weights, another matmul (fp32 sums in another order).
    torch.testing.assert_close(_logits(plain, ids), before, rtol=1e-4, atol=1e-5)
