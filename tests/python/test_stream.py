"""The block streamer, statistics collectors and stats dirs, on tiny random models."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from torch import nn

import sqllm
from sqllm.calib import (ActStatsCollector, HessianCollector, capture_block_inputs,
                         find_decoder_blocks, open_on_meta)
from sqllm.cli import main as cli_main
from sqllm.io import _read_state_dict
from sqllm.methods import METHODS, RTN, SqueezeLLM

from conftest import make_tiny_llama

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# -- probe methods --------------------------------------------------------------------------

@dataclasses.dataclass
class _Probe(RTN):
    """RTN that records the statistics it is handed (stats: Hessian and activation stats)."""

    name = "test-probe"
    stats = ("hessian", "act_stats")
    seen: Dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def quantize_layer(self, name, linear, stats):
        self.seen[name] = {"hessian": stats["hessian"][name].clone(),
                           "count": stats["hessian_count"][name],
                           "act": dict(stats["act_stats"][name])}
        return super().quantize_layer(name, linear, stats)

    def config(self):
        return {"method": self.name, "bits": self.bits}


@dataclasses.dataclass
class _HessWeighted(SqueezeLLM):
    """SqueezeLLM whose k-means weights are the Hessian diagonal: output depends on H."""

    name = "test-hessw"
    stats = ("hessian",)

    def required_stats(self):
        return self.stats

    def quantize_layer(self, name, linear, stats):
        d = stats["hessian"][name].diagonal().float()
        sens = d.expand_as(linear.weight).contiguous()
        return sqllm.QuantLinear.from_linear(linear, bits=self.bits, sensitivity=sens,
                                             kmeans=self.kmeans)


@pytest.fixture()
def probe_methods():
    created = []

    def make(cls, **kw):
        sqllm.register_method(cls)
        created.append(cls.name)
        return cls

    make(_Probe)
    make(_HessWeighted)
    yield
    for n in created:
        METHODS.pop(n, None)


def _linear_inputs(model, ids):
    """Every decoder Linear's input rows on each calibration row run alone (float64)."""
    rec: Dict[str, list] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: rec.setdefault(name, []).append(
                    inp[0].detach().reshape(-1, mod.in_features).double())))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in rec.items()}


def _saved(folder):
    return _read_state_dict(Path(folder))


def _assert_same_tensors(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -- collectors -------------------------------------------------------------------------------

def test_hessian_and_act_stats_equal_direct_computation_on_captured_inputs(tiny_llama, calib_ids):
    blocks_name, blocks = find_decoder_blocks(tiny_llama)
    hidden, args, kwargs = capture_block_inputs(tiny_llama, blocks_name, blocks, calib_ids)
    assert len(hidden) == calib_ids.shape[0] and hidden[0].shape == (1, 32, 64)
    block = blocks[0]
    layers = {f"model.layers.0.{n}": block.get_submodule(n) for n in BLOCK_LINEARS}
    xs: Dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: xs.setdefault(n, []).append(
        inp[0].detach().reshape(-1, mod.in_features).double())) for n, m in layers.items()]
    h, a = HessianCollector(), ActStatsCollector()
    h.attach(layers)
    a.attach(layers)
    with torch.no_grad():
        for hid, ar, kw in zip(hidden, args[0], kwargs[0]):
            block(hid, *ar, **kw)
    h.detach()
    a.detach()
    for hk in hooks:
        hk.remove()
    hs = h.publish({n: h.layer_state(n) for n in layers})
    st = a.publish({n: a.layer_state(n) for n in layers})["act_stats"]
    for n in layers:
        x = torch.cat(xs[n])
        assert x.shape[0] == 4 * 32
        assert hs["hessian"][n].dtype == torch.float64
        assert torch.allclose(hs["hessian"][n], x.T @ x, rtol=1e-12, atol=1e-12)
        assert hs["hessian_count"][n] == x.shape[0]
        assert torch.equal(st[n]["max_abs"], x.abs().amax(0).float())
        assert torch.allclose(st[n]["mean_abs"], x.abs().mean(0), rtol=1e-12, atol=1e-15)
        assert torch.allclose(st[n]["mean"], x.mean(0), rtol=1e-12, atol=1e-15)
        assert st[n]["count"] == x.shape[0]
    # no hook is left behind
    assert all(not m._forward_hooks for m in layers.values())


