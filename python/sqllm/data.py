"""Offline text corpora and calibration batches.

Two public-domain novels collections ship as Debian packages and need no network:

* ``r-cran-janeaustenr``: the six complete Jane Austen novels, stored as R
  character vectors (one element per line) in the package's lazy-load database
  ``data/Rdata.rdb`` / ``data/Rdata.rdx``.
* ``r-cran-tokenizers``: *Moby Dick* as a single R string (object ``mobydick``).

They are read with a small, self-contained reader for R's serialization format
(XDR, versions 2 and 3), so neither R nor any R-reading Python package is needed.
Benchmarks that live on the Hugging Face Hub (WikiText-2, C4, PTB) are read through
the optional :mod:`datasets` package, from the local cache only.

Functions
---------
austen_text
    The text of a Jane Austen novel.
mobydick_text
    The text of *Moby Dick*.
load_text
    Text from a source name (``"austen:emma"``, ``"mobydick"``, ``"wikitext2"``, ...)
    or a local file.
tokenize_text
    Tokenize a long text into a ``[1, T]`` tensor.
calibration_batches
    Random windows of a tokenized text, GPTQ style.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import lzma
import math
import os
import random
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "AUSTEN_BOOKS",
    "austen_text",
    "calibration_batches",
    "load_text",
    "mobydick_text",
    "tokenize_text",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# R serialization format
# ---------------------------------------------------------------------------
# Reference: R's src/main/serialize.c (ReadItem, InFormat, ReadLENGTH) and
# src/main/saveload.c (R_decompress1/2/3, "RDX2"/"RDX3" headers).

# SEXP type codes (Rinternals.h).
NILSXP = 0
SYMSXP = 1
LISTSXP = 2
CLOSXP = 3
ENVSXP = 4
PROMSXP = 5
LANGSXP = 6
SPECIALSXP = 7
BUILTINSXP = 8
CHARSXP = 9
LGLSXP = 10
INTSXP = 13
REALSXP = 14
CPLXSXP = 15
STRSXP = 16
DOTSXP = 17
VECSXP = 19
EXPRSXP = 20
BCODESXP = 21
EXTPTRSXP = 22
WEAKREFSXP = 23
RAWSXP = 24
S4SXP = 25

# Pseudo-types used only in the serialization stream (serialize.c).
REFSXP = 255
NILVALUE_SXP = 254
GLOBALENV_SXP = 253
UNBOUNDVALUE_SXP = 252
MISSINGARG_SXP = 251
BASENAMESPACE_SXP = 250
NAMESPACESXP = 249
PACKAGESXP = 248
PERSISTSXP = 247
CLASSREFSXP = 246
GENERICREFSXP = 245
BCREPDEF = 244
BCREPREF = 243
EMPTYENV_SXP = 242
BASEENV_SXP = 241
ATTRLANGSXP = 240
ATTRLISTSXP = 239
ALTREP_SXP = 238

_IS_OBJECT_BIT = 1 << 8
_HAS_ATTR_BIT = 1 << 9
_HAS_TAG_BIT = 1 << 10

# CHARSXP encoding bits in the "levels" field.
_BYTES_MASK = 1 << 1
_LATIN1_MASK = 1 << 2
_UTF8_MASK = 1 << 3
_ASCII_MASK = 1 << 6

#: R's NA_integer_ (and NA for logicals), as stored in the stream.
NA_INTEGER = -(2**31)
# Longest compact sequence (ALTREP 1:n) that is expanded into an array.
_MAX_COMPACT_SEQ = 2**28


_PAIRLIST_TYPES = frozenset({LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP})
_BC_LANG_TYPES = frozenset({LANGSXP, LISTSXP, BCREPDEF, BCREPREF, ATTRLANGSXP, ATTRLISTSXP})
_SPECIAL_ENVS = {
    GLOBALENV_SXP: "R_GlobalEnv",
    EMPTYENV_SXP: "R_EmptyEnv",
    BASEENV_SXP: "R_BaseEnv",
    BASENAMESPACE_SXP: "R_BaseNamespace",
}
_TYPE_NAMES = {
    NILSXP: "NULL",
    SYMSXP: "symbol",
    LISTSXP: "pairlist",
    CLOSXP: "closure",
    ENVSXP: "environment",
    PROMSXP: "promise",
    LANGSXP: "language",
    SPECIALSXP: "special",
    BUILTINSXP: "builtin",
    CHARSXP: "char",
    LGLSXP: "logical",
    INTSXP: "integer",
    REALSXP: "double",
    CPLXSXP: "complex",
    STRSXP: "character",
    DOTSXP: "...",
    VECSXP: "list",
    EXPRSXP: "expression",
    BCODESXP: "bytecode",
    EXTPTRSXP: "externalptr",
    WEAKREFSXP: "weakref",
    RAWSXP: "raw",
    S4SXP: "S4",
    PERSISTSXP: "persistent reference",
    CLASSREFSXP: "class reference",
    GENERICREFSXP: "generic function reference",
    BCREPDEF: "bytecode reference",
    ATTRLANGSXP: "bytecode language",
    ATTRLISTSXP: "bytecode pairlist",
}


@dataclass
class RObject:
    """A deserialized R value.

    Parameters
    ----------
    sexptype : int
        R's SEXP type code (``STRSXP`` = 16, ``VECSXP`` = 19, ...).
    value : Any
        The payload. ``STRSXP``: ``list[str | None]`` (``None`` is ``NA``);
        ``LGLSXP``/``INTSXP``: ``numpy.int32`` array (``NA`` is :data:`NA_INTEGER`);
        ``REALSXP``: ``float64`` array; ``CPLXSXP``: ``complex128`` array;
        ``RAWSXP``: ``bytes``; ``VECSXP``/``EXPRSXP``: ``list``;
        ``LISTSXP``/``LANGSXP``/``DOTSXP``: ``list[tuple[str | None, Any]]`` of
        (tag, value); ``CLOSXP``/``PROMSXP``: ``dict`` with ``tag``, ``car``, ``cdr``;
        ``SYMSXP``: the symbol's name; ``ENVSXP``: a ``dict`` with ``enclos``,
        ``frame``, ``hashtab`` or the name of a special environment.
    attributes : dict of str to Any
        The object's attributes (``names``, ``class``, ``levels``, ...).
    """

    sexptype: int
    value: Any = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        """R's name for the type (``"character"``, ``"list"``, ...)."""
        return _TYPE_NAMES.get(self.sexptype, str(self.sexptype))

    @property
    def r_class(self) -> list[str]:
        """The explicit ``class`` attribute (empty when absent)."""
        cls = self.attributes.get("class")
        if isinstance(cls, RObject) and cls.sexptype == STRSXP:
            return [c for c in cls.value if c is not None]
        return []

    @property
    def names(self) -> list[str | None] | None:
        """The ``names`` attribute as a list, or ``None`` when absent."""
        nm = self.attributes.get("names")
        if isinstance(nm, RObject) and nm.sexptype == STRSXP:
            return list(nm.value)
        return None


