"""Regression tests for issue 12: no crash, no silent garbage, nothing lost.

One test (or a few) per defect class of the issue, in its order.  Every bad
input must give a ValueError/TypeError (FileNotFoundError for a missing path)
that names the file, tensor or argument, and must leave files and models as
they were.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sqllm
from sqllm import QuantLinear
from sqllm.io import _replace_folder, check_output_folder

from conftest import make_tiny_llama


def _small_layer(sparsity=0.05, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 64, generator=g)
    b = torch.randn(8, generator=g) if bias else None
    return QuantLinear.from_weight(w, bits=3, sparsity=sparsity, bias=b), w


@pytest.fixture()
def saved(tmp_path):
    model = make_tiny_llama()
    sqllm.quantize(model, bits=3, weighted=False, sparsity=0.01, progress=False)
    d = tmp_path / "q"
    sqllm.save_quantized(model, d)
    return d


def _edit_tensors(folder, edit):
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


# 1. in-place edits of CSR buffers after a forward are re-validated -----------------

@pytest.mark.parametrize("edit", [
    lambda l: l.sparse_col_idx.__setitem__(0, 10 ** 9),
    lambda l: l.sparse_row_ptr.__setitem__(1, 10 ** 6),
    lambda l: l.sparse_col_idx.fill_(-5),
    lambda l: l.sparse_values.__setitem__(0, float("inf")),
])
def test_inplace_csr_edit_after_forward_is_revalidated(edit):
    layer, _ = _small_layer()
    x = torch.randn(3, 64)
    layer(x)  # validated and cached
    edit(layer)
    with pytest.raises(ValueError, match="sparse"):
        layer(x)
    with pytest.raises(ValueError, match="sparse"):
        layer.dequantize()


def test_unchanged_buffers_are_not_revalidated(monkeypatch):
    layer, _ = _small_layer()
    x = torch.randn(2, 64)
    y0 = layer(x)
    calls = []
    monkeypatch.setattr(QuantLinear, "validate", lambda self: calls.append(1))
    torch.testing.assert_close(layer(x), y0, rtol=0, atol=0)
    assert calls == []


# 2. check_csr: bounds before reads (the C++ test runs it under ASan) ---------------

def test_check_csr_intermediate_row_ptr_beyond_nnz():
    rp = np.array([0, 1000, 2], dtype=np.int32)
    ci = np.array([0, 1], dtype=np.int32)
    va = np.array([1.0, 1.0], dtype=np.float16).view(np.uint16)
    with pytest.raises(ValueError, match="exceeds nnz=2"):
        sqllm._C.check_csr((rp, ci, va), 2, 4)


# 3. missing tensors never load silently -------------------------------------------

@pytest.mark.parametrize("suffix", ["qweight", "lookup_table", "sparse_row_ptr",
                                    "sparse_col_idx", "sparse_values"])
def test_missing_layer_tensor_is_an_error(saved, suffix):
    name = "model.layers.0.self_attn.q_proj." + suffix
    _edit_tensors(saved, lambda sd: sd.pop(name))
    with pytest.raises(ValueError, match=f"lacks the tensor {name}"):
        sqllm.load_quantized(saved)


def test_missing_bias_is_an_error(tmp_path):
    model = make_tiny_llama()
    model.model.layers[0].mlp.up_proj.bias = nn.Parameter(torch.randn(96))
    sqllm.quantize(model, method="rtn", bits=4, progress=False)
    d = tmp_path / "b"
    sqllm.save_quantized(model, d)
    _edit_tensors(d, lambda sd: sd.pop("model.layers.0.mlp.up_proj.bias"))
    with pytest.raises(ValueError, match="lacks the tensor model.layers.0.mlp.up_proj.bias"):
        sqllm.load_quantized(d)


def test_missing_unquantized_tensor_is_an_error(saved):
    _edit_tensors(saved, lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(ValueError, match="model.norm.weight"):
        sqllm.load_quantized(saved)


# 4. fp16 overflow of Dense-and-Sparse residuals ---------------------------------

def test_residual_beyond_fp16_is_refused_with_position():
    w = torch.randn(4, 64)
    w[2, 5] = 1e6  # the outlier is kept in the sparse part; its residual is ~1e6
    with pytest.raises(ValueError, match=r"weight\[2, 5\] = 1e\+06.*65504"):
        QuantLinear.from_weight(w, bits=3, sparsity=0.01)
    # Dense-only: the float32 tables hold it, and the result is finite.
    q = QuantLinear.from_weight(w, bits=3, sparsity=0.0)
    assert torch.isfinite(q(torch.randn(2, 64))).all()


def test_residual_beyond_fp16_in_quantize_names_the_layer_and_restores(calib_ids):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e6
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj"):
        sqllm.quantize(model, bits=3, sparsity=0.01, weighted=False, progress=False)
    after = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert not any(isinstance(m, sqllm.QuantLinearBase) for m in model.modules())


# 5. save_quantized never deletes an unrelated folder -----------------------------

def _quantized_model():
    model = make_tiny_llama()
    sqllm.quantize(model, method="rtn", bits=4, progress=False)
    return model


def test_save_refuses_unrelated_folder(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    model = _quantized_model()
    with pytest.raises(ValueError, match="not an sqllm model folder.*overwrite"):
        sqllm.save_quantized(model, other)
    assert (other / "cat.jpg").read_bytes() == b"meow"
    # through a symlink: the folder it points to is just as protected
    link = tmp_path / "link"
    link.symlink_to(other)
    with pytest.raises(ValueError, match="not an sqllm model folder"):
        sqllm.save_quantized(model, link)
    assert (other / "cat.jpg").read_bytes() == b"meow"
    # asked for: replaced
    sqllm.save_quantized(model, other, overwrite=True)
    assert not (other / "cat.jpg").exists() and sqllm.io.is_sqllm_folder(other)
    # an existing sqllm folder and an empty folder are replaced without asking
    sqllm.save_quantized(model, other)
    empty = tmp_path / "empty"
    empty.mkdir()
    sqllm.save_quantized(model, empty)
    assert sqllm.io.is_sqllm_folder(empty)


def test_save_refuses_a_file_in_the_way(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        sqllm.save_quantized(_quantized_model(), f)
    with pytest.raises(NotADirectoryError, match="is a file"):
        sqllm.save_quantized(_quantized_model(), f / "sub" / "out")
    assert f.read_text() == "x"


# 6. the target always holds the old or the new model -----------------------------

def test_replace_is_an_exchange_or_recoverable(tmp_path, monkeypatch):
    model = _quantized_model()
    d = tmp_path / "m"
    sqllm.save_quantized(model, d)
    old_cfg = (d / "config.json").read_text()
    # Simulate a process killed between the two renames of the fallback path:
    # no exchange, and the second rename never happens.
    monkeypatch.setattr(sqllm.io, "_exchange", lambda a, b: False)
    real_rename = os.rename

    class Killed(BaseException):
        pass

    def rename(src, dst):
        if str(src).endswith(".tmp") or ".tmp-" in str(src):
            raise Killed()
        return real_rename(src, dst)

    tmp = tmp_path / ".m.tmp-new"
    shutil.copytree(d, tmp)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        _replace_folder(tmp, d)
    # the fallback puts the old folder back itself when it can ...
    assert (d / "config.json").read_text() == old_cfg
    # ... and when the process really died (old left in .old-<dead pid>), the next
    # load recovers it.
    monkeypatch.setattr(os, "rename", real_rename)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    real_rename(d, tmp_path / f".m.old-{dead.pid}")
    assert not d.exists()
    m2 = sqllm.load_quantized(d)
    assert isinstance(m2, nn.Module) and (d / "config.json").read_text() == old_cfg


def test_exchange_swaps_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not sqllm.io._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# 7. no partial mutation of the caller's model ------------------------------------

def test_quantize_failure_restores_original_layers(monkeypatch, calib_ids):
    model = make_tiny_llama()
    ref = {n: t.clone() for n, t in model.state_dict().items()}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    calls = {"n": 0}
    real = sqllm.methods.RTN.quantize_layer

    def flaky(self, name, linear, stats):
        calls["n"] += 1
        if calls["n"] == 5:
            raise ValueError("boom in layer 5")
        return real(self, name, linear, stats)

    monkeypatch.setattr(sqllm.methods.RTN, "quantize_layer", flaky)
    for stream in (False, True):
        calls["n"] = 0
        with pytest.raises(ValueError, match="boom"):
            sqllm.quantize(model, method="rtn", bits=4, progress=False, stream=stream)
        now = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert now.keys() == linears.keys() and all(now[n] is linears[n] for n in now)
        sd = model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
        assert getattr(model.config, "quantization_config", None) is None


def test_upstream_failure_leaves_model_untouched(tmp_path):
    from sqllm.upstream import load_squeezellm_checkpoint, save_squeezellm_checkpoint

    # The upstream layout is SqueezeLLM's lookup-table format (rtn now writes
    # the uniform format), so quantize with unweighted SqueezeLLM here.
    q = make_tiny_llama()
    sqllm.quantize(q, method="squeezellm", bits=4, weighted=False, kmeans="lloyd",
                   progress=False)
    pt = tmp_path / "up.pt"
    save_squeezellm_checkpoint(q, pt)
    state = torch.load(pt, weights_only=True)
    last = sorted(k for k in state if k.endswith(".lookup_table"))[-1]
    state[last] = state[last][:, :3]  # the last module is broken
    torch.save(state, pt)
    base = make_tiny_llama()
    linears = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    with pytest.raises(ValueError, match="lookup_table"):
        load_squeezellm_checkpoint(pt, base)
    now = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    assert all(now[n] is linears[n] for n in linears)
    assert getattr(base.config, "quantization_config", None) is None


# 8. paths read from a file stay inside the folder ---------------------------------

@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.safetensors",
                                 "sub/../../outside.safetensors"])
def test_index_paths_are_contained(saved, bad):
    (saved.parent / "outside.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    index = {"metadata": {}, "weight_map": {"model.norm.weight": bad}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not inside"):
        sqllm.load_quantized(saved)
    from sqllm.calib.checkpoint import SafetensorsCheckpoint

    with pytest.raises(ValueError, match="not inside"):
        SafetensorsCheckpoint(saved)


def test_index_symlink_out_of_folder_is_refused(saved, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(saved / "model.safetensors", outside)
    (saved / "link.safetensors").symlink_to(outside)
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "link.safetensors"}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not inside"):
        sqllm.load_quantized(saved)


# 9. the upstream loader checks what it converts -----------------------------------

@pytest.fixture()
def upstream_pt(tmp_path):
    from sqllm.upstream import save_squeezellm_checkpoint

    model = make_tiny_llama()
    sqllm.quantize(model, bits=4, sparsity=0.02, weighted=False, progress=False)
    pt = tmp_path / "up.pt"
    save_squeezellm_checkpoint(model, pt)
    return pt


def _load_upstream(pt, mutate):
    from sqllm.upstream import load_squeezellm_checkpoint

    state = torch.load(pt, weights_only=True)
    mutate(state)
    torch.save(state, pt)
    return load_squeezellm_checkpoint(pt, make_tiny_llama())


M = "model.layers.0.self_attn.q_proj"


def test_upstream_bias_of_wrong_shape(upstream_pt):
    with pytest.raises(ValueError, match=rf"{M}.bias must be a float tensor of shape \(64,\)"):
        _load_upstream(upstream_pt, lambda s: s.__setitem__(M + ".bias", torch.ones(1)))


def test_upstream_int64_out_of_int32_range(upstream_pt):
    def mutate(s):
        cols = s[M + ".cols"].long()
        cols[0] = 2 ** 32  # would wrap to 0 when narrowed
        s[M + ".cols"] = cols
    with pytest.raises(ValueError, match=rf"{M}.cols holds 4294967296, outside the int32 range"):
        _load_upstream(upstream_pt, mutate)


def test_upstream_wrong_shapes_and_types_are_value_errors(upstream_pt):
    cases = [
        lambda s: s.__setitem__(M + ".rows", s[M + ".rows"][:-1]),
        lambda s: s.__setitem__(M + ".vals", s[M + ".vals"][:-1]),
        lambda s: s.__setitem__(M + ".cols", s[M + ".cols"].float()),
        lambda s: s.__setitem__(M + ".vals", s[M + ".vals"] * 0 + 1e9),
        lambda s: s.__setitem__(M + ".lookup_table", s[M + ".lookup_table"].int()),
        lambda s: s.__setitem__("model.norm.weight", torch.ones(3)),
        lambda s: s.__setitem__(M + ".qweight", s[M + ".qweight"].T.contiguous()),
        lambda s: s.pop(M + ".cols"),
    ]
    pristine = upstream_pt.read_bytes()
    for mutate in cases:
        upstream_pt.write_bytes(pristine)
        with pytest.raises(ValueError, match=r"model\.(layers\.0\.self_attn\.q_proj|norm)"):
            _load_upstream(upstream_pt, mutate)


def test_upstream_missing_file_and_bad_args(tmp_path):
    from sqllm.upstream import load_squeezellm_checkpoint

    with pytest.raises(FileNotFoundError):
        load_squeezellm_checkpoint(tmp_path / "nope.pt", make_tiny_llama(), wbits=3)
    pt = tmp_path / "x.pt"
    torch.save({}, pt)
    with pytest.raises(TypeError, match="wbits must be an int"):
        load_squeezellm_checkpoint(pt, make_tiny_llama(), wbits=3.0)


# 10. the CLI: one line and exit 2 for user errors; output checked first ----------

def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "sqllm.cli", *args], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return r.returncode, r.stderr


def test_cli_user_errors(tmp_path, saved, tiny_model_dir):
    d, _ = tiny_model_dir
    f = tmp_path / "plain"
    f.write_text("x")
    bad_cfg = tmp_path / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text('{"quantization_config": [1, 2]')
    cases = [
        (["info", str(saved), "--threads", "-1"], "info", "--threads must be >= 0"),
        (["quantize", "--model", str(d), "--out", str(f / "sub"), "--method", "rtn"],
         "quantize", "is a file"),
        (["quantize", "--model", str(d), "--out", str(d), "--method", "rtn"],
         "quantize", "is (or contains) the source model"),
        (["info", str(bad_cfg)], "info", "not valid JSON"),
        (["info", str(tmp_path / "missing")], "info", "does not exist"),
        (["eval", "--model", str(tmp_path / "missing")], "eval", "does not exist"),
    ]
    for argv, cmd, msg in cases:
        rc, err = _cli(*argv)
        assert rc == 2, (argv, err)
        assert err.startswith(f"sqllm {cmd}: error: ") and msg in err, (argv, err)
        assert "Traceback" not in err
    assert f.read_text() == "x" and (d / "config.json").is_file()


def test_cli_refuses_unrelated_out_before_work(tmp_path, tiny_model_dir):
    d, _ = tiny_model_dir
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("keep")
    rc, err = _cli("quantize", "--model", str(d), "--out", str(other), "--method", "rtn", "-q")
    assert rc == 2 and "--overwrite" in err
    assert (other / "a.txt").read_text() == "keep"
    rc, err = _cli("quantize", "--model", str(d), "--out", str(other), "--method", "rtn", "-q",
                   "--overwrite")
    assert rc == 0, err
    assert sqllm.io.is_sqllm_folder(other)


# 11. sizes from config.json are checked against the tensors before allocating ------

@pytest.mark.parametrize("key,value", [("nnz", 2 ** 31), ("in_features", 10 ** 6),
                                       ("out_features", 10 ** 6)])
def test_untrusted_sizes_do_not_allocate(saved, key, value):
    cfg = json.loads((saved / "config.json").read_text())
    entry = cfg["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]
    if key == "nnz":
        entry["params"]["nnz"] = value
    else:
        entry[key] = value
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
        sqllm.load_quantized(saved)


# 12. wrong exception types ------------------------------------------------------

def test_bits_must_be_an_int_everywhere():
    w = torch.randn(4, 64)
    for bits in (3.9, "3", True):
        with pytest.raises(TypeError, match="bits must be an int"):
            QuantLinear.from_weight(w, bits=bits)
        with pytest.raises(TypeError, match="bits must be an int"):
            sqllm.quantize(make_tiny_llama(), method="rtn", bits=bits, progress=False)


@pytest.mark.parametrize("version", [-1, 0, 2.0, "2", None])
def test_bad_format_version_is_refused(saved, version):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = version
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version"):
        sqllm.load_quantized(saved)


def test_duplicate_tensor_across_shards(saved):
    sd = load_file(str(saved / "model.safetensors"))
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, str(saved / "a.safetensors"))
    save_file({k: sd[k] for k in names[half - 1:]}, str(saved / "b.safetensors"))
    (saved / "model.safetensors").unlink()
    wm = {k: "a.safetensors" for k in names[:half]}
    wm.update({k: "b.safetensors" for k in names[half:]})
    (saved / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ValueError, match=f"{names[half - 1]}.*in both a.safetensors and b"):
        sqllm.load_quantized(saved)


def test_from_weight_bias_shape_and_numpy_inputs():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        QuantLinear.from_weight(w, bits=3, bias=torch.ones(1))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor or a NumPy array"):
        QuantLinear.from_weight([[1.0] * 64] * 4, bits=3)
    # NumPy arrays are accepted and give the tensor result.
    a = QuantLinear.from_weight(w.numpy(), bits=3, bias=np.ones(4, np.float32))
    b = QuantLinear.from_weight(w, bits=3, bias=torch.ones(4))
    x = torch.randn(2, 64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        a(x.numpy())


def test_malformed_json_and_arguments_raise_value_or_type_errors(saved, tmp_path):
    cfg_file = saved / "config.json"
    pristine = cfg_file.read_text()
    for text in ("[]", "{", '{"quantization_config": 3}', "\xff\xfe",
                 '{"quantization_config": {"quant_method": "sqllm", "format_version": 2, '
                 '"layers": []}}'):
        cfg_file.write_text(text)
        with pytest.raises(ValueError):
            sqllm.load_quantized(saved)
    cfg_file.write_text(pristine)
    with pytest.raises(TypeError, match="path must be"):
        sqllm.load_quantized(3)
    with pytest.raises(FileNotFoundError):
        sqllm.load_quantized(tmp_path / "nothing")


def test_calibration_ids_beyond_vocab(calib_ids):
    bad = calib_ids.clone()
    bad[0, 0] = 10 ** 6
    with pytest.raises(ValueError, match="calibration token ids must be in"):
        sqllm.quantize(make_tiny_llama(), bits=3, calibration=bad, progress=False)
    with pytest.raises(ValueError, match="calibration token ids must be in"):
        sqllm.quantize(make_tiny_llama(), bits=3, calibration=-calib_ids - 1, progress=False)


# 13. housekeeping ---------------------------------------------------------------

def test_saved_folder_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        d = sqllm.save_quantized(_quantized_model(), tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_leftover_tmp_folders_of_dead_saves_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".m.tmp-{dead.pid}-abc"
    left.mkdir()
    (left / "junk").write_text("x")
    alive = tmp_path / f".m.tmp-{os.getpid()}-xyz"  # a save in progress: kept
    alive.mkdir()
    unrelated = tmp_path / ".other.tmp-1-zz"
    unrelated.mkdir()
    sqllm.save_quantized(_quantized_model(), tmp_path / "m")
    assert not left.exists() and alive.exists() and unrelated.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")] == [alive.name]


def test_check_output_folder_reports_before_work(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(ValueError, match="source model"):
        check_output_folder(src, source=src)
    with pytest.raises(ValueError, match="source model"):
        check_output_folder(tmp_path, source=src)
    with pytest.raises(TypeError):
        check_output_folder(None)


def test_numpy_sensitivity_is_accepted():
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(64, 8, bias=False)
    s = torch.rand(8, 64, generator=g)
    a = QuantLinear.from_linear(lin, bits=3, sensitivity=s.numpy())
    b = QuantLinear.from_linear(lin, bits=3, sensitivity=s)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.lookup_table, b.lookup_table)


def test_huge_depth_in_config_is_refused_before_building(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["num_hidden_layers"] = 10 ** 6
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_hidden_layers=1000000"):
        sqllm.load_quantized(saved)