def test_streamed_stats_with_fp_inputs_are_the_full_models(probe_methods, calib_ids):
    """With fp_inputs=True every block's statistics are those of the unquantized model."""
    from sqllm.calib import stream_quantize

    direct = _linear_inputs(make_tiny_llama(), calib_ids)
    qm = _Probe(bits=4)
    stream_quantize(make_tiny_llama(), qm, calib_ids, fp_inputs=True, progress=False)
    assert set(qm.seen) == set(direct)
    for n, x in direct.items():
        assert torch.allclose(qm.seen[n]["hessian"], x.T @ x, rtol=1e-12, atol=1e-12), n
        assert qm.seen[n]["count"] == x.shape[0]
        assert torch.equal(qm.seen[n]["act"]["max_abs"], x.abs().amax(0).float())
    m = sqllm.quantize(make_tiny_llama(), method="test-probe", bits=4, calibration=calib_ids,
                       fp_inputs=True, progress=False)
    assert m.config.quantization_config["calibration"]["block_inputs"] == "full-precision"


def test_true_sequential_feeds_the_quantized_blocks_outputs(calib_ids):
    qm = _Probe(bits=2)
    from sqllm.calib import stream_quantize

    stream_quantize(make_tiny_llama(), qm, calib_ids, progress=False)
    # reference: block 1's Linear inputs in a model whose block 0 is RTN 2-bit
    ref = make_tiny_llama()
    for n in BLOCK_LINEARS:
        name = f"model.layers.0.{n}"
        sqllm.api.set_module(ref, name, RTN(bits=2).quantize_layer(name, ref.get_submodule(name), {}))
    quant_in = _linear_inputs(ref, calib_ids)
    fp_in = _linear_inputs(make_tiny_llama(), calib_ids)
    n = "model.layers.1.mlp.down_proj"
    hq, hf = quant_in[n].T @ quant_in[n], fp_in[n].T @ fp_in[n]
    assert torch.allclose(qm.seen[n]["hessian"], hq, rtol=1e-12, atol=1e-12)
    assert (hq - hf).norm() > 1e-3 * hf.norm()  # the quantization of block 0 is visible
    # block 0 sees the model's own inputs either way
    n0 = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(qm.seen[n0]["hessian"], fp_in[n0].T @ fp_in[n0], rtol=1e-12, atol=1e-12)


