"""The quantization config: one object from ``sqllm.quantize`` to ``config.json`` and back.

:class:`QuantizationConfig` records how a model was quantized (the method and
its options, the calibration data, the modules left alone) and what a loader
needs to rebuild it (one :class:`LayerFormat` per quantized layer: the format
name and version, shapes and the format's parameters).  It is stored in
``config.json`` as ``quantization_config`` (``quant_method: "sqllm"``); the
layout is documented in docs/formats.md.

Format versions:

* **2** (this release): method options under ``"options"``, per-layer entries
  ``{"format", "format_version", "in_features", "out_features", "bias",
  "params"}``, ``sqllm_version``, ``calibration.stats_dir``.
* **1** (sqllm 0.1.0): method options flat at the top level, flat layer entries.
  Read and upgraded in memory; the tensors are the same in both versions.

Every problem with a config (a missing key, a wrong type, an unknown method or
format, a newer version) raises :class:`QuantizationConfigError`, a
``ValueError`` whose message names the offending key.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

__all__ = [
    "FORMAT_VERSION",
    "MIN_FORMAT_VERSION",
    "QuantizationConfig",
    "QuantizationConfigError",
    "CalibrationConfig",
    "LayerFormat",
    "OptionSpec",
    "method_options",
]

#: Version of the saved layout that this sqllm writes (docs/formats.md).
FORMAT_VERSION = 2
#: Oldest saved layout this sqllm reads.
MIN_FORMAT_VERSION = 1

QUANT_METHOD = "sqllm"


class QuantizationConfigError(ValueError):
    """A quantization config that cannot be read (the message says which key and why)."""


# -- small validation helpers ---------------------------------------------------

_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a number", str: "a string",
               dict: "an object", list: "a list"}


def _type_ok(value: Any, typ: type) -> bool:
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ)


def _get(d: Mapping[str, Any], key: str, typ: type, where: str, *, required: bool = True,
         default: Any = None, nullable: bool = False) -> Any:
    if key not in d:
        if required:
            raise QuantizationConfigError(f"{where} lacks the key {key!r}")
        return copy.deepcopy(default)
    value = d[key]
    if value is None and nullable:
        return None
    if not _type_ok(value, typ):
        raise QuantizationConfigError(
            f"{where}.{key} must be {_TYPE_NAMES.get(typ, typ.__name__)}"
            f"{' or null' if nullable else ''}, got {type(value).__name__} {value!r}")
    return float(value) if typ is float else value


def _mapping(d: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise QuantizationConfigError(f"{where} must be an object, got {type(d).__name__}")
    return d


# -- method options (shared with the CLI) -----------------------------------------

@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option of a method: a field of its dataclass, as the CLI and the config see it.

    ``type`` is the scalar type (int, float, str, bool); ``multiple`` marks a
    list/tuple of that type; ``nullable`` an ``Optional``; ``choices`` comes
    from a ``Literal`` annotation, ``metadata["choices"]`` or a ``{"a", "b"}``
    type line in the class docstring; ``help`` from ``metadata["help"]`` or the
    numpy-style ``Attributes`` section of the docstrings along the MRO.
    """

    name: str
    type: type
    default: Any
    help: str = ""
    choices: Optional[Tuple[Any, ...]] = None
    nullable: bool = False
    multiple: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, where: str, choices: bool = False) -> None:
        """Raise QuantizationConfigError unless ``value`` fits this option's type (and,
        with ``choices=True``, its choices: a stored config is checked for types only,
        since values are the method's to judge and may have had aliases)."""
        if value is None and (self.nullable or self.default is None):
            return
        items = value if self.multiple else [value]
        if self.multiple and not isinstance(value, (list, tuple)):
            raise QuantizationConfigError(f"{where}.{self.name} must be a list, got {value!r}")
        for v in items:
            if not _type_ok(v, self.type):
                raise QuantizationConfigError(
                    f"{where}.{self.name} must be {_TYPE_NAMES.get(self.type, self.type.__name__)}, "
                    f"got {type(v).__name__} {v!r}")
            if choices and self.choices is not None and v not in self.choices:
                raise QuantizationConfigError(
                    f"{where}.{self.name} must be one of {list(self.choices)}, got {v!r}")


