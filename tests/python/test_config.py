"""QuantizationConfig: round trip, validation, format version 1 compatibility, and
the CLI flags generated from each method's options."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch
from safetensors.torch import load_file

import sqllm
from sqllm import QuantizationConfig, QuantizationConfigError, QuantLinear
from sqllm.cli import main as cli_main
from sqllm.methods import SqueezeLLM

from conftest import make_tiny_llama

DATA = Path(__file__).resolve().parent.parent / "data"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _quantized(method="squeezellm", calib=None, **kw):
    m = make_tiny_llama()
    sqllm.quantize(m, method=method, bits=3, calibration=calib, progress=False, **kw)
    return m


# -- the object -------------------------------------------------------------------

def test_quantize_stores_a_version_2_config_that_round_trips(calib_ids):
    m = _quantized(calib=calib_ids, sparsity=0.02, group_axis="column")
    d = m.config.quantization_config
    assert isinstance(d, dict)
    json.dumps(d)  # JSON-ready for config.json
    qc = QuantizationConfig.from_dict(d)
    assert qc.to_dict() == d
    assert d["format_version"] == sqllm.FORMAT_VERSION == 2
    assert qc.sqllm_version == sqllm.__version__
    assert qc.method == "squeezellm"
    assert qc.options == dataclasses.asdict(SqueezeLLM(bits=3, sparsity=0.02, group_axis="column"))
    assert qc.calibration == sqllm.CalibrationConfig("tensor", 4, 32, 0, None, False)
    assert qc.modules_to_not_convert == ["lm_head"]
    q_layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
    assert set(qc.layers) == set(q_layers) and len(q_layers) == 14
    down = qc.layers["model.layers.1.mlp.down_proj"]
    layer = q_layers["model.layers.1.mlp.down_proj"]
    assert (down.format, down.format_version, down.in_features, down.out_features, down.bias) == \
        ("lut", QuantLinear.format_version, 96, 64, False)
    assert down.params == {"bits": 3, "group_axis": "column", "nnz": layer.nnz} and layer.nnz > 0
    # The entry rebuilds an empty layer of the same shapes (what the loaders do).
    empty = down.build()
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in layer.state_dict().items()}
    # A QuantizationConfig (not only its dict) is accepted as the model's config.
    assert QuantizationConfig.from_model(m) == qc


def test_calibration_is_recorded_only_when_used(calib_ids):
    rtn = _quantized("rtn", calib_ids)  # RTN ignores calibration data
    assert QuantizationConfig.from_model(rtn).calibration == sqllm.CalibrationConfig()
    plain = _quantized("squeezellm", calib_ids, weighted=False)
    assert QuantizationConfig.from_model(plain).calibration.source is None
    m = make_tiny_llama()
    fisher = {n: torch.ones_like(lin.weight) for n, lin in sqllm.find_linear_layers(m).items()}
    sqllm.quantize(m, bits=3, sensitivity=fisher, progress=False)
    assert QuantizationConfig.from_model(m).calibration == \
        sqllm.CalibrationConfig(precomputed_sensitivity=True)


def test_method_instance_and_options_of_every_registered_method():
    for name, cls in sqllm.METHODS.items():
        specs = sqllm.method_options(cls)
        assert [s.name for s in specs] == [f.name for f in dataclasses.fields(cls)]
        qc = QuantizationConfig(method=name, options={s.name: s.default for s in specs})
        assert isinstance(qc.method_instance(), cls)
        assert QuantizationConfig.from_dict(qc.to_dict()) == qc


def _v2_dict():
    return _quantized(method="rtn").config.quantization_config


def _set(d, path, value):
    *head, last = path
    for k in head:
        d = d[k]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value


_DELETE = object()
_Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("path,value,message", [
    (("method",), "vptq-nope", r"unknown method 'vptq-nope'; this sqllm knows \[.*'gptq', .*'rtn', 'squeezellm'"),
    (("method",), _DELETE, r"quantization_config lacks the key 'method'"),
    (("layers",), _DELETE, r"lacks the key 'layers'"),
    (("layers",), [], r"quantization_config.layers must be an object, got list"),
    (("options", "bits"), "3", r"options.bits must be an int, got str '3'"),
    (("options", "bits"), True, r"options.bits must be an int, got bool"),
    (("options", "sparsity"), 0.1, r"method 'rtn' has no option\(s\) \['sparsity'\]"),
    (("format_version",), 3, r"format_version 3 was written by a newer sqllm.*reads "
                             r"format_version 1..2: upgrade sqllm"),
    (("format_version",), "2", r"format_version must be an int"),
    (("format_version",), 0, r"unsupported format_version 0"),
    (("quant_method",), "gptq", r"not sqllm's \(quant_method is 'gptq'"),
    (("calibration", "nsamples"), 4.5, r"calibration.nsamples must be an int or null"),
    (("calibration", "window"), 3, r"calibration has unknown key\(s\) \['window'\]"),
    (("modules_to_not_convert",), "lm_head", r"modules_to_not_convert must be a list"),
    (("sqllm_version",), _DELETE, r"lacks the key 'sqllm_version'"),
    (("layers", _Q, "format"), "vq-nope",
     rf"layers\['{_Q}'\]: unknown quantized layer format 'vq-nope'"),
    (("layers", _Q, "format_version"), 7, r"format 'uniform' version 7 is not supported .*versions 1..1"),
    (("layers", _Q, "in_features"), _DELETE, rf"layers\['{_Q}'\] lacks the key 'in_features'"),
    (("layers", _Q, "in_features"), 0, r"in_features and out_features must be > 0"),
    (("layers", _Q, "bias"), "no", r"bias must be a bool"),
    (("layers", _Q, "params", "bits"), 3.0, r"params.bits must be an int, got float"),
    (("layers", _Q, "params", "group_size"), _DELETE, r"params lacks the key 'group_size'"),
    (("layers", _Q, "params", "group_axis"), "row", r"format 'uniform' has no parameter\(s\) \['group_axis'\]"),
    (("layers", _Q, "bits"), 3, r"has unknown key\(s\) \['bits'\]"),
])
def test_invalid_configs_raise_clear_errors(path, value, message):
    d = copy.deepcopy(_v2_dict())
    _set(d, path, value)
    with pytest.raises(QuantizationConfigError, match=message):
        QuantizationConfig.from_dict(d)
    assert issubclass(QuantizationConfigError, ValueError)


def test_unknown_top_level_keys_are_kept():
    d = _v2_dict()
    d["note"] = {"by": "a newer minor release"}
    assert QuantizationConfig.from_dict(d).to_dict() == d


def test_a_newer_folder_fails_to_load_with_the_version_in_the_message(tmp_path, calib_ids):
    out = sqllm.save_quantized(_quantized(method="rtn"), tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: quantization_config: format_version 3 was "
                                         "written by a newer sqllm"):
        sqllm.load_quantized(out)


# -- format version 1 ------------------------------------------------------------

def test_the_version_1_folder_of_release_0_1_0_loads_with_its_logits():
    """tests/data/v1_tiny was written by sqllm 0.1.0 (make_v1_fixture.py) with the
    logits of the quantized model before saving."""
    folder = DATA / "v1_tiny"
    raw = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert raw["format_version"] == 1 and raw["bits"] == 3  # really the old layout
    qc = sqllm.read_quantization_config(folder)
    assert qc.format_version == 2 and qc.method == "squeezellm" and qc.sqllm_version == "0.1.0"
    assert qc.options == {"bits": 3, "group_axis": "row", "kmeans": "exact", "sparsity": 0.02,
                          "sensitive_fraction": 1 / 9, "weighted": True}
    assert qc.calibration == sqllm.CalibrationConfig("tensor", 4, 32, 0, None, False)
    assert all(lf.params["nnz"] == raw["layers"][n]["nnz"] for n, lf in qc.layers.items())
    model = sqllm.load_quantized(folder)
    # Every tensor of the file is in the model bit for bit.
    state = model.state_dict()
    for k, v in load_file(str(folder / "model.safetensors")).items():
        assert torch.equal(state[k], v), k
    expected = load_file(str(DATA / "v1_tiny_expected.safetensors"))
    got = _logits(model, expected["input_ids"])
    # Identical on the machine that wrote the fixture; elsewhere the CPU kernel's fp32
    # sums may be formed in another order (SIMD width), hence the tiny tolerance.
    torch.testing.assert_close(got, expected["logits"], rtol=0, atol=2e-6)


def _save_v1(model, folder):
    """sqllm 0.1.0's save_quantized, frozen: the version-1 config.json layout."""
    qc = QuantizationConfig.from_model(model)
    layers = {n: m.layer_config() for n, m in model.named_modules()
              if isinstance(m, sqllm.QuantLinearBase)}
    cal = qc.calibration.to_dict()
    del cal["stats_dir"]
    model.config.quantization_config = {
        "quant_method": "sqllm", "format_version": 1, "method": qc.method, **qc.options,
        "modules_to_not_convert": qc.modules_to_not_convert, "layers": layers,
        "calibration": cal}
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