class _RStreamReader:
    """Reader for one XDR-format R serialization stream (``serialize()`` output).

    Parameters
    ----------
    data : bytes
        The stream, starting with its ``"X\\n"`` format line.
    source : str
        A description of where the bytes came from, used in error messages.
    """

    def __init__(self, data: bytes, source: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._source = source
        self._refs: list[Any] = []
        self._native_encoding = "utf-8"
        self.version = 0

    # -- primitive reads ---------------------------------------------------
    def _error(self, message: str) -> ValueError:
        return ValueError(f"{self._source}: {message}")

    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._data):
            raise self._error(
                f"truncated or corrupt R data: needed {n} bytes at offset {self._pos}, "
                f"only {len(self._data) - self._pos} left"
            )
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n >= 0:
            return n
        if n != -1:
            raise self._error(f"corrupt R data: negative vector length {n} at offset {self._pos - 4}")
        upper = struct.unpack(">I", self._take(4))[0]
        lower = struct.unpack(">I", self._take(4))[0]
        return (upper << 32) + lower

    def _check_count(self, n: int, item_bytes: int) -> None:
        # Fail fast (before allocating) when a length field runs past the end.
        if n * item_bytes > len(self._data) - self._pos:
            raise self._error(
                f"truncated or corrupt R data: a vector of {n} elements at offset {self._pos} "
                f"runs past the end of the stream ({len(self._data)} bytes)"
            )

    # -- header --------------------------------------------------------------
    def read(self) -> Any:
        """Parse the header and the single top-level item.

        Returns
        -------
        Any
            ``None`` for R's ``NULL``, else an :class:`RObject`.
        """
        fmt = bytes(self._take(2))
        if fmt == b"A\n":
            raise self._error("unsupported R serialization: ASCII format (only XDR 'X' is supported)")
        if fmt == b"B\n":
            raise self._error("unsupported R serialization: native binary format (only XDR 'X' is supported)")
        if fmt != b"X\n":
            raise self._error(f"not an R serialization stream (format bytes {fmt!r}, expected b'X\\n')")
        self.version = self._int()
        self._int()  # version of R that wrote it
        self._int()  # minimal R version able to read it
        if self.version == 3:
            nelen = self._int()
            if not 0 <= nelen <= 1024:
                raise self._error(f"corrupt R data: native encoding name of length {nelen}")
            enc = bytes(self._take(nelen)).decode("ascii", errors="replace")
            self._native_encoding = _python_encoding(enc)
        elif self.version != 2:
            raise self._error(f"unsupported R serialization version {self.version} (supported: 2, 3)")
        try:
            return self._item()
        except RecursionError as exc:
            raise self._error("unsupported R data: objects nested too deeply") from exc

    # -- items ---------------------------------------------------------------
    def _item(self) -> Any:
        flags = self._int()
        sexptype = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & _HAS_ATTR_BIT)
        has_tag = bool(flags & _HAS_TAG_BIT)

        if sexptype == NILVALUE_SXP:
            return None
        if sexptype in _SPECIAL_ENVS:
            return RObject(ENVSXP, _SPECIAL_ENVS[sexptype])
        if sexptype == UNBOUNDVALUE_SXP:
            return RObject(SYMSXP, "<unbound>")
        if sexptype == MISSINGARG_SXP:
            return RObject(SYMSXP, "")
        if sexptype == REFSXP:
            index = flags >> 8
            if index == 0:
                index = self._int()
            if not 1 <= index <= len(self._refs):
                raise self._error(
                    f"corrupt R data: reference #{index} but only {len(self._refs)} objects seen"
                )
            return self._refs[index - 1]
        if sexptype == PERSISTSXP:
            # A hook-serialized reference (environments in lazy-load databases);
            # kept unresolved.
            obj = RObject(PERSISTSXP, self._string_vec())
            self._refs.append(obj)
            return obj
        if sexptype == SYMSXP:
            name = self._item()
            if not isinstance(name, str):
                raise self._error("corrupt R data: symbol name is not a string")
            sym = RObject(SYMSXP, name)
            self._refs.append(sym)
            return sym
        if sexptype in (NAMESPACESXP, PACKAGESXP):
            obj = RObject(ENVSXP, {"namespace" if sexptype == NAMESPACESXP else "package": self._string_vec()})
            self._refs.append(obj)
            return obj
        if sexptype == ENVSXP:
            self._int()  # locked flag
            env = RObject(ENVSXP, {})
            self._refs.append(env)
            env.value["enclos"] = self._item()
            env.value["frame"] = self._item()
            env.value["hashtab"] = self._item()
            env.attributes = self._attributes(self._item())
            return env
        if sexptype in _PAIRLIST_TYPES:
            return self._pairlist(sexptype, has_attr, has_tag)
        if sexptype == ALTREP_SXP:
            return self._altrep()
        if sexptype == CHARSXP:
            value = self._charsxp(levels)
            if has_attr:
                self._item()  # old streams may carry (ignored) CHARSXP attributes
            return value

        if sexptype == EXTPTRSXP:
            obj = RObject(sexptype, {})
            self._refs.append(obj)
            obj.value["protected"] = self._item()
            obj.value["tag"] = self._item()
        elif sexptype == WEAKREFSXP:
            obj = RObject(sexptype, None)
            self._refs.append(obj)
        elif sexptype == BCODESXP:
            n_reps = self._int()
            self._check_count(n_reps, 4)
            obj = self._bytecode([None] * max(n_reps, 0))
        else:
            obj = self._vector(sexptype)
        if has_attr:
            obj.attributes = self._attributes(self._item())
        return obj

    def _vector(self, sexptype: int) -> RObject:
        if sexptype in (LGLSXP, INTSXP):
            n = self._length()
            self._check_count(n, 4)
            arr = np.frombuffer(self._take(4 * n), dtype=">i4").astype(np.int32)
            return RObject(sexptype, arr)
        if sexptype == REALSXP:
            n = self._length()
            self._check_count(n, 8)
            return RObject(sexptype, np.frombuffer(self._take(8 * n), dtype=">f8").astype(np.float64))
        if sexptype == CPLXSXP:
            n = self._length()
            self._check_count(n, 16)
            parts = np.frombuffer(self._take(16 * n), dtype=">f8").astype(np.float64)
            return RObject(sexptype, parts.view(np.complex128))
        if sexptype == RAWSXP:
            n = self._length()
            self._check_count(n, 1)
            return RObject(sexptype, bytes(self._take(n)))
        if sexptype == STRSXP:
            n = self._length()
            self._check_count(n, 4)
            values: list[str | None] = []
            for _ in range(n):
                s = self._item()
                if s is not None and not isinstance(s, str):
                    raise self._error("corrupt R data: character vector element is not a string")
                values.append(s)
            return RObject(sexptype, values)
        if sexptype in (VECSXP, EXPRSXP):
            n = self._length()
            self._check_count(n, 4)
            return RObject(sexptype, [self._item() for _ in range(n)])
        if sexptype in (SPECIALSXP, BUILTINSXP):
            n = self._int()
            return RObject(sexptype, bytes(self._take(max(n, 0))).decode("ascii", errors="replace"))
        if sexptype == S4SXP:
            return RObject(sexptype, None)
        name = _TYPE_NAMES.get(sexptype)
        if name is not None:
            raise self._error(f"unsupported R object type {sexptype} ({name}) at offset {self._pos - 4}")
        raise self._error(f"corrupt R data: unknown SEXP type {sexptype} at offset {self._pos - 4}")

    # -- byte code (compiled closures, in R code databases) --------------------
    def _bytecode(self, reps: list[Any]) -> RObject:
        code = self._item()
        n = self._int()
        self._check_count(n, 4)
        consts = []
        for _ in range(n):
            kind = self._int()
            if kind == BCODESXP:
                consts.append(self._bytecode(reps))
            elif kind in _BC_LANG_TYPES:
                consts.append(self._bytecode_lang(kind, reps))
            else:
                consts.append(self._item())
        return RObject(BCODESXP, {"code": code, "consts": consts})

    def _bytecode_lang(self, kind: int, reps: list[Any]) -> Any:
        if kind == BCREPREF:
            index = self._int()
            if not 0 <= index < len(reps):
                raise self._error(f"corrupt R data: byte-code reference {index} out of range")
            return reps[index]
        if kind not in _BC_LANG_TYPES:
            return self._item()  # `kind` was padding before an ordinary item
        pos = -1
        if kind == BCREPDEF:
            pos = self._int()
            kind = self._int()
        has_attr = kind in (ATTRLANGSXP, ATTRLISTSXP)
        sexptype = LANGSXP if kind in (LANGSXP, ATTRLANGSXP) else LISTSXP
        cell = RObject(sexptype, [])
        if pos >= 0:
            if pos >= len(reps):
                raise self._error(f"corrupt R data: byte-code definition {pos} out of range")
            reps[pos] = cell
        if has_attr:
            cell.attributes = self._attributes(self._item())
        tag = self._item()
        tag_name = tag.value if isinstance(tag, RObject) and tag.sexptype == SYMSXP else None
        car = self._bytecode_lang(self._int(), reps)
        cdr = self._bytecode_lang(self._int(), reps)
        cell.value.append((tag_name, car))
        if isinstance(cdr, RObject) and cdr.sexptype in (LISTSXP, LANGSXP) and cdr is not cell:
            cell.value.extend(cdr.value)
        elif cdr is not None:
            cell.value.append((None, cdr))
        return cell

    def _charsxp(self, levels: int) -> str | None:
        n = self._int()
        if n == -1:
            return None
        if n < 0:
            raise self._error(f"corrupt R data: string of length {n}")
        raw = bytes(self._take(n))
        if levels & _UTF8_MASK or levels & _ASCII_MASK:
            encoding = "utf-8"
        elif levels & _LATIN1_MASK:
            encoding = "latin-1"
        elif levels & _BYTES_MASK:
            return raw.decode("utf-8", errors="surrogateescape")
        else:
            encoding = self._native_encoding
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise self._error(f"string at offset {self._pos - n} is not valid {encoding}: {exc}") from exc

    def _string_vec(self) -> list[str | None]:
        if self._int() != 0:
            raise self._error("corrupt R data: bad string vector header")
        n = self._int()
        self._check_count(n, 4)
        out = []
        for _ in range(n):
            s = self._item()
            out.append(s if isinstance(s, str) or s is None else str(s))
        return out

    def _pairlist(self, sexptype: int, has_attr: bool, has_tag: bool) -> RObject:
        if sexptype in (CLOSXP, PROMSXP):
            # Closure: tag = environment, car = formals, cdr = body.
            # Promise: tag = environment, car = value, cdr = expression.
            attr = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            return RObject(sexptype, {"tag": tag, "car": car, "cdr": cdr}, self._attributes(attr))
        # Iterate along the CDR chain instead of recursing, so long pairlists
        # (attribute lists, argument lists) cannot exhaust Python's stack.
        head = RObject(sexptype, [])
        first = True
        while True:
            attr = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            if first:
                head.attributes = self._attributes(attr)
                first = False
            tag_name = tag.value if isinstance(tag, RObject) and tag.sexptype == SYMSXP else None
            head.value.append((tag_name, self._item()))
            # Peek at the CDR: another cons cell continues the chain.
            save = self._pos
            flags = self._int()
            if flags & 0xFF in (LISTSXP, DOTSXP):
                has_attr = bool(flags & _HAS_ATTR_BIT)
                has_tag = bool(flags & _HAS_TAG_BIT)
                continue
            self._pos = save
            cdr = self._item()
            if cdr is not None:  # dotted pair: keep the tail as an untagged element
                head.value.append((None, cdr))
            return head

    def _attributes(self, attr: Any) -> dict[str, Any]:
        if attr is None:
            return {}
        if not isinstance(attr, RObject) or attr.sexptype != LISTSXP:
            raise self._error("corrupt R data: attributes are not a pairlist")
        return {str(tag): value for tag, value in attr.value}

    def _altrep(self) -> RObject:
        info = self._item()
        state = self._item()
        attr = self._item()
        if not isinstance(info, RObject) or info.sexptype != LISTSXP or not info.value:
            raise self._error("corrupt R data: bad ALTREP class information")
        cls = info.value[0][1]
        if not isinstance(cls, RObject) or cls.sexptype != SYMSXP:
            raise self._error("corrupt R data: ALTREP class is not a symbol")
        obj = _expand_altrep(cls.value, state)
        if obj is None:
            raise self._error(f"unsupported or corrupt R object: ALTREP class {cls.value!r} with this state")
        obj.attributes = self._attributes(attr)
        return obj