def test_sequential_groups_quantize_a_block_group_by_group(calib_ids):
    from sqllm.calib import stream_quantize
    from sqllm.calib.streamer import BlockInputs, _input_groups

    model = make_tiny_llama()
    blocks_name, blocks = find_decoder_blocks(model)
    hidden, args, kwargs = capture_block_inputs(model, blocks_name, blocks, calib_ids)
    layers = {f"model.layers.0.{n}": blocks[0].get_submodule(n) for n in BLOCK_LINEARS}
    groups = _input_groups(blocks[0], layers, BlockInputs(hidden, args[0], kwargs[0]))
    short = [[n.rsplit(".", 1)[-1] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"],
                     ["down_proj"]]

    qm = _Probe(bits=2)
    stream_quantize(make_tiny_llama(), qm, calib_ids, sequential_groups=True, progress=False)

    def inputs_with_quantized(names):
        ref = make_tiny_llama()
        for n in names:
            sqllm.api.set_module(ref, n, RTN(bits=2).quantize_layer(n, ref.get_submodule(n), {}))
        return _linear_inputs(ref, calib_ids)

    p = "model.layers.0."
    fp_in = _linear_inputs(make_tiny_llama(), calib_ids)
    after_qkv = inputs_with_quantized([p + "self_attn.q_proj", p + "self_attn.k_proj",
                                       p + "self_attn.v_proj"])
    before_down = inputs_with_quantized([p + n for n in BLOCK_LINEARS[:-1]])
    for name, ref in ((p + "self_attn.q_proj", fp_in), (p + "self_attn.o_proj", after_qkv),
                      (p + "mlp.down_proj", before_down)):
        x = ref[name]
        assert torch.allclose(qm.seen[name]["hessian"], x.T @ x, rtol=1e-12, atol=1e-12), name
    xo = fp_in[p + "self_attn.o_proj"]
    assert (qm.seen[p + "self_attn.o_proj"]["hessian"] - xo.T @ xo).norm() > 1e-3 * (xo.T @ xo).norm()


# -- streamed == in memory --------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_streamed_rtn_equals_in_memory_rtn_bit_for_bit(tmp_path, tie):
    a = sqllm.quantize(make_tiny_llama(tie=tie), method="rtn", bits=4, progress=False)
    sqllm.save_quantized(a, tmp_path / "mem")
    b = sqllm.quantize(make_tiny_llama(tie=tie), method="rtn", bits=4, progress=False, stream=True)
    sqllm.save_quantized(b, tmp_path / "stream")
    src = tmp_path / "src"
    make_tiny_llama(tie=tie).save_pretrained(src)
    c = open_on_meta(src)
    sqllm.quantize(c, method="rtn", bits=4, progress=False, out=tmp_path / "meta")
    ref = _saved(tmp_path / "mem")
    _assert_same_tensors(ref, _saved(tmp_path / "stream"))
    _assert_same_tensors(ref, _saved(tmp_path / "meta"))
    assert (tmp_path / "meta" / "model.safetensors.index.json").is_file()  # one shard per block
    cfg = lambda d: json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]
    assert cfg("meta")["layers"] == cfg("mem")["layers"]
    # the streamed model was freed block by block; only its skeleton is left
    assert all(p.is_meta for p in c.model.layers.parameters())
    with pytest.raises(ValueError, match="meta device"):
        sqllm.save_quantized(c, tmp_path / "again")
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(sqllm.load_quantized(tmp_path / "meta")(input_ids=ids).logits,
                           a(input_ids=ids).logits)


def test_failed_streamed_write_keeps_the_previous_folder(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_tiny_llama().save_pretrained(src)
    out = tmp_path / "q"
    sqllm.quantize(open_on_meta(src), method="rtn", bits=4, progress=False, out=out)
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    orig = RTN.quantize_layer

    def fail_in_block_1(self, name, linear, stats):
        if ".layers.1." in name:
            raise OSError("disk full")
        return orig(self, name, linear, stats)

    monkeypatch.setattr(RTN, "quantize_layer", fail_in_block_1)
    with pytest.raises(OSError, match="disk full"):
        sqllm.quantize(open_on_meta(src), method="rtn", bits=3, progress=False, out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]  # no temporary folder


def test_streaming_from_meta_equals_streaming_in_memory(probe_methods, tmp_path, calib_ids):
    src = tmp_path / "src"
    make_tiny_llama().save_pretrained(src, max_shard_size="100KB")  # several input shards
    assert (src / "model.safetensors.index.json").is_file()
    for method in ("test-hessw", "squeezellm"):
        mem = sqllm.quantize(make_tiny_llama(), method=method, bits=3, calibration=calib_ids,
                             stream=True, progress=False)
        sqllm.save_quantized(mem, tmp_path / f"mem-{method}")
        meta = open_on_meta(src)
        assert all(p.is_meta for p in meta.parameters())
        sqllm.quantize(meta, method=method, bits=3, calibration=calib_ids, progress=False,
                       out=tmp_path / f"meta-{method}")
        _assert_same_tensors(_saved(tmp_path / f"mem-{method}"), _saved(tmp_path / f"meta-{method}"))
        # and on the meta device without out=: the quantized model ends up in memory
        meta2 = open_on_meta(src)
        sqllm.quantize(meta2, method=method, bits=3, calibration=calib_ids, progress=False)
        assert not any(p.is_meta for p in meta2.parameters())
        ids = calib_ids[:1]
        with torch.no_grad():
            assert torch.equal(meta2(input_ids=ids).logits, mem(input_ids=ids).logits)
    # streamed squeezellm (Fisher pre-pass, then blocks) equals the in-memory path
    ref = sqllm.quantize(make_tiny_llama(), method="squeezellm", bits=3, calibration=calib_ids,
                         progress=False)
    sqllm.save_quantized(ref, tmp_path / "ref")
    _assert_same_tensors(_saved(tmp_path / "ref"), _saved(tmp_path / "meta-squeezellm"))


def test_hessian_method_output_depends_on_the_statistics(probe_methods, calib_ids):
    a = sqllm.quantize(make_tiny_llama(), method="test-hessw", bits=3, calibration=calib_ids,
                       progress=False)
    b = sqllm.quantize(make_tiny_llama(), method="test-hessw", bits=3,
                       calibration=torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7)),
                       progress=False)
    assert not torch.equal(a.model.layers[1].mlp.down_proj.lookup_table,
                           b.model.layers[1].mlp.down_proj.lookup_table)


