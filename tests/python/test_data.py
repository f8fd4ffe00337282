"""Tests for sqllm.data: the R serialization reader, text sources, tokenization, calibration windows."""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import random
import struct
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sqllm import data
from sqllm.data import (
    INTSXP,
    LANGSXP,
    LGLSXP,
    NA_INTEGER,
    REALSXP,
    STRSXP,
    VECSXP,
    RObject,
    austen_text,
    calibration_batches,
    load_text,
    mobydick_text,
    tokenize_text,
)

# ---------------------------------------------------------------------------
# Streams written by R 4.2 itself (`serialize(x, NULL, version=...)`), so the
# reader is checked against R rather than against a writer of our own.
# ---------------------------------------------------------------------------
# list(s=c("x",NA,"\u00e9"), f=factor(c("u","v","u")), b=c(1.5,NA,Inf),
#      l=c(TRUE,NA,FALSE), df=data.frame(p=3:1, q=c("a","b","c")))   version 3
R_LIST_V3 = bytes.fromhex(
    "580a000000030004020200030500000000055554462d3800000213000000050000001000000003000400090000000178"
    "00000009ffffffff0000800900000002c3a90000030d0000000300000001000000020000000100000402000000010004"
    "0009000000066c6576656c73000000100000000200040009000000017500040009000000017600000402000000010004"
    "000900000005636c61737300000010000000010004000900000006666163746f72000000fe0000000e000000033ff800"
    "00000000007ff00000000007a27ff00000000000000000000a0000000300000001800000000000000000000313000000"
    "02000000ee0000000200000001000400090000000e636f6d706163745f696e7473657100000002000000010004000900"
    "00000462617365000000020000000d000000010000000d000000fe0000000e0000000340080000000000004008000000"
    "000000bff0000000000000000000fe000000100000000300040009000000016100040009000000016200040009000000"
    "0163000004020000000100040009000000056e616d657300000010000000020004000900000001700004000900000001"
    "7100000402000002ff0000001000000001000400090000000a646174612e6672616d6500000402000000010004000900"
    "000009726f772e6e616d65730000000d0000000280000000fffffffd000000fe00000402000005ff0000001000000005"
    "00040009000000017300040009000000016600040009000000016200040009000000016c000400090000000264660000"
    "00fe"
)
# 1:5 (an ALTREP compact_intseq), version 3
R_COMPACT_SEQ = bytes.fromhex(
    "580a000000030004020200030500000000055554462d38000000ee0000000200000001000400090000000e636f6d706163"
    "745f696e747365710000000200000001000400090000000462617365000000020000000d000000010000000d000000fe00"
    "00000e0000000340140000000000003ff00000000000003ff0000000000000000000fe"
)
# e <- new.env(); assign("k", 42L, e); list(e, e)   (second element is a REFSXP)
R_ENV_REF = bytes.fromhex(
    "580a000000030004020200030500000000055554462d3800000013000000020000000400000000000000fd000000fe0000"
    "00130000001d" + "000000fe" * 20 + "000004020000000100040009000000016b0000000d000000010000002a"
    + "000000fe" * 10 + "000001ff"
)
# c("x", "y"), version 2 (no native-encoding header)
R_STR_V2 = bytes.fromhex("580a0000000200040202000203000000001000000002000400090000000178000400090000000179")
# iconv("caf\u00e9", "UTF-8", "latin1"): a CHARSXP flagged latin-1
R_LATIN1 = bytes.fromhex(
    "580a000000030004020200030500000000055554462d3800000010000000010000400900000004636166e9"
)
# list(quote(f(x, y=2)), as.raw(c(1,255)), complex(real=1, imaginary=-2))
R_LANG_RAW_CPLX = bytes.fromhex(
    "580a000000030004020200030500000000055554462d38000000130000000300000006000000010004000900000001660000"
    "00020000000100040009000000017800000402000000010004000900000001790000000e00000001400000000000000000"
    "0000fe000000180000000201ff0000000f000000013ff0000000000000c000000000000000"
)
R_FIXTURES = [R_LIST_V3, R_COMPACT_SEQ, R_ENV_REF, R_STR_V2, R_LATIN1, R_LANG_RAW_CPLX]