def _expand_altrep(cls_name: str, state: Any) -> RObject | None:
    """Materialize the ALTREP classes base R serializes (compact sequences, wrappers)."""
    if cls_name in ("compact_intseq", "compact_realseq"):
        if not isinstance(state, RObject) or state.sexptype not in (REALSXP, INTSXP) or len(state.value) != 3:
            return None
        n, start, step = (float(v) for v in state.value)
        if not all(math.isfinite(v) for v in (n, start, step)) or not 0 <= n <= _MAX_COMPACT_SEQ:
            return None
        seq = start + step * np.arange(int(n), dtype=np.float64)
        if cls_name == "compact_intseq":
            if seq.size and (np.abs(seq).max() > 2**31 - 1 or seq.min() == NA_INTEGER):
                return None
            return RObject(INTSXP, seq.astype(np.int32))
        return RObject(REALSXP, seq)
    if cls_name.startswith("wrap_"):
        # state is CONS(wrapped vector, metadata).
        if isinstance(state, RObject) and state.sexptype == LISTSXP and state.value:
            inner = state.value[0][1]
            if isinstance(inner, RObject):
                return RObject(inner.sexptype, inner.value, dict(inner.attributes))
        return None
    if cls_name == "deferred_string":
        # state is a pairlist (original vector, scalar-formatting info).
        if isinstance(state, RObject) and state.sexptype == LISTSXP and state.value:
            arg = state.value[0][1]
            if isinstance(arg, RObject) and arg.sexptype == STRSXP:
                return RObject(STRSXP, list(arg.value))
            if isinstance(arg, RObject) and arg.sexptype == INTSXP:
                return RObject(STRSXP, [None if v == NA_INTEGER else str(int(v)) for v in arg.value])
        return None
    return None