# -- stats dirs --------------------------------------------------------------------------------

def test_stats_dir_is_reused_and_validated(probe_methods, tmp_path, calib_ids, monkeypatch):
    sd = tmp_path / "stats"
    a = sqllm.quantize(make_tiny_llama(), method="test-hessw", bits=3, calibration=calib_ids,
                       stats_dir=sd, progress=False)
    files = sorted(p.relative_to(sd).as_posix() for p in sd.rglob("*.safetensors"))
    assert files == sorted(f"hessian/model.layers.{i}.{n}.safetensors"
                           for i in range(2) for n in BLOCK_LINEARS)
    manifest = json.loads((sd / "manifest.json").read_text())
    assert manifest["calibration"]["nsamples"] == 4 and manifest["calibration"]["seqlen"] == 32
    assert manifest["model"]["layer_shapes"]["model.layers.0.mlp.down_proj"] == [64, 96]

    # second run: nothing is collected, no block is run on calibration data
    def no_collect(self, layers):
        raise AssertionError("statistics were collected again")

    monkeypatch.setattr(sqllm.calib.HessianCollector, "attach", no_collect)
    monkeypatch.setattr(sqllm.calib.streamer, "capture_block_inputs", no_collect)
    b = sqllm.quantize(make_tiny_llama(), method="test-hessw", bits=3, calibration=calib_ids,
                       stats_dir=sd, progress=False)
    _assert_same_tensors(a.state_dict(), b.state_dict())
    monkeypatch.undo()

    other_ids = calib_ids.clone()
    other_ids[0, 0] += 1
    with pytest.raises(ValueError, match=r"different calibration \(calibration.tokens_sha256"):
        sqllm.quantize(make_tiny_llama(), method="test-hessw", bits=3, calibration=other_ids,
                       stats_dir=sd, progress=False)
    with pytest.raises(ValueError, match=r"different calibration \(calibration.nsamples: "
                                         r"recorded 4, now 3"):
        sqllm.quantize(make_tiny_llama(), method="test-hessw", bits=3, calibration=calib_ids[:3],
                       stats_dir=sd, progress=False)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=256))
    with pytest.raises(ValueError, match="different model"):
        sqllm.quantize(wider, method="test-hessw", bits=3, calibration=calib_ids, stats_dir=sd,
                       progress=False)
    # true-sequential statistics depend on how the earlier blocks were quantized
    with pytest.raises(ValueError, match="'hessian' statistics were collected with different inputs"):
        sqllm.quantize(make_tiny_llama(), method="test-hessw", bits=4, calibration=calib_ids,
                       stats_dir=sd, progress=False)
    with pytest.raises(ValueError, match="different inputs"):
        sqllm.quantize(make_tiny_llama(), method="test-hessw", bits=3, calibration=calib_ids,
                       stats_dir=sd, fp_inputs=True, progress=False)
    with pytest.raises(ValueError, match="different inputs"):
        sqllm.quantize(make_tiny_llama(), method="test-hessw", bits=3, calibration=calib_ids,
                       stats_dir=sd, sequential_groups=True, progress=False)