@pytest.mark.parametrize("method,kwargs", [
    ("squeezellm", {"sparsity": 0.02}), ("squeezellm", {"group_axis": "column", "sparsity": 0.02}),
    ("rtn", {})])
def test_version_1_folders_load_with_identical_logits_and_resave_as_2(tmp_path, calib_ids,
                                                                       method, kwargs):
    m = _quantized(method, calib_ids, **kwargs)
    ids = calib_ids[:2]
    before = _logits(m, ids)
    v1 = _save_v1(m, tmp_path / "v1")
    assert json.loads((v1 / "config.json").read_text())["quantization_config"]["format_version"] == 1
    loaded = sqllm.load_quantized(v1)
    assert torch.equal(_logits(loaded, ids), before)
    v2 = sqllm.save_quantized(loaded, tmp_path / "v2")
    d2 = json.loads((v2 / "config.json").read_text())["quantization_config"]
    assert d2["format_version"] == 2 and d2["method"] == method
    v1_layers = json.loads((v1 / "config.json").read_text())["quantization_config"]["layers"]
    common = ("format", "in_features", "out_features", "bias")
    assert {n: e["params"] for n, e in d2["layers"].items()} == \
        {n: {k: v for k, v in e.items() if k not in common} for n, e in v1_layers.items()}
    assert torch.equal(_logits(sqllm.load_quantized(v2), ids), before)