def test_r_list_with_factor_dataframe_and_refs():
    obj = data._unserialize(R_LIST_V3, "fixture")
    assert obj.sexptype == VECSXP
    assert obj.names == ["s", "f", "b", "l", "df"]
    s, f, b, lgl, df = obj.value
    assert s.sexptype == STRSXP and s.value == ["x", None, "é"]
    assert f.r_class == ["factor"]
    assert f.attributes["levels"].value == ["u", "v"]
    np.testing.assert_array_equal(f.value, [1, 2, 1])
    assert b.sexptype == REALSXP
    assert b.value[0] == 1.5 and np.isnan(b.value[1]) and b.value[2] == np.inf
    assert lgl.sexptype == LGLSXP
    np.testing.assert_array_equal(lgl.value, [1, NA_INTEGER, 0])
    assert df.r_class == ["data.frame"]
    assert df.names == ["p", "q"]
    p, q = df.value
    assert p.sexptype == INTSXP  # serialized as an ALTREP compact sequence 3:1
    np.testing.assert_array_equal(p.value, [3, 2, 1])
    assert q.value == ["a", "b", "c"]
    np.testing.assert_array_equal(df.attributes["row.names"].value, [NA_INTEGER, -3])


def test_r_compact_sequence_v2_latin1_lang_raw_complex():
    seq = data._unserialize(R_COMPACT_SEQ, "fixture")
    assert seq.sexptype == INTSXP and seq.value.dtype == np.int32
    np.testing.assert_array_equal(seq.value, [1, 2, 3, 4, 5])
    assert data._unserialize(R_STR_V2, "fixture").value == ["x", "y"]
    assert data._unserialize(R_LATIN1, "fixture").value == ["café"]
    call, raw, cplx = data._unserialize(R_LANG_RAW_CPLX, "fixture").value
    assert call.sexptype == LANGSXP
    assert [(tag, v.value if isinstance(v, RObject) else v) for tag, v in call.value][:2] == [(None, "f"), (None, "x")]
    assert call.value[2][0] == "y" and call.value[2][1].value[0] == 2.0
    assert raw.value == b"\x01\xff"
    np.testing.assert_array_equal(cplx.value, [1 - 2j])


def test_r_reference_resolves_to_same_object():
    first, second = data._unserialize(R_ENV_REF, "fixture").value
    assert first is second
    assert first.type_name == "environment"


@pytest.mark.parametrize("blob", R_FIXTURES, ids=range(len(R_FIXTURES)))
def test_r_every_truncation_is_a_clear_value_error(blob):
    for cut in range(len(blob)):
        with pytest.raises(ValueError, match="fixture.bin"):
            data._unserialize(blob[:cut], "fixture.bin")


@pytest.mark.parametrize("blob", R_FIXTURES, ids=range(len(R_FIXTURES)))
def test_r_corrupt_bytes_never_raise_anything_but_value_error(blob):
    rng = random.Random(1234)
    for _ in range(300):
        x = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            x[rng.randrange(len(x))] = rng.randrange(256)
        try:
            data._unserialize(bytes(x), "fuzz")
        except ValueError:
            pass


def test_r_unsupported_and_foreign_formats():
    header = R_STR_V2[:14]
    with pytest.raises(ValueError, match=r"my\.rds.*unknown SEXP type 200"):
        data._unserialize(header + struct.pack(">i", 200), "my.rds")
    with pytest.raises(ValueError, match="ASCII"):
        data._unserialize(b"A\n" + R_STR_V2[2:], "a.rds")
    with pytest.raises(ValueError, match="not an R serialization"):
        data._unserialize(b"PK\x03\x04 zip file", "z.rds")
    with pytest.raises(ValueError, match="version 9"):
        data._unserialize(b"X\n" + struct.pack(">iii", 9, 0, 0), "v.rds")