def test_stats_dir_resumes_an_interrupted_collection(tmp_path, calib_ids):
    from sqllm.calib import stream_quantize

    sd = tmp_path / "stats"
    first = _Probe(bits=3)
    stream_quantize(make_tiny_llama(), first, calib_ids, stats_dir=sd, progress=False)
    assert len(list((sd / "act_stats").glob("*.safetensors"))) == 14
    for f in (sd / "hessian").glob("model.layers.1.*"):  # as if stopped after block 0
        f.unlink()
    again = _Probe(bits=3)
    stream_quantize(make_tiny_llama(), again, calib_ids, stats_dir=sd, progress=False)
    assert len(list((sd / "hessian").glob("*.safetensors"))) == 14
    for n, seen in first.seen.items():
        assert torch.equal(again.seen[n]["hessian"], seen["hessian"]), n
        assert again.seen[n]["count"] == seen["count"]
        for k in ("max_abs", "mean_abs", "mean"):
            assert torch.equal(again.seen[n]["act"][k], seen["act"][k]), (n, k)


def test_fisher_stats_dir_round_trip(tmp_path, calib_ids):
    sd = tmp_path / "stats"
    a = sqllm.quantize(make_tiny_llama(), method="squeezellm", bits=3, calibration=calib_ids,
                       stats_dir=sd, progress=False)
    assert len(list((sd / "fisher").glob("*.safetensors"))) == 14
    b = sqllm.quantize(make_tiny_llama(), method="squeezellm", bits=3, calibration=calib_ids,
                       stats_dir=sd, progress=False)
    _assert_same_tensors(a.state_dict(), b.state_dict())


# -- architectures ----------------------------------------------------------------------------

def _tiny(arch):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        return make_tiny_llama()
    if arch == "opt":
        cfg = tf.OPTConfig(vocab_size=257, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                           num_attention_heads=4, max_position_embeddings=128,
                           word_embed_proj_dim=32)
        return tf.OPTForCausalLM(cfg).eval()
    if arch == "mistral":
        cfg = tf.MistralConfig(vocab_size=257, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=128, sliding_window=16)
        return tf.MistralForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=257, n_embd=32, n_layer=3, n_head=4, n_positions=128)
        return tf.GPT2LMHeadModel(cfg).eval()
    raise AssertionError(arch)


@pytest.mark.parametrize("arch,name,n,cls", [
    ("llama", "model.layers", 2, "LlamaDecoderLayer"),
    ("opt", "model.decoder.layers", 3, "OPTDecoderLayer"),
    ("mistral", "model.layers", 2, "MistralDecoderLayer"),
    ("gpt2", "transformer.h", 3, "GPT2Block"),
])
def test_block_discovery(arch, name, n, cls):
    model = _tiny(arch)
    found, blocks = find_decoder_blocks(model)
    assert (found, len(blocks), type(blocks[0]).__name__) == (name, n, cls)
    with torch.device("meta"):
        meta = type(model)(model.config)
    assert find_decoder_blocks(meta)[0] == name


def test_block_discovery_rejects_a_model_without_blocks():
    with pytest.raises(ValueError, match="no list of identical blocks"):
        find_decoder_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


@pytest.mark.parametrize("arch", ["opt", "mistral"])
def test_block_inputs_replay_the_models_forward(probe_methods, arch, calib_ids):
    """Blocks run on the captured arguments reproduce the full model's hidden states."""
    model = _tiny(arch)
    ids = calib_ids[:, :24]
    direct = _linear_inputs(model, ids)
    qm = _Probe(bits=8)
    from sqllm.calib import stream_quantize

    stream_quantize(_tiny(arch), qm, ids, fp_inputs=True, progress=False)
    assert set(qm.seen) == set(direct) and len(direct) > 0
    for n, x in direct.items():
        assert torch.allclose(qm.seen[n]["hessian"], x.T @ x, rtol=1e-12, atol=1e-12), n