def test_version_1_config_of_a_converted_upstream_checkpoint():
    d = {"quant_method": "sqllm", "format_version": 1, "method": "squeezellm", "bits": 4,
         "group_axis": "row", "source": "upstream SqueezeLLM checkpoint x.pt",
         "layers": {"a.b": {"format": "lut", "in_features": 64, "out_features": 32,
                            "bias": False, "bits": 4, "group_axis": "row", "nnz": 0}}}
    qc = QuantizationConfig.from_dict(d)
    assert qc.options == {"bits": 4, "group_axis": "row"}
    assert qc.extra == {"source": "upstream SqueezeLLM checkpoint x.pt"}
    assert qc.calibration == sqllm.CalibrationConfig()
    assert qc.layers["a.b"] == sqllm.LayerFormat("lut", 64, 32, False,
                                                 {"bits": 4, "group_axis": "row", "nnz": 0}, 1)
    out = qc.to_dict()
    assert out["format_version"] == 2 and out["source"] == d["source"]
    assert QuantizationConfig.from_dict(out) == qc
    bad = dict(d, sparsity="high")
    with pytest.raises(QuantizationConfigError, match="options.sparsity must be a number"):
        QuantizationConfig.from_dict(bad)


# -- layers are formats ------------------------------------------------------------

def test_format_classes_declare_name_version_parameters_and_support():
    assert sqllm.FORMATS["lut"] is QuantLinear
    assert QuantLinear.format == "lut" and QuantLinear.format_version == 1
    assert QuantLinear.layer_params == {"bits": int, "group_axis": str, "nnz": int}
    assert QuantLinear.supports["bits"] == tuple(range(1, 9))
    assert set(QuantLinear.supports["group_axis"]) == {"row", "column"}
    assert QuantLinear.supports["sparse"] is True