# ---------------------------------------------------------------------------
# A minimal XDR writer, to build lazy-load databases and .rds/.rda files.
# ---------------------------------------------------------------------------
def _w_int(v: int) -> bytes:
    return struct.pack(">i", v)


def _w_char(s: str) -> bytes:
    raw = s.encode("utf-8")
    return _w_int(9 | (8 << 12)) + _w_int(len(raw)) + raw  # UTF-8 flagged CHARSXP


def _w_strs(values: list[str], attrs: bytes = b"") -> bytes:
    flags = STRSXP | (0x200 if attrs else 0)
    return _w_int(flags) + _w_int(len(values)) + b"".join(_w_char(v) for v in values) + attrs


def _w_sym(name: str) -> bytes:
    return _w_int(1) + _w_char(name)  # SYMSXP


def _w_names_attr(names: list[str]) -> bytes:
    # pairlist(names = <names>): LISTSXP cell with a tag, then the NILVALUE terminator
    return _w_int(2 | 0x400) + _w_sym("names") + _w_strs(names) + _w_int(254)


def _w_named_list(items: dict[str, bytes]) -> bytes:
    return _w_int(VECSXP | 0x200) + _w_int(len(items)) + b"".join(items.values()) + _w_names_attr(list(items))


def _w_ints(values: list[int], sexptype: int = INTSXP) -> bytes:
    return _w_int(sexptype) + _w_int(len(values)) + b"".join(_w_int(v) for v in values)


def _stream(item: bytes) -> bytes:
    return b"X\n" + _w_int(3) + _w_int(0x040202) + _w_int(0x030500) + _w_int(5) + b"UTF-8" + item


