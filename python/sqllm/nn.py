"""The QuantLinear family: drop-in replacements for ``torch.nn.Linear``.

Every quantized layer derives from :class:`QuantLinearBase`, which owns what
all formats share (shapes, bias, input checks, dtype handling, the layer entry
of ``quantization_config``, size accounting, which kernel runs).  A format adds
its buffers, ``dequantize()`` and ``_matmul()``.  Formats register themselves
in :data:`FORMATS` by name so that a saved model can be rebuilt from its config.

:class:`QuantLinear` is SqueezeLLM's lookup-table format (``"lut"``): packed
b-bit codes plus one 2^b-entry table per output row (or per input column),
with an optional Dense-and-Sparse CSR part.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type, Union

import numpy as np
import torch
from torch import nn

from . import _C
from . import compiled as _compiled

__all__ = ["QuantLinearBase", "QuantLinear", "FORMATS", "register_format", "layer_from_config"]

log = logging.getLogger(__name__)

FORMATS: Dict[str, Type["QuantLinearBase"]] = {}

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def register_format(cls: Type["QuantLinearBase"]) -> Type["QuantLinearBase"]:
    """Class decorator: make a QuantLinear format loadable by its ``format`` name."""
    FORMATS[cls.format] = cls
    return cls


def layer_from_config(cfg: Dict[str, Any]) -> "QuantLinearBase":
    """Build an empty layer (buffers of the right shapes) from its config entry."""
    fmt = cfg.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized layer format {fmt!r}; known: {sorted(FORMATS)}")
    return FORMATS[fmt].from_config(cfg)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return int(bits)


def _check_axis(group_axis: str) -> str:
    if group_axis == "col":
        group_axis = "column"
    if group_axis not in ("row", "column"):
        raise ValueError(f"group_axis must be 'row' or 'column', got {group_axis!r}")
    return group_axis


class QuantLinearBase(nn.Module):
    """Shared machinery of quantized linear layers (y = x Wᵀ + b)."""

    #: Name of the format in ``quantization_config`` (``FORMATS`` key).
    format: ClassVar[str] = ""
    #: Version of the format's tensor layout; a loader refuses newer versions.
    format_version: ClassVar[int] = 1
    #: Parameters of the format's layer entry beyond the shapes (name -> type),
    #: checked when a config is read.  Empty: not checked.
    layer_params: ClassVar[Mapping[str, type]] = {}
    #: What the format can represent and where it runs, e.g. ``{"bits": (2, 3, 4),
    #: "group_axis": ("row",), "sparse": False, "devices": ("cpu",)}``; methods
    #: check their options against it (:meth:`check_supports`).
    supports: ClassVar[Mapping[str, Any]] = {}
    #: Device kind the kernel choice was last logged for (forward's cheap check).
    _logged_cuda: Optional[bool] = None

    @classmethod
    def check_supports(cls, **wanted: Any) -> None:
        """Raise ValueError if the format cannot represent ``wanted`` (keys of
        :attr:`supports`: a value must be in the declared collection, or equal a
        declared bool).  Keys the format does not declare are not checked."""
        for key, value in wanted.items():
            if key not in cls.supports:
                continue
            allowed = cls.supports[key]
            ok = (value is allowed or not value) if isinstance(allowed, bool) else value in allowed
            if not ok:
                raise ValueError(f"format {cls.format!r} does not support {key}={value!r} "
                                 f"(supported: {allowed!r})")

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features and out_features must be > 0, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self._logged_backend: Optional[str] = None

    # -- what a format provides -------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """The (out_features, in_features) fp32 weight this layer represents."""
        raise NotImplementedError

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (N, in) -> (N, out) without the bias: fp32, or x2's dtype when the
        layer has no bias (forward() casts to x's dtype either way)."""
        raise NotImplementedError

    def layer_config(self) -> Dict[str, Any]:
        return {"format": self.format, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "QuantLinearBase":
        raise NotImplementedError

    def storage_bits(self) -> int:
        """Bits this layer stores for its weight (codes, tables, sparse part; no bias)."""
        return sum(b.numel() * b.element_size() * 8 for n, b in self.named_buffers()
                   if n != "bias")

    def bits_per_weight(self) -> float:
        return self.storage_bits() / float(self.in_features * self.out_features)

    def validate(self) -> None:
        """Check buffer shapes/dtypes (after loading a state dict); raise ValueError."""

    # -- forward ----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step calls this once per layer: the checks and views below
        # are kept to a few attribute reads (each torch call costs ~0.5 µs).
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        dtype = x.dtype
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"input dtype must be float32, float16 or bfloat16, got {dtype}")
        shape = x.shape
        if not shape or shape[-1] != self.in_features:
            raise ValueError(
                f"input's last dimension must be in_features={self.in_features}, "
                f"got shape {tuple(shape)}")
        x2 = x if len(shape) == 2 else x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            y = x2.new_zeros((0, self.out_features), dtype=torch.float32)
        elif x2.requires_grad and torch.is_grad_enabled():
            y = _QuantMatmul.apply(x2, self)
        else:  # inference: no autograd node
            if self._logged_cuda is not x2.is_cuda:
                self._note_backend(x2.device)
            y = self._matmul(x2)
        bias = self._buffers.get("bias")
        if bias is not None:
            y = y + bias.to(torch.float32)
        if y.dtype != dtype:
            y = y.to(dtype)
        return y if len(shape) == 2 else y.view(*shape[:-1], self.out_features)

    def backend(self, device: torch.device) -> str:
        return "cuda" if device.type == "cuda" else "cpu"

    def _note_backend(self, device: torch.device) -> None:
        self._logged_cuda = device.type == "cuda"
        name = self.backend(device)
        if name != self._logged_backend:
            self._logged_backend = name
            log.debug("%s(%dx%d) runs on the %s kernel", type(self).__name__,
                      self.out_features, self.in_features, name)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


    # -- buffers that keep their dtype, caches ----------------------------
    #: Format buffers a model-wide ``.half()`` / ``.to(dtype)`` must not convert
    #: (tables, scales, ...): they keep their dtype and only follow the device.
    _FIXED_DTYPE_BUFFERS: ClassVar[Tuple[str, ...]] = ()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "QuantLinearBase":
        # .to()/.cuda()/.half() replace the buffers: drop what the cache holds
        # (it would otherwise keep the old copies alive).
        self._cache = {}
        before = {n: self._buffers[n] for n in self._FIXED_DTYPE_BUFFERS
                  if self._buffers.get(n) is not None}
        out = super()._apply(fn, *args, **kwargs)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return out

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}  # views and device plans are rebuilt on use
        return state

    def _check_buffer_specs(self, expect: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]) -> None:
        """ValueError naming the first buffer whose shape or dtype is not ``expect[name]``."""
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name} must be {dtype} of shape {tuple(shape)}, got {t.dtype} of "
                                 f"shape {tuple(t.shape)}")