@pytest.mark.parametrize("axis", ["row", "column"])
def test_from_packed_rebuilds_a_layer_from_its_tensors(axis):
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 12)
    q = QuantLinear.from_linear(lin, bits=3, group_axis=axis, sparsity=0.05)
    same = SqueezeLLM(bits=3, group_axis=axis, sparsity=0.05, weighted=False).quantize_linear(lin)
    for k, v in q.state_dict().items():
        assert torch.equal(v, same.state_dict()[k]), k
    rebuilt = QuantLinear.from_packed(q.qweight, q.lookup_table, 3, 40, axis,
                                      sparse=(q.sparse_row_ptr, q.sparse_col_idx, q.sparse_values),
                                      bias=q.bias)
    x = torch.randn(5, 40)
    assert torch.equal(rebuilt(x), q(x)) and rebuilt.nnz == q.nnz > 0
    # NumPy arrays in the packed dtypes (uint32 words, uint16 half bits) are accepted too.
    np_rebuilt = QuantLinear.from_packed(q.qweight.numpy().view("uint32"), q.lookup_table.numpy(),
                                         3, 40, axis, sparse=(q.sparse_row_ptr.numpy(),
                                                              q.sparse_col_idx.numpy(),
                                                              q.sparse_values.numpy().view("uint16")),
                                         bias=q.bias)
    assert torch.equal(np_rebuilt(x), q(x))
    with pytest.raises(ValueError, match="qweight must be torch.int32 of shape"):
        QuantLinear.from_packed(q.qweight[:, :-1], q.lookup_table, 3, 40, axis)
    with pytest.raises(ValueError, match="lookup_table must be"):
        QuantLinear.from_packed(q.qweight, q.lookup_table[:, :4], 3, 40, axis)
    bad_cols = q.sparse_col_idx.clone()
    bad_cols[0] = 40
    with pytest.raises(ValueError, match="out of range"):
        QuantLinear.from_packed(q.qweight, q.lookup_table, 3, 40, axis,
                                sparse=(q.sparse_row_ptr, bad_cols, q.sparse_values))


def test_method_validates_its_options_before_any_work():
    with pytest.raises(ValueError, match="bits must be in 1..8, got 9"):
        SqueezeLLM(bits=9)
    with pytest.raises(ValueError, match="kmeans must be 'exact' or 'lloyd'"):
        SqueezeLLM(kmeans="kmedoids")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        sqllm.quantize(make_tiny_llama(), sparsity=1.0, progress=False)


# -- CLI flags from the method options ----------------------------------------------

def _help(capsys, *argv):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "250")  # no line wrapping inside the help texts
        return _help_wide(capsys, *argv)