def _python_encoding(r_encoding: str) -> str:
    enc = r_encoding.strip().lower()
    if enc in ("", "utf-8", "utf8", "c", "posix", "ansi_x3.4-1968", "us-ascii"):
        return "utf-8"
    if enc in ("latin1", "iso-8859-1", "iso8859-1", "cp1252"):
        return "latin-1" if enc != "cp1252" else "cp1252"
    return enc


def _decompress_file_bytes(data: bytes, source: str) -> bytes:
    """Undo the whole-file compression ``saveRDS``/``save`` may apply."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
        raise ValueError(f"{source}: corrupt compressed R data: {exc}") from exc
    if data[:4] == b"\x28\xb5\x2f\xfd":
        raise ValueError(f"{source}: unsupported compression (zstd) of R data")
    return data


def _unserialize(data: bytes, source: str) -> Any:
    """Deserialize one XDR R serialization stream."""
    return _RStreamReader(data, source).read()


def _read_rds(path: str | os.PathLike[str]) -> Any:
    """Read an ``.rds`` file (``saveRDS`` output, any of R's compressions).

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    Any
        ``None`` for ``NULL``, else an :class:`RObject`.

    Raises
    ------
    ValueError
        If the file is not XDR R serialization, or is truncated or corrupt.
    """
    path = Path(path)
    return _unserialize(_decompress_file_bytes(path.read_bytes(), str(path)), str(path))


def _read_rdata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the objects of an ``.rda``/``.RData`` file (``save`` output).

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    dict of str to Any
        Object name to value.

    Raises
    ------
    ValueError
        If the file is not an XDR ``RDX2``/``RDX3`` file, or is truncated or corrupt.
    """
    path = Path(path)
    data = _decompress_file_bytes(path.read_bytes(), str(path))
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise ValueError(f"{path}: not an XDR R data file (magic {data[:5]!r}, expected RDX2 or RDX3)")
    obj = _unserialize(data[5:], str(path))
    if obj is None:
        return {}
    if not isinstance(obj, RObject) or obj.sexptype != LISTSXP:
        raise ValueError(f"{path}: corrupt R data file: top level is not a pairlist")
    return {str(tag): value for tag, value in obj.value}


def _lazyload_index(rdx: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Read a lazy-load index: object name -> (offset, length) in the .rdb, and the compression."""
    index = _read_rds(rdx)
    if not isinstance(index, RObject) or index.sexptype != VECSXP or index.names is None:
        raise ValueError(f"{rdx}: corrupt lazy-load index (not a named list)")
    fields = dict(zip(index.names, index.value))
    variables = fields.get("variables")
    if not isinstance(variables, RObject) or variables.sexptype != VECSXP:
        raise ValueError(f"{rdx}: corrupt lazy-load index (no 'variables' list)")
    table: dict[str, tuple[int, int]] = {}
    for name, entry in zip(variables.names or [], variables.value):
        if name is None or not isinstance(entry, RObject) or entry.sexptype != INTSXP or len(entry.value) != 2:
            raise ValueError(f"{rdx}: corrupt lazy-load index entry {name!r}")
        table[name] = (int(entry.value[0]), int(entry.value[1]))
    compressed = fields.get("compressed")
    kind = 1
    if isinstance(compressed, RObject) and compressed.sexptype in (LGLSXP, INTSXP, REALSXP):
        kind = int(compressed.value[0]) if len(compressed.value) else 1
    return table, kind


def _decompress_lazyload_chunk(chunk: bytes, kind: int, source: str) -> bytes:
    """Undo ``R_compress1/2/3``: 4-byte big-endian length (+ type byte) + payload."""
    if len(chunk) < 4:
        raise ValueError(f"{source}: truncated lazy-load record ({len(chunk)} bytes)")
    expected = struct.unpack(">I", chunk[:4])[0]
    method, payload = "1", chunk[4:]
    if kind in (2, 3):
        if len(chunk) < 5:
            raise ValueError(f"{source}: truncated lazy-load record ({len(chunk)} bytes)")
        method, payload = chr(chunk[4]), chunk[5:]
    try:
        if method == "1":
            out = zlib.decompress(payload)
        elif method == "2":
            out = bz2.decompress(payload)
        elif method == "Z":
            # R_compress3 writes a raw LZMA2 stream (no .xz container), preset 6.
            out = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
        elif method == "0":
            out = bytes(payload)
        else:
            raise ValueError(f"{source}: unknown lazy-load compression type {method!r}")
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
        raise ValueError(f"{source}: corrupt or truncated lazy-load record: {exc}") from exc
    if len(out) != expected:
        raise ValueError(
            f"{source}: corrupt lazy-load record: {len(out)} bytes after decompression, header says {expected}"
        )
    return out


def _lazyload_fetch(db: str | os.PathLike[str], name: str) -> Any:
    """Read one object from an R lazy-load database.

    Parameters
    ----------
    db : path-like
        The database path without extension (``.../data/Rdata`` for
        ``Rdata.rdb`` + ``Rdata.rdx``).
    name : str
        The object's name.

    Returns
    -------
    Any
        The deserialized object.

    Raises
    ------
    KeyError
        If the database holds no object of that name.
    ValueError
        If the database is truncated, corrupt or uses unsupported features.
    """
    db = Path(db)
    rdx, rdb = Path(f"{db}.rdx"), Path(f"{db}.rdb")  # not with_suffix: "data.table" has a dot
    table, kind = _lazyload_index(rdx)
    if name not in table:
        raise KeyError(f"{rdx}: no object {name!r} (has: {', '.join(sorted(table))})")
    offset, length = table[name]
    with open(rdb, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read(length)
    if len(chunk) != length or offset < 0:
        raise ValueError(f"{rdb}: truncated: object {name!r} needs bytes {offset}..{offset + length}")
    source = f"{rdb} (object {name!r})"
    return _unserialize(_decompress_lazyload_chunk(chunk, kind, source), source)


# ---------------------------------------------------------------------------
# R packages on disk
# ---------------------------------------------------------------------------
_R_LIBRARY_DIRS = (
    "/usr/lib/R/site-library",
    "/usr/local/lib/R/site-library",
    "/usr/lib/R/library",
    "/usr/local/lib/R/library",
    "/usr/lib64/R/library",
    "/opt/homebrew/lib/R/library",
)


def _r_library_dirs() -> Iterator[Path]:
    for var in ("R_LIBS", "R_LIBS_USER", "R_LIBS_SITE"):
        for entry in os.environ.get(var, "").split(os.pathsep):
            if entry:
                yield Path(entry).expanduser()
    for entry in _R_LIBRARY_DIRS:
        yield Path(entry)


def _find_r_package(package: str, root: str | os.PathLike[str] | None, debian: str) -> Path:
    """Locate an installed R package directory that has a ``data/`` folder."""
    if root is not None:
        root = Path(root)
        candidates = [root, root / package]
    else:
        candidates = [lib / package for lib in _r_library_dirs()]
    for cand in candidates:
        if (cand / "data").is_dir():
            return cand
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"R package {package!r} with its data not found (looked in: {where}). "
        f"Install it with `apt-get install {debian}`, or pass root= pointing at the package directory."
    )


def _read_r_package_object(pkg_dir: Path, name: str) -> Any:
    """Read data object ``name`` of an installed R package (lazy-load DB, .rda or .rds)."""
    data_dir = pkg_dir / "data"
    if (data_dir / "Rdata.rdx").is_file() and (data_dir / "Rdata.rdb").is_file():
        return _lazyload_fetch(data_dir / "Rdata", name)
    for suffix in (".rda", ".RData", ".rdata"):
        path = data_dir / f"{name}{suffix}"
        if path.is_file():
            objects = _read_rdata(path)
            if name not in objects:
                raise ValueError(f"{path}: holds no object {name!r} (has: {', '.join(sorted(objects))})")
            return objects[name]
    path = data_dir / f"{name}.rds"
    if path.is_file():
        return _read_rds(path)
    raise FileNotFoundError(f"{data_dir}: no data object {name!r} (no Rdata.rdx/.rdb, {name}.rda or {name}.rds)")


def _as_strings(obj: Any, what: str) -> list[str | None]:
    if not isinstance(obj, RObject) or obj.sexptype != STRSXP:
        kind = obj.type_name if isinstance(obj, RObject) else type(obj).__name__
        raise ValueError(f"{what}: expected an R character vector, got {kind}")
    return obj.value


# ---------------------------------------------------------------------------
# Public corpora
# ---------------------------------------------------------------------------
#: Short book names accepted by :func:`austen_text`, mapped to janeaustenr's object names.
AUSTEN_BOOKS: dict[str, str] = {
    "sense": "sensesensibility",
    "pride": "prideprejudice",
    "mansfield": "mansfieldpark",
    "emma": "emma",
    "northanger": "northangerabbey",
    "persuasion": "persuasion",
}


def austen_text(book: str = "emma", root: str | os.PathLike[str] | None = None) -> str:
    """Return the full text of a Jane Austen novel from Debian's ``r-cran-janeaustenr``.

    Parameters
    ----------
    book : str, default "emma"
        One of ``sense``, ``pride``, ``mansfield``, ``emma``, ``northanger``,
        ``persuasion``, or janeaustenr's object name (``sensesensibility``,
        ``prideprejudice``, ``mansfieldpark``, ``northangerabbey``). Case-insensitive.
    root : path-like, optional
        The janeaustenr package directory or the R library holding it. By
        default ``$R_LIBS*`` and the usual system libraries are searched.

    Returns
    -------
    str
        The novel's lines (Project Gutenberg text, front matter included) joined
        with ``"\\n"``.

    Raises
    ------
    ValueError
        If ``book`` is not a known novel, or the package data is corrupt.
    FileNotFoundError
        If janeaustenr is not installed (``apt-get install r-cran-janeaustenr``).
    """
    key = book.strip().lower()
    valid = set(AUSTEN_BOOKS) | set(AUSTEN_BOOKS.values())
    if key not in valid:
        names = ", ".join(f"{short} ({full})" for short, full in AUSTEN_BOOKS.items())
        raise ValueError(f"unknown Jane Austen book {book!r}; valid names: {names}")
    obj_name = AUSTEN_BOOKS.get(key, key)
    pkg = _find_r_package("janeaustenr", root, "r-cran-janeaustenr")
    lines = _as_strings(_read_r_package_object(pkg, obj_name), f"{pkg} object {obj_name!r}")
    logger.debug("read %s from %s: %d lines", obj_name, pkg, len(lines))
    return "\n".join("" if line is None else line for line in lines)


def mobydick_text(root: str | os.PathLike[str] | None = None) -> str:
    """Return the text of *Moby Dick* from Debian's ``r-cran-tokenizers``.

    Parameters
    ----------
    root : path-like, optional
        The tokenizers R package directory or the R library holding it.

    Returns
    -------
    str
        The Project Gutenberg text, with the byte-order mark removed and
        ``"\\r\\n"`` line ends turned into ``"\\n"``.

    Raises
    ------
    FileNotFoundError
        If the package is not installed (``apt-get install r-cran-tokenizers``).
    ValueError
        If the package data is corrupt.
    """
    pkg = _find_r_package("tokenizers", root, "r-cran-tokenizers")
    parts = _as_strings(_read_r_package_object(pkg, "mobydick"), f"{pkg} object 'mobydick'")
    logger.debug("read mobydick from %s", pkg)
    text = "\n".join(p for p in parts if p is not None)
    return text.lstrip("\ufeff").replace("\r\n", "\n")


_HF_SOURCES = ("wikitext2", "c4", "ptb")


@contextlib.contextmanager
def _datasets_offline(datasets_module: Any) -> Iterator[None]:
    """Force the ``datasets``/``huggingface_hub`` offline switches for the duration of a call."""
    targets: list[tuple[Any, str]] = []
    cfg = getattr(datasets_module, "config", None)
    if cfg is not None:
        targets += [(cfg, "HF_DATASETS_OFFLINE"), (cfg, "HF_HUB_OFFLINE")]
    try:
        import huggingface_hub.constants as hub_constants

        targets.append((hub_constants, "HF_HUB_OFFLINE"))
    except ImportError:
        pass
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets if hasattr(obj, name)]
    try:
        for obj, name, _ in saved:
            setattr(obj, name, True)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _hf_text(name: str) -> str:
    """WikiText-2 / C4 / PTB evaluation text, as GPTQ builds it, from the local HF cache."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"load_text({name!r}) needs the optional `datasets` package (pip install datasets) "
            "and the dataset in the local Hugging Face cache; offline alternatives: "
            "'austen:<book>', 'mobydick' or a local text file"
        ) from exc
    if name == "wikitext2":
        spec = ("wikitext", "wikitext-2-raw-v1")
        kwargs: dict[str, Any] = {"split": "test"}
    elif name == "ptb":
        spec = ("ptb_text_only", "penn_treebank")
        kwargs = {"split": "validation"}
    else:
        spec = ("allenai/c4",)
        kwargs = {
            "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
            "split": "validation",
        }
    try:
        with _datasets_offline(datasets):
            ds = datasets.load_dataset(*spec, **kwargs)
    except Exception as exc:  # datasets raises many types for "not cached"
        raise FileNotFoundError(
            f"dataset {name!r} ({'/'.join(spec)}) is not in the local Hugging Face cache and sqllm "
            f"does not download; fetch it once with network access "
            f"(datasets.load_dataset{(*spec,)!r}), or use 'austen:<book>', 'mobydick' or a local "
            f"text file. ({type(exc).__name__}: {exc})"
        ) from exc
    if name == "wikitext2":
        return "\n\n".join(ds["text"])
    if name == "ptb":
        return "\n\n".join(ds["sentence"])
    return " ".join(ds[:1100]["text"])