_SCALARS = (bool, int, float, str)


def _unwrap(hint: Any, default: Any = None) -> Tuple[type, bool, bool, Optional[Tuple[Any, ...]]]:
    """(scalar type, nullable, multiple, literal choices) of a field annotation."""
    nullable = multiple = False
    if hint in (list, tuple):  # bare: the element type of the default
        first = default[0] if isinstance(default, (list, tuple)) and default else ""
        return type(first) if type(first) in _SCALARS else str, False, True, None
    choices = None
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else str
        origin = typing.get_origin(hint)
    if origin in (list, tuple, List, Tuple, Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        multiple = True
        hint = args[0] if args else str
        origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = tuple(typing.get_args(hint))
        hint = type(choices[0])
    if hint not in _SCALARS:
        hint = str
    return hint, nullable, multiple, choices


_DOC_ENTRY = re.compile(r"^(\w+(?:\s*,\s*\w+)*)\s*:\s*(.*)$")  # "a, b : type"


def _doc_attributes(cls: type) -> Dict[str, Tuple[str, str]]:
    """name -> (type line, description) from numpy-style Attributes/Parameters sections."""
    out: Dict[str, Tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__dict__.get("__doc__") or ""
        lines = [ln.rstrip() for ln in doc.expandtabs().splitlines()]
        in_section = False
        current: Optional[List[str]] = None
        base_indent = 0
        for i, ln in enumerate(lines):
            stripped = ln.strip()
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if stripped in ("Attributes", "Parameters", "Options") and set(nxt) == {"-"}:
                in_section, current = True, None
                base_indent = len(ln) - len(ln.lstrip())
                continue
            if not in_section or set(stripped) == {"-"}:
                continue
            indent = len(ln) - len(ln.lstrip())
            if stripped and indent <= base_indent:
                m = _DOC_ENTRY.match(stripped)
                if m is None:  # the next section starts
                    in_section, current = False, None
                    continue
                current = [n.strip() for n in m.group(1).split(",")]
                for n in current:
                    out[n] = (m.group(2).strip(), "")
            elif stripped and current is not None:
                for n in current:
                    t, d = out[n]
                    out[n] = (t, (d + " " + stripped).strip())
    return out


def method_options(cls: Type[Any]) -> List[OptionSpec]:
    """The options of a method class (its dataclass fields), in declaration order."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: treat its option as a string
        hints = {}
    docs = _doc_attributes(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        typ, nullable, multiple, choices = _unwrap(hints.get(f.name, str), default)
        type_line, help_text = docs.get(f.name, ("", ""))
        if "choices" in f.metadata:
            choices = tuple(f.metadata["choices"])
        elif choices is None and type_line.startswith("{"):
            found = re.findall(r"[\"']([^\"']+)[\"']", type_line)
            choices = tuple(found) or None
        help_text = f.metadata.get("help", help_text)
        specs.append(OptionSpec(f.name, typ, default, help_text, choices,
                                nullable or default is None, multiple))
    return specs


def _method_class(name: str, where: str) -> Type[Any]:
    from .methods import METHODS

    if name not in METHODS:
        raise QuantizationConfigError(
            f"{where}.method: unknown method {name!r}; this sqllm knows {sorted(METHODS)}")
    return METHODS[name]


def check_options(method: str, options: Mapping[str, Any], where: str = "quantization_config") -> None:
    """Raise QuantizationConfigError for an option the method lacks or of the wrong type."""
    specs = {s.name: s for s in method_options(_method_class(method, where))}
    unknown = sorted(set(options) - set(specs))
    if unknown:
        raise QuantizationConfigError(
            f"{where}.options: method {method!r} has no option(s) {unknown}; "
            f"its options are {sorted(specs)}")
    for k, v in options.items():
        specs[k].check(v, f"{where}.options")


# -- the parts -------------------------------------------------------------------

def _block_inputs(value: Optional[str], where: str) -> Optional[str]:
    if value not in (None, "quantized", "full-precision"):
        raise QuantizationConfigError(f"{where}.block_inputs must be 'quantized', "
                                      f"'full-precision' or null, got {value!r}")
    return value


@dataclasses.dataclass
class CalibrationConfig:
    """Where the statistics came from.

    Attributes
    ----------
    source : str or None
        A text source (``"austen:emma"``, a path, ``"wikitext2"``), ``"tensor"``
        for token ids passed in, or None (no calibration, e.g. RTN).
    nsamples, seqlen : int or None
        Number and length (tokens) of the calibration windows.
    seed : int
        Seed of the window draw.
    stats_dir : str or None
        Folder of saved statistics that were reused (``--stats-dir``).
    precomputed_sensitivity : bool
        True when the sensitivities were passed in (``sensitivity=``).
    block_inputs : str or None
        Streamed methods with per-block statistics: which inputs each block's
        statistics were taken on, ``"quantized"`` (the quantized previous
        blocks' outputs, "true sequential") or ``"full-precision"``; None when
        no per-block statistics were collected.
    sequential_groups : bool
        Streamed: the Linears of a block were quantized group by group (q/k/v,
        o, gate/up, down), each group's statistics taken after the earlier
        groups were quantized.
    """

    source: Optional[str] = None
    nsamples: Optional[int] = None
    seqlen: Optional[int] = None
    seed: int = 0
    stats_dir: Optional[str] = None
    precomputed_sensitivity: bool = False
    block_inputs: Optional[str] = None
    sequential_groups: bool = False

    @classmethod
    def describe(cls, calibration: Any, nsamples: int, seqlen: int, seed: int,
                 stats_dir: Optional[str] = None,
                 precomputed_sensitivity: bool = False,
                 block_inputs: Optional[str] = None,
                 sequential_groups: bool = False) -> "CalibrationConfig":
        """The record of ``sqllm.quantize``'s calibration arguments (a source string,
        a [nsamples, seqlen] tensor of token ids, or None)."""
        if isinstance(calibration, str):
            source, n, s = calibration, int(nsamples), int(seqlen)
        elif calibration is not None and hasattr(calibration, "shape"):
            source, n, s = "tensor", int(calibration.shape[0]), int(calibration.shape[1])
        else:
            source, n, s = None, None, None
        return cls(source, n, s, int(seed), None if stats_dir is None else str(stats_dir),
                   bool(precomputed_sensitivity), block_inputs, bool(sequential_groups))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "quantization_config.calibration") -> "CalibrationConfig":
        d = _mapping(d, where)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QuantizationConfigError(f"{where} has unknown key(s) {unknown}")
        return cls(
            source=_get(d, "source", str, where, required=False, nullable=True),
            nsamples=_get(d, "nsamples", int, where, required=False, nullable=True),
            seqlen=_get(d, "seqlen", int, where, required=False, nullable=True),
            seed=_get(d, "seed", int, where, required=False, default=0),
            stats_dir=_get(d, "stats_dir", str, where, required=False, nullable=True),
            precomputed_sensitivity=_get(d, "precomputed_sensitivity", bool, where,
                                         required=False, default=False),
            block_inputs=_block_inputs(_get(d, "block_inputs", str, where, required=False,
                                            nullable=True), where),
            sequential_groups=_get(d, "sequential_groups", bool, where, required=False,
                                   default=False),
        )


_LAYER_COMMON = ("format", "in_features", "out_features", "bias")


@dataclasses.dataclass
class LayerFormat:
    """How one quantized layer is stored: enough to rebuild it before reading its tensors.

    Attributes
    ----------
    format : str
        A registered layer format (``sqllm.FORMATS``), e.g. ``"lut"``.
    in_features, out_features : int
    bias : bool
    params : dict
        The format's parameters (``lut``: ``bits``, ``group_axis``, ``nnz``).
    format_version : int
        Version of that format's tensor layout (the class's ``format_version``).
    """

    format: str
    in_features: int
    out_features: int
    bias: bool = False
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = 1

    @classmethod
    def from_layer(cls, layer: Any) -> "LayerFormat":
        """The entry of a built layer (any :class:`sqllm.QuantLinearBase`)."""
        return cls.from_layer_config(layer.layer_config(),
                                     int(getattr(type(layer), "format_version", 1)))

    @classmethod
    def from_layer_config(cls, flat: Mapping[str, Any],
                          format_version: Optional[int] = None) -> "LayerFormat":
        """From a layer's flat ``layer_config()`` dict (format version 1's layer entry);
        the format version defaults to that of the registered format class."""
        params = {k: v for k, v in flat.items() if k not in _LAYER_COMMON}
        entry = cls(str(flat["format"]), int(flat["in_features"]), int(flat["out_features"]),
                    bool(flat.get("bias", False)), params, 1)
        if format_version is None:
            format_version = int(getattr(entry.format_class(), "format_version", 1))
        entry.format_version = int(format_version)
        return entry

    def layer_config(self) -> Dict[str, Any]:
        """The flat dict a format's ``from_config`` takes."""
        return {"format": self.format, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias, **self.params}

    def format_class(self) -> Type[Any]:
        from .nn import FORMATS

        if self.format not in FORMATS:
            raise QuantizationConfigError(
                f"unknown quantized layer format {self.format!r}; this sqllm knows {sorted(FORMATS)}")
        return FORMATS[self.format]

    def build(self) -> Any:
        """An empty layer of this format (buffers of the right shapes, ready for a state dict)."""
        return self.format_class().from_config(self.layer_config())

    def to_dict(self) -> Dict[str, Any]:
        return {"format": self.format, "format_version": self.format_version,
                "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, "params": copy.deepcopy(self.params)}

    @classmethod
    def from_dict(cls, d: Any, where: str, version: int = FORMAT_VERSION) -> "LayerFormat":
        """Parse and validate a layer entry of a config of format ``version`` (1 or 2)."""
        d = _mapping(d, where)
        fmt = _get(d, "format", str, where)
        in_f = _get(d, "in_features", int, where)
        out_f = _get(d, "out_features", int, where)
        if in_f <= 0 or out_f <= 0:
            raise QuantizationConfigError(f"{where}: in_features and out_features must be > 0, "
                                          f"got {in_f}, {out_f}")
        bias = _get(d, "bias", bool, where, required=False, default=False)
        if version == 1:
            params = {k: v for k, v in d.items() if k not in _LAYER_COMMON}
            fversion = 1
        else:
            params = dict(_mapping(_get(d, "params", dict, where), where + ".params"))
            fversion = _get(d, "format_version", int, where)
            unknown = sorted(set(d) - set(_LAYER_COMMON) - {"params", "format_version"})
            if unknown:
                raise QuantizationConfigError(f"{where} has unknown key(s) {unknown}")
        entry = cls(fmt, in_f, out_f, bias, params, fversion)
        try:
            klass = entry.format_class()
        except QuantizationConfigError as e:
            raise QuantizationConfigError(f"{where}: {e}") from None
        newest = int(getattr(klass, "format_version", 1))
        if fversion < 1 or fversion > newest:
            raise QuantizationConfigError(
                f"{where}: format {fmt!r} version {fversion} is not supported (this sqllm reads "
                f"versions 1..{newest} of it; a newer sqllm wrote this file?)")
        declared: Mapping[str, type] = getattr(klass, "layer_params", {}) or {}
        for name, typ in declared.items():
            _get(params, name, typ, where + ".params")
        if declared:
            unknown = sorted(set(params) - set(declared))
            if unknown:
                raise QuantizationConfigError(f"{where}.params: format {fmt!r} has no parameter(s) "
                                              f"{unknown}; its parameters are {sorted(declared)}")
        return entry


# -- the config ------------------------------------------------------------------

def _sqllm_version() -> str:
    from ._version import __version__

    return __version__


_V2_KEYS = ("quant_method", "format_version", "sqllm_version", "method", "options",
            "calibration", "modules_to_not_convert", "layers")


@dataclasses.dataclass
class QuantizationConfig:
    """How a model was quantized and how its layers are stored (``quantization_config``).

    Attributes
    ----------
    method : str
        The registered method (``sqllm.METHODS``) that produced the layers.
    options : dict
        The method's options (fields of its dataclass; ``sqllm.method_options``).
    calibration : CalibrationConfig
    modules_to_not_convert : list of str
        Module names (or name suffixes) left unquantized, e.g. ``["lm_head"]``.
    layers : dict name -> LayerFormat
        Every quantized module with its format, version, shapes and parameters.
    sqllm_version : str
        The sqllm release that wrote the config.
    format_version : int
        Version of this layout (:data:`FORMAT_VERSION` when written).
    extra : dict
        Top-level keys this sqllm does not know, kept as they were (e.g. the
        source of a converted upstream checkpoint).
    """

    method: str
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    modules_to_not_convert: List[str] = dataclasses.field(default_factory=list)
    layers: Dict[str, LayerFormat] = dataclasses.field(default_factory=dict)
    sqllm_version: str = dataclasses.field(default_factory=_sqllm_version)
    format_version: int = FORMAT_VERSION
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    quant_method = QUANT_METHOD

    # -- building ---------------------------------------------------------------
    @classmethod
    def for_method(cls, method: Any, calibration: Optional[CalibrationConfig] = None,
                   modules_to_not_convert: Sequence[str] = (),
                   layers: Optional[Mapping[str, Any]] = None) -> "QuantizationConfig":
        """The config of a run of a method instance (a :class:`sqllm.QuantMethod`).

        ``layers`` maps names to built layers, their flat ``layer_config()``
        dicts or :class:`LayerFormat` entries.
        """
        options = {f.name: copy.deepcopy(getattr(method, f.name))
                   for f in dataclasses.fields(method) if f.init and not f.name.startswith("_")}
        qc = cls(method=method.name, options=options,
                 calibration=calibration or CalibrationConfig(),
                 modules_to_not_convert=sorted(set(modules_to_not_convert)))
        for name, layer in (layers or {}).items():
            qc.set_layer(name, layer)
        return qc

    def set_layer(self, name: str, layer: Any) -> None:
        """Record a layer: a built layer, its flat ``layer_config()`` or a LayerFormat."""
        if isinstance(layer, LayerFormat):
            self.layers[name] = layer
        elif isinstance(layer, Mapping):
            self.layers[name] = LayerFormat.from_layer_config(layer)
        else:
            self.layers[name] = LayerFormat.from_layer(layer)

    def method_instance(self) -> Any:
        """The method object with these options (raises for an unknown method)."""
        return _method_class(self.method, "quantization_config")(**self.options)

    # -- (de)serialisation ------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """The JSON-ready dict stored in ``config.json`` (always the current format version)."""
        d: Dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "sqllm_version": self.sqllm_version,
            "method": self.method,
            "options": copy.deepcopy(self.options),
            "calibration": self.calibration.to_dict(),
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "layers": {n: lf.to_dict() for n, lf in self.layers.items()},
        }
        for k, v in self.extra.items():
            d.setdefault(k, copy.deepcopy(v))
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "quantization_config") -> "QuantizationConfig":
        """Parse and validate a stored config (format version 1 or 2).

        A version-1 config is upgraded: the result describes the same layers and
        tensors, and ``to_dict()`` writes it as version 2.
        """
        d = _mapping(d, where)
        qm = d.get("quant_method")
        if qm != QUANT_METHOD:
            raise QuantizationConfigError(
                f"{where} is not sqllm's (quant_method is {qm!r}, expected {QUANT_METHOD!r})")
        version = _get(d, "format_version", int, where)
        if version > FORMAT_VERSION:
            raise QuantizationConfigError(
                f"{where}: format_version {version} was written by a newer sqllm; this sqllm "
                f"({_sqllm_version()}) reads format_version {MIN_FORMAT_VERSION}..{FORMAT_VERSION}: "
                "upgrade sqllm to load it")
        if version < MIN_FORMAT_VERSION:
            raise QuantizationConfigError(f"{where}: unsupported format_version {version}")
        if version == 1:
            return cls._from_v1(d, where)
        method = _get(d, "method", str, where)
        options = dict(_mapping(_get(d, "options", dict, where), where + ".options"))
        check_options(method, options, where)
        calibration = CalibrationConfig.from_dict(
            _get(d, "calibration", dict, where, required=False, default={}), where + ".calibration")
        skip = _get(d, "modules_to_not_convert", list, where, required=False, default=[])
        if not all(isinstance(s, str) for s in skip):
            raise QuantizationConfigError(f"{where}.modules_to_not_convert must be a list of strings")
        layers = cls._layers(d, where, 2)
        version_str = _get(d, "sqllm_version", str, where)
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in _V2_KEYS}
        return cls(method, options, calibration, list(skip), layers, version_str, FORMAT_VERSION,
                   extra)

    @staticmethod
    def _layers(d: Mapping[str, Any], where: str, version: int) -> Dict[str, LayerFormat]:
        table = _mapping(_get(d, "layers", dict, where), where + ".layers")
        return {name: LayerFormat.from_dict(entry, f"{where}.layers[{name!r}]", version)
                for name, entry in table.items()}

    @classmethod
    def _from_v1(cls, d: Mapping[str, Any], where: str) -> "QuantizationConfig":
        # Version 1 (sqllm 0.1.0): {"quant_method", "format_version", "method",
        # <the method's options flat>, "modules_to_not_convert", "layers",
        # "calibration"}; converted upstream checkpoints carry "source" instead
        # of "calibration".
        reserved = {"quant_method", "format_version", "method", "modules_to_not_convert",
                    "layers", "calibration", "source"}
        method = _get(d, "method", str, where)
        options = {k: copy.deepcopy(v) for k, v in d.items() if k not in reserved}
        check_options(method, options, where)
        cal = dict(_mapping(_get(d, "calibration", dict, where, required=False, default={}),
                            where + ".calibration"))
        calibration = CalibrationConfig.from_dict(cal, where + ".calibration")
        skip = _get(d, "modules_to_not_convert", list, where, required=False, default=[])
        extra = {"source": d["source"]} if "source" in d else {}
        # Only sqllm 0.1.0 wrote version 1.
        return cls(method, options, calibration, list(skip), cls._layers(d, where, 1),
                   "0.1.0", FORMAT_VERSION, extra)

    @classmethod
    def from_model(cls, model: Any) -> "QuantizationConfig":
        """The config of a quantized model (``model.config.quantization_config`` as a
        dict, a QuantizationConfig, or transformers' wrapper of one)."""
        q = getattr(getattr(model, "config", None), "quantization_config", None)
        if isinstance(q, QuantizationConfig):
            return q
        inner = getattr(q, "sqllm_config", None)
        if isinstance(inner, QuantizationConfig):
            return inner
        if q is not None and not isinstance(q, Mapping) and hasattr(q, "to_dict"):
            q = q.to_dict()
        if not isinstance(q, Mapping) or q.get("quant_method") != QUANT_METHOD:
            raise QuantizationConfigError(
                "model has no sqllm quantization_config; quantize it with sqllm.quantize() first")
        return cls.from_dict(q)

    def describe(self) -> str:
        """One line for logs and ``sqllm info``."""
        fmts = sorted({lf.format for lf in self.layers.values()})
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return (f"method {self.method} ({opts}); {len(self.layers)} quantized layers, formats "
                f"{fmts}; format_version {self.format_version}, written by sqllm {self.sqllm_version}")