def _help_wide(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", *argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_cli_help_lists_the_options_of_the_chosen_method(capsys):
    out = _help(capsys, "--method", "squeezellm")
    assert "options of --method squeezellm" in out
    for flag in ("--bits INT", "--group-axis {row,column}", "--kmeans {exact,lloyd}",
                 "--sparsity FLOAT", "--sensitive-fraction FLOAT", "--weighted, --no-weighted"):
        assert flag in out, flag
    assert "Fraction of each matrix kept in fp16" in out and "(default: 0.1111)" in out
    assert _help(capsys) == out  # squeezellm is the default
    rtn = _help(capsys, "--method=rtn")
    assert "options of --method rtn" in rtn and "--bits INT" in rtn
    assert "--sparsity" not in rtn and "--group-axis" not in rtn


@dataclasses.dataclass
class _Toy(sqllm.QuantMethod):
    """A method registered after sqllm was imported.

    Attributes
    ----------
    damp : float
        Dampening, relative to the mean diagonal.
    order : {"natural", "act"}
        Column order.
    act_groups, group_size : bool, int
        Grouping,
        over two lines.

    Notes
    -----
    not : an option
    """

    name = "toy"

    damp: float = 0.01
    order: str = "natural"
    act_groups: bool = False
    group_size: Optional[int] = None
    schedule: Literal["fast", "slow"] = "fast"
    seed: int = 0
    blocks: tuple = dataclasses.field(default=(128, 64), metadata={"help": "column blocks"})


def test_methods_registered_later_get_flags(capsys, monkeypatch):
    monkeypatch.setitem(sqllm.METHODS, "toy", _Toy)
    out = _help(capsys, "--method", "toy")
    for text in ("--damp FLOAT", "Dampening, relative to the mean diagonal. (default: 0.01)",
                 "--order {natural,act}", "--act-groups, --no-act-groups", "--group-size INT",
                 "Grouping, over two lines. (default: None)",
                 "--schedule {fast,slow}", "--toy-seed INT", "--blocks INT [INT ...]",
                 "column blocks (default: 128 64)"):
        assert text in out, text
    seen = {}

    def fake_quantize(model, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(sqllm, "quantize", fake_quantize)
    monkeypatch.setattr("sqllm.cli._load_any", lambda model: (make_tiny_llama(), None))
    rc = cli_main(["quantize", "--method", "toy", "--out", "/nonexistent", "--damp", "0.1",
                   "--order", "act", "--act-groups", "--group-size", "64", "--toy-seed", "5",
                   "--seed", "2", "--bits", "4", "-q"])
    assert rc == 2 and "stop here" in capsys.readouterr().err
    assert seen["method"] == "toy" and seen["seed"] == 2  # the calibration seed
    # Unset options are not passed: the method's defaults apply.
    assert seen["method_options"] == {"damp": 0.1, "order": "act", "act_groups": True,
                                      "group_size": 64, "seed": 5, "bits": 4}


def test_cli_rejects_options_of_another_method(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", "--method", "rtn", "--out", "x", "--sparsity", "0.01"])
    assert e.value.code == 2 and "unrecognized arguments: --sparsity" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["quantize", "--method", "nope", "--out", "x"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_cli_quantize_records_generated_options(tmp_path, tiny_model_dir, capsys):
    model_dir, text = tiny_model_dir
    out = tmp_path / "q"
    assert cli_main(["quantize", "--model", str(model_dir), "--out", str(out), "--bits", "2",
                     "--group-axis", "column", "--sparsity", "0.01", "--kmeans", "lloyd",
                     "--no-weighted", "--calib-text", str(text), "-q"]) == 0
    qc = sqllm.read_quantization_config(out)
    assert qc.options == dataclasses.asdict(SqueezeLLM(bits=2, group_axis="column", sparsity=0.01,
                                                       kmeans="lloyd", weighted=False))
    capsys.readouterr()
    assert cli_main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "method squeezellm" in info and "group_axis=column" in info and "format_version 2" in info
    assert cli_main(["info", str(DATA / "v1_tiny")]) == 0
    assert "sparsity=0.02" in capsys.readouterr().out


def test_stored_options_are_checked_for_types_not_values():
    # sqllm 0.1.0 recorded group_axis as given: "col" (an alias of "column") is valid.
    d = {"quant_method": "sqllm", "format_version": 1, "method": "squeezellm", "bits": 3,
         "group_axis": "col", "layers": {}}
    assert QuantizationConfig.from_dict(d).options["group_axis"] == "col"
    assert QuantizationConfig.from_dict(d).method_instance().group_axis == "column"


def test_formats_check_what_they_support():
    QuantLinear.check_supports(bits=3, group_axis="column", sparse=True, devices="cuda")
    with pytest.raises(ValueError, match=r"format 'lut' does not support bits=12"):
        QuantLinear.check_supports(bits=12)

    class RowOnly(QuantLinear):  # a format that cannot group by column nor hold a sparse part
        format = "lut-row-only"
        supports = {"bits": (2, 3, 4), "group_axis": ("row",), "sparse": False}

    RowOnly.check_supports(bits=4, group_axis="row", sparse=False, anything="else")
    with pytest.raises(ValueError, match=r"does not support group_axis='column'"):
        RowOnly.check_supports(group_axis="column")
    with pytest.raises(ValueError, match=r"does not support sparse=True"):
        RowOnly.check_supports(sparse=True)