def load_text(source: str) -> str:
    """Return evaluation or calibration text by source name.

    Parameters
    ----------
    source : str
        * ``"austen:<book>"`` — a Jane Austen novel (see :func:`austen_text`);
          plain ``"austen"`` means Emma.
        * ``"mobydick"`` — see :func:`mobydick_text`.
        * ``"wikitext2"`` — WikiText-2 (raw) test split joined with ``"\\n\\n"``;
          ``"ptb"`` — PTB validation sentences joined with ``"\n\n"``; ``"c4"`` — the
          first 1100 documents of C4's first validation shard joined with ``" "``
          (GPTQ then keeps the first ``256 * seqlen`` tokens: pass ``max_tokens``
          to :func:`sqllm.evaluate.perplexity`). These need the optional
          ``datasets`` package and the data already in the local Hugging Face
          cache; nothing is downloaded.
        * a path to a UTF-8 text file.

    Returns
    -------
    str
        The text.

    Raises
    ------
    ValueError
        If ``source`` is none of the above.
    FileNotFoundError
        If the source's data is not installed or cached.
    ImportError
        If a Hugging Face dataset is requested and ``datasets`` is not installed.
    """
    key = source.strip()
    lower = key.lower()
    if lower == "austen" or lower.startswith("austen:"):
        return austen_text(key.split(":", 1)[1] if ":" in key else "emma")
    if lower in ("mobydick", "moby_dick", "moby-dick"):
        return mobydick_text()
    if lower in _HF_SOURCES:
        return _hf_text(lower)
    path = Path(key).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(
        f"unknown text source {source!r}: expected 'austen:<book>' "
        f"(books: {', '.join(AUSTEN_BOOKS)}), 'mobydick', 'wikitext2', 'c4', 'ptb' "
        "or the path of an existing UTF-8 text file"
    )