def _write_lazyload_db(data_dir: Path, objects: dict[str, bytes], kind: int = 1) -> None:
    """Write Rdata.rdb/.rdx holding the given serialized items (R_compress1/2/3 records)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rdb = b""
    index = {}
    for name, item in objects.items():
        payload = _stream(item)
        head = struct.pack(">I", len(payload))
        if kind == 1:
            record = head + zlib.compress(payload)
        elif kind == 2:
            record = head + b"2" + bz2.compress(payload)
        else:
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
            record = head + b"Z" + lzma.compress(payload, format=lzma.FORMAT_RAW, filters=filters)
        index[name] = _w_ints([len(rdb), len(record)])
        rdb += record
    rdx = _w_named_list(
        {
            "variables": _w_named_list(index),
            "references": _w_named_list({}),
            "compressed": _w_ints([1 if kind == 1 else kind], LGLSXP if kind == 1 else INTSXP),
        }
    )
    (data_dir / "Rdata.rdb").write_bytes(rdb)
    (data_dir / "Rdata.rdx").write_bytes(gzip.compress(_stream(rdx)))


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_austen_text_from_a_lazyload_db(tmp_path, kind):
    pkg = tmp_path / "janeaustenr"
    _write_lazyload_db(pkg / "data", {"emma": _w_strs(["EMMA", "", "By Jane Austen"]),
                                      "persuasion": _w_strs(["Persuasion"])}, kind)
    assert austen_text("emma", root=pkg) == "EMMA\n\nBy Jane Austen"
    assert austen_text("Persuasion", root=tmp_path) == "Persuasion"  # library dir, any case


def test_austen_text_errors(tmp_path):
    with pytest.raises(ValueError, match="valid names.*sense.*pride.*mansfield.*emma.*northanger.*persuasion"):
        austen_text("ulysses", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install r-cran-janeaustenr"):
        austen_text("emma", root=tmp_path)
    pkg = tmp_path / "janeaustenr"
    _write_lazyload_db(pkg / "data", {"emma": _w_strs(["EMMA"] * 50)})
    rdb = pkg / "data" / "Rdata.rdb"
    rdb.write_bytes(rdb.read_bytes()[:-7])
    with pytest.raises(ValueError, match="Rdata.rdb"):
        austen_text("emma", root=pkg)
    _write_lazyload_db(pkg / "data", {"emma": _w_ints([1, 2])})
    with pytest.raises(ValueError, match="expected an R character vector"):
        austen_text("emma", root=pkg)


def test_rds_and_rda_files(tmp_path):
    stream = _stream(_w_strs(["a", "b"]))
    for name, blob in [("x.rds", gzip.compress(stream)), ("y.rds", bz2.compress(stream)),
                       ("z.rds", lzma.compress(stream)), ("w.rds", stream)]:
        (tmp_path / name).write_bytes(blob)
        assert data._read_rds(tmp_path / name).value == ["a", "b"]
    pairlist = _w_int(2 | 0x400) + _w_sym("lines") + _w_strs(["one", "two"]) + _w_int(254)
    (tmp_path / "mobydick.rda").write_bytes(gzip.compress(b"RDX3\n" + _stream(pairlist)))
    assert data._read_rdata(tmp_path / "mobydick.rda")["lines"].value == ["one", "two"]
    (tmp_path / "bad.rds").write_bytes(gzip.compress(stream)[:-9])
    with pytest.raises(ValueError, match="bad.rds"):
        data._read_rds(tmp_path / "bad.rds")


def test_mobydick_from_rda_package(tmp_path):
    pkg = tmp_path / "tokenizers"
    (pkg / "data").mkdir(parents=True)
    pairlist = (_w_int(2 | 0x400) + _w_sym("mobydick")
                + _w_strs(["\ufeffCall me Ishmael.\r\nSome years ago"]) + _w_int(254))
    (pkg / "data" / "mobydick.rda").write_bytes(gzip.compress(b"RDX2\n" + _stream(pairlist)))
    assert mobydick_text(root=pkg) == "Call me Ishmael.\nSome years ago"
    with pytest.raises(FileNotFoundError, match="apt-get install r-cran-tokenizers"):
        mobydick_text(root=tmp_path / "nowhere")


# ---------------------------------------------------------------------------
# The real Debian packages (skipped where they are not installed)
# ---------------------------------------------------------------------------
def _installed(package: str) -> bool:
    try:
        data._find_r_package(package, None, "")
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed("janeaustenr"), reason="r-cran-janeaustenr not installed")
def test_real_austen_novels():
    emma = austen_text("emma")
    assert emma.startswith("EMMA\n\nBy Jane Austen\n")
    assert emma.count("\n") + 1 == 16235  # length(janeaustenr::emma)
    assert "Emma Woodhouse, handsome, clever, and rich" in emma
    assert austen_text("pride") == austen_text("prideprejudice")
    assert "It is a truth universally acknowledged" in austen_text("pride")
    assert load_text("austen:persuasion").startswith("Persuasion\n")


@pytest.mark.skipif(not _installed("tokenizers"), reason="r-cran-tokenizers not installed")
def test_real_mobydick():
    text = mobydick_text()
    assert text.startswith("The Project Gutenberg EBook of Moby Dick")
    assert "\r" not in text and "Call me Ishmael." in text


# ---------------------------------------------------------------------------
# load_text
# ---------------------------------------------------------------------------
def test_load_text_file_and_unknown(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("naïve text\n", encoding="utf-8")
    assert load_text(str(path)) == "naïve text\n"
    with pytest.raises(ValueError, match="unknown text source.*austen:<book>.*mobydick.*wikitext2"):
        load_text(str(tmp_path / "missing.txt"))


def test_load_text_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_text("wikitext2")


def _fake_datasets(monkeypatch, behaviour):
    mod = types.ModuleType("datasets")
    mod.config = types.SimpleNamespace(HF_DATASETS_OFFLINE=False, HF_HUB_OFFLINE=False)
    seen = {}

    def load_dataset(*args, **kwargs):
        seen["offline"] = (mod.config.HF_DATASETS_OFFLINE, mod.config.HF_HUB_OFFLINE)
        seen["args"], seen["kwargs"] = args, kwargs
        return behaviour(*args, **kwargs)

    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)
    return mod, seen


def test_load_text_hf_offline_and_not_cached(monkeypatch):
    def not_cached(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (offline mode is enabled)")

    mod, seen = _fake_datasets(monkeypatch, not_cached)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_text("c4")
    assert seen["offline"] == (True, True)  # forced offline during the call...
    assert (mod.config.HF_DATASETS_OFFLINE, mod.config.HF_HUB_OFFLINE) == (False, False)  # ...and restored
    assert seen["kwargs"]["split"] == "validation"


def test_load_text_hf_joins_like_gptq(monkeypatch):
    _, seen = _fake_datasets(monkeypatch, lambda *a, **k: {"text": ["a", "", " b"]})
    assert load_text("wikitext2") == "a\n\n\n\n b"
    assert seen["args"] == ("wikitext", "wikitext-2-raw-v1") and seen["kwargs"]["split"] == "test"
    _fake_datasets(monkeypatch, lambda *a, **k: {"sentence": ["x y", "z"]})
    assert load_text("ptb") == "x y\n\nz"


# ---------------------------------------------------------------------------
# Tokenization and calibration windows
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer():
    """A real (fast) transformers tokenizer over a small word vocabulary, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of and to in emma was she her not be it had".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=16)