@pytest.mark.parametrize("arch", ["opt", "mistral"])
def test_streamed_rtn_from_meta_on_other_architectures(arch, tmp_path):
    model = _tiny(arch)
    if arch == "opt":  # Linears outside the blocks (project_in/out) are quantized too
        import transformers as tf

        torch.manual_seed(0)
        model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=257, hidden_size=32, ffn_dim=48,
                                               num_hidden_layers=3, num_attention_heads=4,
                                               max_position_embeddings=128,
                                               word_embed_proj_dim=16)).eval()
    model.save_pretrained(tmp_path / "src")
    sqllm.quantize(model, method="rtn", bits=4, progress=False)
    sqllm.save_quantized(model, tmp_path / "mem")
    sqllm.quantize(open_on_meta(tmp_path / "src"), method="rtn", bits=4, progress=False,
                   out=tmp_path / "meta")
    _assert_same_tensors(_saved(tmp_path / "mem"), _saved(tmp_path / "meta"))
    if arch == "opt":
        assert "model.decoder.project_in.qweight" in _saved(tmp_path / "meta")


# -- CLI and errors ---------------------------------------------------------------------------

def test_cli_streams_rtn_without_a_tokenizer(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    make_tiny_llama().save_pretrained(src)  # no tokenizer files
    assert not list(src.glob("tokenizer*"))
    import transformers

    def no_tokenizer(*a, **k):
        raise AssertionError("a tokenizer was loaded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_tokenizer)
    out = tmp_path / "q"
    assert cli_main(["quantize", "--model", str(src), "--method", "rtn", "--bits", "4",
                     "--out", str(out), "-q"]) == 0
    assert "block by block" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file()
    ref = sqllm.quantize(make_tiny_llama(), method="rtn", bits=4, progress=False)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(sqllm.load_quantized(out)(input_ids=ids).logits,
                           ref(input_ids=ids).logits)


def test_cli_stats_dir(tmp_path, tiny_model_dir, capsys):
    model_dir, text = tiny_model_dir
    args = ["quantize", "--model", str(model_dir), "--calib-text", str(text), "--nsamples", "2",
            "--seqlen", "16", "--bits", "3", "--stats-dir", str(tmp_path / "s"), "-q"]
    assert cli_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "s" / "fisher").is_dir()
    assert cli_main(args + ["--out", str(tmp_path / "b")]) == 0
    _assert_same_tensors(_saved(tmp_path / "a"), _saved(tmp_path / "b"))
    assert cli_main(args + ["--nsamples", "3", "--out", str(tmp_path / "c")]) == 2
    assert "different calibration" in capsys.readouterr().err


def test_stream_errors(probe_methods, tmp_path, calib_ids):
    src = tmp_path / "src"
    make_tiny_llama().save_pretrained(src)
    with pytest.raises(ValueError, match="needs calibration data"):
        sqllm.quantize(make_tiny_llama(), method="test-hessw", bits=3, progress=False)
    with pytest.raises(ValueError, match="only be quantized with stream=True"):
        sqllm.quantize(open_on_meta(src), method="rtn", stream=False, progress=False)
    with pytest.raises(ValueError, match="must stream"):
        sqllm.quantize(make_tiny_llama(), method="test-hessw", calibration=calib_ids,
                       stream=False, progress=False)
    with torch.device("meta"):
        bare = make_tiny_llama()
    with pytest.raises(ValueError, match="no checkpoint"):
        sqllm.quantize(bare, method="rtn", progress=False)
    with pytest.raises(ValueError, match="not saved in checkpoints"):
        sqllm.quantize(bare, method="rtn", checkpoint=src, calibration=calib_ids, progress=False)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        open_on_meta(tmp_path)
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        open_on_meta(tmp_path)