# ---------------------------------------------------------------------------
# Tokenization and calibration windows
# ---------------------------------------------------------------------------
def tokenize_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> torch.Tensor:
    """Tokenize a (long) text in one piece.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Any Hugging Face tokenizer (callable returning ``input_ids``).
    text : str
        The text; it may be far longer than the model's context.
    add_special_tokens : bool, default True
        Passed to the tokenizer: as in GPTQ's evaluation, the text is encoded as
        one sequence, so a BOS token (for tokenizers that add one) appears only at
        its start.

    Returns
    -------
    torch.LongTensor
        Token ids, shape ``[1, T]``.
    """
    # verbose=False: no "sequence length is longer than the maximum" message; the
    # caller cuts the ids into model-sized windows.
    enc = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)
    ids = enc["input_ids"]
    if isinstance(ids, torch.Tensor):
        return ids.reshape(1, -1).to(torch.long)
    return torch.tensor(list(ids), dtype=torch.long).reshape(1, -1)


def calibration_batches(
    tokenizer: Any,
    text: str | torch.Tensor,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
) -> torch.Tensor:
    """Draw random token windows from a text, GPTQ style.

    The text is tokenized once; each sample is a window ``ids[i : i + seqlen]``
    with ``i`` drawn uniformly from ``[0, T - seqlen]`` by a private
    :class:`random.Random` seeded with ``seed`` (no global RNG is touched).
    Windows may overlap.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Used to tokenize ``text`` (see :func:`tokenize_text`); ignored when
        ``text`` already is a tensor of token ids.
    text : str or torch.LongTensor
        The calibration text, or its token ids (``[T]`` or ``[1, T]``).
    nsamples : int
        Number of windows (>= 1).
    seqlen : int
        Tokens per window (>= 1).
    seed : int, default 0
        Seed; the same seed, text and tokenizer give the same batches.

    Returns
    -------
    torch.LongTensor
        Shape ``[nsamples, seqlen]``.

    Raises
    ------
    ValueError
        If ``nsamples`` or ``seqlen`` is not positive, or the text has fewer than
        ``seqlen`` tokens.
    """
    if nsamples < 1:
        raise ValueError(f"nsamples must be >= 1, got {nsamples}")
    if seqlen < 1:
        raise ValueError(f"seqlen must be >= 1, got {seqlen}")
    if isinstance(text, torch.Tensor):
        if text.dim() == 2 and text.shape[0] != 1:
            raise ValueError(f"token ids must have shape [T] or [1, T], got {list(text.shape)}")
        ids = text.reshape(-1).to(torch.long)
    else:
        ids = tokenize_text(tokenizer, text).reshape(-1)
    n_tokens = ids.numel()
    if n_tokens < seqlen:
        raise ValueError(
            f"calibration text too short: it has {n_tokens} tokens, but a window needs seqlen={seqlen}"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, n_tokens - seqlen) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]).contiguous()