TEXT = " ".join(["emma was not the a of and to in she her be it had"] * 20)  # 280 words


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_tokenize_text_long_text_without_length_warning(word_tokenizer):
    records = _Records()
    hf_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    hf_logger.addHandler(records)
    try:
        ids = tokenize_text(word_tokenizer, TEXT)
        assert not any("longer than the specified maximum" in m for m in records.messages)
        # control: the plain tokenizer call does log the message
        word_tokenizer(TEXT)
        assert any("longer than the specified maximum" in m for m in records.messages)
    finally:
        hf_logger.removeHandler(records)
    assert ids.dtype == torch.long and ids.shape == (1, 280)  # far beyond model_max_length=16
    assert ids[0, :3].tolist() == [7, 8, 11]  # "emma was not"


def test_calibration_batches_deterministic_windows(word_tokenizer):
    ids = tokenize_text(word_tokenizer, TEXT)[0]
    a = calibration_batches(word_tokenizer, TEXT, nsamples=5, seqlen=32, seed=3)
    b = calibration_batches(word_tokenizer, TEXT, nsamples=5, seqlen=32, seed=3)
    c = calibration_batches(word_tokenizer, TEXT, nsamples=5, seqlen=32, seed=4)
    assert a.shape == (5, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    windows = ids.unfold(0, 32, 1)
    for row in a:
        assert (windows == row).all(dim=1).any()  # every sample is a contiguous window
    exact = calibration_batches(None, ids[:32].unsqueeze(0), nsamples=2, seqlen=32)
    assert torch.equal(exact, ids[:32].expand(2, 32))  # T == seqlen: the only window


def test_calibration_batches_errors(word_tokenizer):
    with pytest.raises(ValueError, match="has 280 tokens.*seqlen=512"):
        calibration_batches(word_tokenizer, TEXT, nsamples=4, seqlen=512)
    with pytest.raises(ValueError, match="nsamples"):
        calibration_batches(word_tokenizer, TEXT, nsamples=0, seqlen=8)
    with pytest.raises(ValueError, match="seqlen"):
        calibration_batches(word_tokenizer, TEXT, nsamples=1, seqlen=0)
    with pytest.raises(ValueError, match=r"\[T\] or \[1, T\]"):
        calibration_batches(None, torch.zeros(2, 40, dtype=torch.long), nsamples=1, seqlen=8)