class _QuantMatmul(torch.autograd.Function):
    """x2 @ Ŵᵀ through the layer's kernel; the gradient flows to the input only."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, layer: QuantLinearBase) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        layer._note_backend(x2.device)
        return layer._matmul(x2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:  # type: ignore[override]
        w = ctx.layer.dequantize().to(grad.device)
        return grad.to(torch.float32) @ w, None


_HAS_BF16: Optional[bool] = None
_BF16_MIN_ROWS = 4  # bf16 inputs with fewer rows take the fp32 kernel


def _has_bf16_matmul() -> bool:
    """Whether the CPU LUT kernel has its AVX512-BF16 path here (asked once)."""
    global _HAS_BF16
    if _HAS_BF16 is None:
        _HAS_BF16 = bool(_C.has_bf16_matmul())
    return _HAS_BF16


def _version_of(t: torch.Tensor) -> int:
    """The in-place version counter (-1 for inference tensors, which have none)."""
    try:
        return int(t._version)
    except RuntimeError:
        return -1


ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_tensor(a: ArrayLike, name: str) -> torch.Tensor:
    """A tensor view of a packed-format array: uint32 words become int32 bit
    patterns, uint16 values float16 bit patterns (PyTorch lacks those dtypes)."""
    if isinstance(a, np.ndarray):
        if a.dtype == np.uint32:
            a = a.view(np.int32)
        elif a.dtype == np.uint16:
            a = a.view(np.float16)
        return torch.from_numpy(np.ascontiguousarray(a))
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.dtype == getattr(torch, "uint32", None):
            t = t.view(torch.int32)
        return t
    raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(a).__name__}")


def _u32(t: torch.Tensor) -> np.ndarray:
    """A zero-copy uint32 view of an int32 CPU tensor."""
    return t.detach().numpy().view(np.uint32)


@register_format
class QuantLinear(QuantLinearBase):
    """SqueezeLLM's non-uniform lookup-table layer (``format = "lut"``).

    Buffers (see docs/formats.md):

    * ``qweight`` int32 ``[out, ceil(in*bits/32)]`` — packed codes, one
      little-endian bit stream per output row (the words are uint32 bit patterns);
    * ``lookup_table`` float32 ``[out, 2**bits]`` (row grouping) or
      ``[in, 2**bits]`` (column grouping);
    * ``sparse_row_ptr`` int32 ``[out+1]``, ``sparse_col_idx`` int32 ``[nnz]``,
      ``sparse_values`` float16 ``[nnz]`` — the Dense-and-Sparse part (nnz may be 0);
    * ``bias`` (optional).

    Parameters
    ----------
    in_features, out_features : int
    bits : int
        Code width, 1..8 (2, 3 and 4 are the ones with fast GPU kernels).
    group_axis : {"row", "column"}
        One lookup table per output row (SqueezeLLM) or per input column.
    bias : bool
    nnz : int
        Number of values of the sparse part.
    """

    format = "lut"
    format_version = 1
    layer_params = {"bits": int, "group_axis": str, "nnz": int}
    supports = {"bits": tuple(range(1, 9)), "group_axis": ("row", "column"), "sparse": True,
                "devices": ("cpu", "cuda")}

    def __init__(self, in_features: int, out_features: int, bits: int = 3,
                 group_axis: str = "row", bias: bool = True, nnz: int = 0,
                 bias_dtype: torch.dtype = torch.float32, *, _zero_fill: bool = True) -> None:
        super().__init__(in_features, out_features, bias, bias_dtype)
        self.bits = _check_bits(bits)
        self.group_axis = _check_axis(group_axis)
        words = _C.packed_words(in_features, self.bits)
        groups = out_features if self.group_axis == "row" else in_features
        # from_packed assigns every buffer right after: it skips the zero fill
        # (torch.zeros of all layers was ~10 % of a whole-model quantization).
        new = torch.zeros if _zero_fill else torch.empty
        self.register_buffer("qweight", new(out_features, words, dtype=torch.int32))
        self.register_buffer("lookup_table", new(groups, 2 ** self.bits, dtype=torch.float32))
        self.register_buffer("sparse_row_ptr", new(out_features + 1, dtype=torch.int32))
        self.register_buffer("sparse_col_idx", new(int(nnz), dtype=torch.int32))
        self.register_buffer("sparse_values", new(int(nnz), dtype=torch.float16))
        self._cache: Dict[str, Any] = {}

    # -- construction -------------------------------------------------------
    @classmethod
    def from_packed(cls, qweight: ArrayLike, lookup_table: ArrayLike, bits: int,
                    in_features: int, group_axis: str = "row",
                    sparse: Optional[Tuple[ArrayLike, ArrayLike, ArrayLike]] = None,
                    bias: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Build the layer from its packed tensors (docs/formats.md) and validate them.

        Parameters
        ----------
        qweight : int32/uint32 tensor or array ``[out, ceil(in*bits/32)]``
            The packed codes (uint32 bit patterns).
        lookup_table : float tensor or array ``[out or in, 2**bits]``
        bits, in_features : int
        group_axis : {"row", "column"}
        sparse : (row_ptr int32 [out+1], col_idx int32 [nnz], values [nnz]), optional
            The Dense-and-Sparse part; values are stored as float16 (a uint16
            array is taken as float16 bit patterns).
        bias : Tensor [out], optional

        Tensors already on the CPU in the stored dtype are used without a copy
        (the layer shares their memory, as ``torch.from_numpy`` does).
        """
        bits = _check_bits(bits)
        if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)):
            raise TypeError(f"in_features must be an int, got {type(in_features).__name__}")
        if bias is not None:
            bias = _as_tensor(bias, "bias")
            if not bias.is_floating_point():
                raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
        qw = _as_tensor(qweight, "qweight").to("cpu")
        table = _as_tensor(lookup_table, "lookup_table").to("cpu")
        if qw.dim() != 2:
            raise ValueError(f"qweight must be 2-D [out, words], got shape {tuple(qw.shape)}")
        if not table.is_floating_point():
            raise ValueError(f"lookup_table must be a float tensor, got {table.dtype}")
        parts = None
        if sparse is not None:
            if len(sparse) != 3:
                raise ValueError("sparse must be (row_ptr, col_idx, values)")
            parts = [_as_tensor(t, n).to("cpu")
                     for t, n in zip(sparse, ("row_ptr", "col_idx", "values"))]
        nnz = int(parts[2].numel()) if parts is not None else 0
        layer = cls(int(in_features), int(qw.shape[0]), bits, group_axis, bias=bias is not None,
                    nnz=nnz, bias_dtype=bias.dtype if bias is not None else torch.float32,
                    _zero_fill=False)
        # Assign, then check everything in one place (validate: shapes, dtypes, CSR).
        layer.qweight = qw.contiguous()
        layer.lookup_table = table.to(torch.float32).contiguous()
        if parts is not None:
            row_ptr, col_idx, values = parts
            layer.sparse_row_ptr = row_ptr.to(torch.int32).contiguous()
            layer.sparse_col_idx = col_idx.to(torch.int32).contiguous()
            layer.sparse_values = (values.to(torch.float16) if values.is_floating_point()
                                   else values).contiguous()
        else:  # no sparse part: an empty CSR (all row pointers 0)
            layer.sparse_row_ptr.zero_()
        if bias is not None:
            if tuple(bias.shape) != (layer.out_features,):
                raise ValueError(f"bias must have shape ({layer.out_features},), got "
                                 f"{tuple(bias.shape)}")
            layer.bias.copy_(bias.detach().to("cpu"))
        layer.validate()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 3,
                    sensitivity: Optional[torch.Tensor] = None, group_axis: str = "row",
                    kmeans: str = "exact", sparsity: float = 0.0,
                    sensitive_fraction: float = 1.0 / 9.0, num_threads: int = 0) -> "QuantLinear":
        """Quantize an ``nn.Linear`` with SqueezeLLM (a convenience).

        The algorithm is :class:`sqllm.methods.SqueezeLLM`; this is
        ``SqueezeLLM(bits=..., group_axis=..., kmeans=..., sparsity=...,
        sensitive_fraction=..., weighted=sensitivity is not None)
        .quantize_linear(linear, sensitivity)``.

        Parameters
        ----------
        linear : nn.Linear
        bits : int
        sensitivity : Tensor, optional
            Same shape as ``linear.weight``, >= 0 (the Fisher diagonal).  None
            gives plain (unweighted) k-means.
        group_axis : {"row", "column"}
        kmeans : {"exact", "lloyd"}
            Exact: the globally optimal weighted k-means by dynamic programming.
            Lloyd: fast refinement from a near-optimal start.
        sparsity : float
            Fraction of weights kept exactly in the fp16 sparse part
            (Dense-and-Sparse; 0 = dense-only).
        sensitive_fraction : float
            Share of the sparse budget given to the most sensitive values; the
            rest goes to magnitude outliers.
        """
        from .methods import SqueezeLLM

        method = SqueezeLLM(bits=bits, group_axis=group_axis, kmeans=kmeans, sparsity=sparsity,
                            sensitive_fraction=sensitive_fraction,
                            weighted=sensitivity is not None)
        return method.quantize_linear(linear, sensitivity, num_threads=num_threads)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int = 3,
                    sensitivity: Optional[torch.Tensor] = None, group_axis: str = "row",
                    kmeans: str = "exact", sparsity: float = 0.0,
                    sensitive_fraction: float = 1.0 / 9.0, bias: Optional[torch.Tensor] = None,
                    num_threads: int = 0) -> "QuantLinear":
        """Quantize a (out, in) weight tensor with SqueezeLLM; see :meth:`from_linear`."""
        from .methods import SqueezeLLM

        method = SqueezeLLM(bits=bits, group_axis=group_axis, kmeans=kmeans, sparsity=sparsity,
                            sensitive_fraction=sensitive_fraction,
                            weighted=sensitivity is not None)
        return method.quantize_weight(weight, sensitivity, bias=bias, num_threads=num_threads)

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "QuantLinear":
        try:
            return cls(int(cfg["in_features"]), int(cfg["out_features"]), int(cfg["bits"]),
                       cfg.get("group_axis", "row"), bool(cfg.get("bias", False)),
                       int(cfg.get("nnz", 0)))
        except KeyError as e:
            raise ValueError(f"quantized layer config lacks the key {e.args[0]!r}: {cfg}") from None

    def layer_config(self) -> Dict[str, Any]:
        cfg = super().layer_config()
        cfg.update(bits=self.bits, group_axis=self.group_axis, nnz=self.nnz)
        return cfg

    # -- state ------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.sparse_values.numel())

    _KEY_BUFFERS = ("qweight", "lookup_table", "sparse_row_ptr", "sparse_col_idx",
                    "sparse_values")

    def _buffer_key(self, versions: bool = True) -> Tuple[Any, ...]:
        b = self._buffers
        bufs = tuple(b[n] for n in self._KEY_BUFFERS)
        return bufs + tuple(_version_of(t) for t in bufs) if versions else bufs

    def _cached(self, kind: str, build: Any, versions: bool = True) -> Any:
        """``build()`` once per state of the buffers: a new buffer object
        (``.to()``, ``.half()``, loading a checkpoint of another nnz) or, with
        ``versions``, an in-place change (its version counter) rebuilds it.
        A value made of views of the buffers (no copies) needs no versions."""
        key = self._buffer_key(versions)
        hit = self._cache.get(kind)
        if hit is not None and len(hit[0]) == len(key) and \
                all(a is b or (type(a) is int and a == b) for a, b in zip(hit[0], key)):
            return hit[1]
        value = build()
        self._cache[kind] = (key, value)
        return value

    #: Buffers whose dtype is part of the format: ``.half()``, ``.float()``,
    #: ``.to(dtype)`` move them between devices but never convert them (a
    #: model-wide ``.to(torch.bfloat16)`` would otherwise round the tables and
    #: reinterpret the fp16 sparse values).
    _FIXED_DTYPE_BUFFERS = ("lookup_table", "sparse_values")

    def _cpu_operands(self) -> Tuple[np.ndarray, np.ndarray, Any]:
        # fp32 tables on the CPU: every operand is a view of its buffer, so an
        # in-place change shows through and only a new buffer object rebuilds.
        views = self._buffers["lookup_table"].dtype == torch.float32
        return self._cached("cpu", lambda: (_u32(self.qweight), self._tables_np(),
                                            self._sparse_np()), versions=not views)

    def _cuda_plan(self) -> Any:
        from .kernels_cuda import LutMatmulPlan

        def build() -> LutMatmulPlan:
            csr = ((self.sparse_row_ptr, self.sparse_col_idx, self.sparse_values)
                   if self.nnz else None)
            return LutMatmulPlan(self.qweight, self.lookup_table.float().contiguous(), self.bits,
                                 self.in_features, self.out_features, self.group_axis, csr)

        return self._cached("cuda", build)

    def _sparse_np(self) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self.nnz == 0:
            return None
        return (self.sparse_row_ptr.detach().cpu().numpy(),
                self.sparse_col_idx.detach().cpu().numpy(),
                self.sparse_values.detach().cpu().numpy().view(np.uint16))

    def _tables_np(self) -> np.ndarray:
        return self.lookup_table.detach().to("cpu", torch.float32).numpy()

    def validate(self) -> None:
        words = _C.packed_words(self.in_features, self.bits)
        groups = self.out_features if self.group_axis == "row" else self.in_features
        expect = {
            "qweight": ((self.out_features, words), torch.int32),
            "lookup_table": ((groups, 2 ** self.bits), None),
            "sparse_row_ptr": ((self.out_features + 1,), torch.int32),
            "sparse_col_idx": ((self.nnz,), torch.int32),
            "sparse_values": ((self.nnz,), torch.float16),
        }
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype) or \
                    (dtype is None and t.dtype not in _FLOAT_DTYPES):
                raise ValueError(f"{name} must be {dtype or 'a float tensor'} of shape {shape}, "
                                 f"got {t.dtype} of shape {tuple(t.shape)}")
        if not torch.isfinite(self.lookup_table).all():
            raise ValueError("lookup_table contains NaN or Inf")
        sp = self._sparse_np()
        if sp is not None:
            _C.check_csr(sp, self.out_features, self.in_features)
        # Kept in the cache, which .to()/.half()/pickling clear, so that it never
        # holds old buffers alive.
        self._cache["checked"] = self._buffer_key()

    def _ensure_valid(self) -> None:
        """Validate unless these very buffers, unchanged since (their in-place
        version counters), were validated: an edit such as
        ``layer.sparse_col_idx[0] = 10**9`` after a forward is caught here,
        before a kernel reads through it."""
        key = self._buffer_key()
        old = self._cache.get("checked")
        if old is None or not all(a is b or (type(a) is int and a == b and a >= 0)
                                  for a, b in zip(old, key)):
            self.validate()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Resize the sparse buffers to what the checkpoint holds (nnz is data).
        key = prefix + "sparse_values"
        if key in state_dict:
            n = state_dict[key].shape[0]
            if n != self.nnz:
                self.sparse_col_idx = torch.zeros(n, dtype=torch.int32, device=self.qweight.device)
                self.sparse_values = torch.zeros(n, dtype=torch.float16, device=self.qweight.device)
        self._cache = {}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- math -------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        self._ensure_valid()
        w = _C.nuq_dequantize(_u32(self.qweight.cpu()), self._tables_np(),
                              self.in_features, self.bits, self.group_axis)
        w = torch.from_numpy(w)
        if self.nnz:
            rows = torch.repeat_interleave(
                torch.arange(self.out_features),
                (self.sparse_row_ptr[1:] - self.sparse_row_ptr[:-1]).cpu().long())
            w[rows, self.sparse_col_idx.cpu().long()] += self.sparse_values.cpu().float()
        return w.to(self.qweight.device)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        qweight = self._buffers["qweight"]
        if x2.is_cpu and qweight.is_cpu:
            return self._cpu_matmul(x2)
        if x2.device != qweight.device:
            raise ValueError(f"input is on {x2.device} but the layer's buffers are on "
                             f"{qweight.device}")
        self._ensure_valid()
        if x2.device.type == "cuda":
            # Without a bias the kernel's output (one rounding to x's dtype)
            # is the result; with one, the sum is formed in fp32 (forward()).
            return self._cuda_plan()(
                x2, out_dtype=torch.float32 if self.bias is not None else None)
        raise ValueError(f"QuantLinear runs on CPU or CUDA tensors, got device {x2.device}")

    def _cpu_state(self) -> Tuple[np.ndarray, np.ndarray, Any]:
        """The CPU operands, after validating the buffers: one identity and
        version check of the five buffers per call (what _ensure_valid and
        _cpu_operands check, done once)."""
        b = self._buffers
        qw, lt = b["qweight"], b["lookup_table"]
        rp, ci, sv = b["sparse_row_ptr"], b["sparse_col_idx"], b["sparse_values"]
        try:
            ver: Any = (qw._version, lt._version, rp._version, ci._version, sv._version)
        except RuntimeError:  # inference tensors have no version counter
            ver = tuple(_version_of(t) for t in (qw, lt, rp, ci, sv))
        hit = self._cache.get("fast")
        if hit is not None and hit[0] is qw and hit[1] is lt and hit[2] is rp and \
                hit[3] is ci and hit[4] is sv and hit[5] == ver:
            return hit[6]
        self._ensure_valid()
        ops = self._cpu_operands()
        self._cache["fast"] = (qw, lt, rp, ci, sv, ver, ops)
        return ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.is_cpu and not x.requires_grad:
            # traced by torch.compile: the kernel as a torch custom op (no graph break)
            return _compiled.quant_linear_forward(self, x)
        # The decode step's case first: fp32, contiguous, on the CPU, no
        # autograd; a few attribute reads and one C++ call (QuantLinearBase's
        # forward handles everything else, with the same results).
        if type(x) is torch.Tensor and x.dtype is torch.float32 and x.is_cpu and \
                not (x.requires_grad and torch.is_grad_enabled()):
            shape = x.shape
            n_in = self.in_features
            if shape and shape[-1] == n_in and x.is_contiguous() and x.numel() > 0 and \
                    self._buffers["qweight"].is_cpu:
                if self._logged_cuda is not False:
                    self._note_backend(x.device)
                codes, tables, sparse = self._cpu_state()
                xn = x.detach().numpy()
                if len(shape) != 2:
                    xn = xn.reshape(-1, n_in)
                y = torch.from_numpy(_C.lut_matmul(xn, codes, tables, self.bits, n_in,
                                                   self.group_axis, sparse, 0, True))
                bias = self._buffers.get("bias")
                if bias is not None:
                    y += bias if bias.dtype is torch.float32 else bias.to(torch.float32)
                return y if len(shape) == 2 else y.view(*shape[:-1], self.out_features)
        return super().forward(x)

    def _cpu_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        codes, tables, sparse = self._cpu_state()
        if x2.requires_grad:
            x2 = x2.detach()
        if x2.dtype is torch.bfloat16 and x2.shape[0] >= _BF16_MIN_ROWS and self._bf16_path():
            # bf16 activations from 4 rows on: bf16 x bf16 products, fp32
            # accumulation, the tables rounded to bf16 (torch's int4 kernel's
            # arithmetic; twice the multiply-adds per instruction of the fp32
            # path).  Below 4 rows the fp32 kernels, bound by memory, are faster
            # (docs/benchmarks.md).
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            xb = x2.view(torch.int16).numpy().view(np.uint16)
            return torch.from_numpy(_C.lut_matmul_bf16(xb, codes, tables, self.bits,
                                                       self.in_features, sparse, 0, True))
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = _C.lut_matmul(x2.numpy(), codes, tables, self.bits, self.in_features,
                          self.group_axis, sparse, 0, True)
        return torch.from_numpy(y)

    def _bf16_path(self) -> bool:
        """Whether bf16 inputs take the AVX512-BF16 kernel (row grouping, 2..4
        bits, a CPU that has it and SQLLM_CPU_KERNEL not forcing another path)."""
        return self.group_axis == "row" and 2 <= self.bits <= 4 and _has_bf16_matmul()

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", bits={self.bits}, group_axis={self.group_axis}"
        if self.nnz:
            s += f", nnz={self.nnz}"
        return s
