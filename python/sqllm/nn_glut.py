"""The grouped-lookup-table layer format (``format = "glut"``).

Buffers (docs/formats.md, "glut"):

* ``qweight`` int32 ``[out, ceil(in*bits/32)]`` — packed b-bit codes, the
  layout of the ``lut`` format (one bit stream per output row);
* ``tables`` uint8 ``[out, G * 2**bits]`` — table ``j`` of row ``o`` is
  ``tables[o, j*K:(j+1)*K]``; ``G = ceil(in / group_size)`` (the last group of a
  row is shorter when ``group_size`` does not divide ``in``);
* ``scales``, ``offsets`` float16 ``[out, G]``;
* ``bias`` (optional).

``Ŵ[o, i] = fma(scales[o, j], tables[o, j*K + code(o, i)], offsets[o, j])``
with ``j = i // group_size``, computed in float32 (one rounding).  Stored bits
per weight: ``bits + (8 * 2**bits + 32) / group_size``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from . import _C
from .nn import QuantLinearBase, _u32, _version_of, register_format

__all__ = ["GlutQuantLinear", "glut_bits_per_weight", "glut_storage_bits",
           "check_glut_options", "glut_dequantize_numpy"]

log = logging.getLogger(__name__)

#: Inputs with at least this many rows go through dequantize + F.linear (a
#: BLAS GEMM); fewer rows through the packed-code kernel.
GEMM_MIN_ROWS = 32


def check_glut_options(bits: Any, group_size: Any) -> Tuple[int, int]:
    """Validate bits (1..8) and group_size (>= 1); return them as ints."""
    for name, v in (("bits", bits), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"glut: {name} must be an int, got {type(v).__name__} {v!r}")
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"glut: bits must be in 1..8, got {bits}")
    if int(group_size) < 1:
        raise ValueError(f"glut: group_size must be >= 1, got {group_size}")
    return int(bits), int(group_size)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-int(in_features) // int(group_size))


def glut_storage_bits(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bits a glut layer stores for its weight (codes + compact tables), no bias."""
    words = _C.packed_words(int(in_features), int(bits))
    g = num_groups(in_features, group_size)
    return int(out_features) * (32 * words + g * (8 * (1 << int(bits)) + 32))


def glut_bits_per_weight(out_features: int, in_features: int, bits: int, group_size: int) -> float:
    return glut_storage_bits(out_features, in_features, bits, group_size) / float(
        out_features * in_features)


def glut_dequantize_numpy(qweight: np.ndarray, tables: np.ndarray, scales: np.ndarray,
                          offsets: np.ndarray, bits: int, group_size: int,
                          in_features: int) -> np.ndarray:
    """NumPy reference decode (float64 arithmetic, one rounding to float32 = the fp32 FMA).

    Independent of the C++ code: codes are read bit by bit from the uint32 words."""
    qweight = np.asarray(qweight).view(np.uint32)
    out = qweight.shape[0]
    K = 1 << bits
    bit = np.arange(in_features, dtype=np.int64) * bits
    codes = np.zeros((out, in_features), dtype=np.int64)
    for b in range(bits):
        pos = bit + b
        w = qweight[:, pos // 32].astype(np.int64)
        codes |= ((w >> (pos % 32)) & 1) << b
    grp = np.arange(in_features) // group_size
    s = np.asarray(scales).view(np.float16).astype(np.float64)
    o = np.asarray(offsets).view(np.float16).astype(np.float64)
    q = np.asarray(tables, dtype=np.uint8).astype(np.float64).reshape(out, -1, K)
    rows = np.arange(out)[:, None]
    vals = s[rows, grp[None, :]] * q[rows, grp[None, :], codes] + o[rows, grp[None, :]]
    return vals.astype(np.float32)


@register_format
class GlutQuantLinear(QuantLinearBase):
    """A Linear stored as b-bit codes into one compact 2^b-entry table per group
    of ``group_size`` weights along each row.

    Parameters
    ----------
    in_features, out_features : int
    bits : int
        1..8.
    group_size : int
        Input columns per table (>= 1; need not divide in_features).
    bias : bool
    """

    format = "glut"
    format_version = 1
    layer_params = {"bits": int, "group_size": int}
    supports = {"bits": tuple(range(1, 9)), "sparse": False, "devices": ("cpu", "cuda")}
    _FIXED_DTYPE_BUFFERS = ("scales", "offsets")

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = True, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, bias_dtype)
        self.bits, self.group_size = check_glut_options(bits, group_size)
        words = _C.packed_words(in_features, self.bits)
        g = num_groups(in_features, self.group_size)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("tables", torch.zeros(out_features, g << self.bits, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, g, dtype=torch.float16))
        self.register_buffer("offsets", torch.zeros(out_features, g, dtype=torch.float16))
        self._checked = False
        self._cache: Dict[str, Any] = {}
        self._warned_fallback = False

    # -- construction -------------------------------------------------------
    @classmethod
    def from_packed(cls, qweight: np.ndarray, tables: np.ndarray, scales: np.ndarray,
                    offsets: np.ndarray, in_features: int, bits: int, group_size: int,
                    bias: Optional[torch.Tensor] = None) -> "GlutQuantLinear":
        """A layer from packed codes (uint32), uint8 tables and fp16 scales/offsets
        (float16 or their uint16 bit patterns); validated."""
        out_features = int(np.asarray(qweight).shape[0])
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None,
                    bias_dtype=bias.dtype if bias is not None else torch.float32)
        for name, arr, dt in (("qweight", qweight, np.int32), ("tables", tables, np.uint8),
                              ("scales", scales, np.float16), ("offsets", offsets, np.float16)):
            a = np.ascontiguousarray(arr)
            if a.dtype.itemsize != np.dtype(dt).itemsize:
                raise ValueError(f"{name} must have {np.dtype(dt).itemsize}-byte elements, got {a.dtype}")
            buf = getattr(layer, name)
            if tuple(a.shape) != tuple(buf.shape):
                raise ValueError(f"{name} must have shape {tuple(buf.shape)}, got {tuple(a.shape)}")
            buf.copy_(torch.from_numpy(a.view(dt)))
        if bias is not None:
            layer.bias.copy_(bias.detach().to("cpu"))
        layer.validate()
        return layer

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "GlutQuantLinear":
        try:
            return cls(int(cfg["in_features"]), int(cfg["out_features"]), int(cfg["bits"]),
                       int(cfg["group_size"]), bool(cfg.get("bias", False)))
        except KeyError as e:
            raise ValueError(f"quantized layer config lacks the key {e.args[0]!r}: {cfg}") from None

    def layer_config(self) -> Dict[str, Any]:
        cfg = super().layer_config()
        cfg.update(bits=self.bits, group_size=self.group_size)
        return cfg

    # -- state ------------------------------------------------------------
    def _host_arrays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The buffers as the C++ functions take them, copied to the host (not cached)."""
        return (_u32(self.qweight.cpu()), self.tables.detach().cpu().numpy(),
                self.scales.detach().cpu().numpy().view(np.uint16),
                self.offsets.detach().cpu().numpy().view(np.uint16))

    def _operands(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        bufs = (self.qweight, self.tables, self.scales, self.offsets)
        key = tuple(bufs) + tuple(_version_of(b) for b in bufs)
        hit = self._cache.get("cpu")
        if hit is not None and len(hit[0]) == len(key) and all(
                a is b or (type(a) is int and a == b) for a, b in zip(hit[0], key)):
            return hit[1]
        ops = self._host_arrays()
        self._cache["cpu"] = (key, ops)
        return ops

    def validate(self) -> None:
        words = _C.packed_words(self.in_features, self.bits)
        g = num_groups(self.in_features, self.group_size)
        expect = {"qweight": ((self.out_features, words), torch.int32),
                  "tables": ((self.out_features, g << self.bits), torch.uint8),
                  "scales": ((self.out_features, g), torch.float16),
                  "offsets": ((self.out_features, g), torch.float16)}
        self._check_buffer_specs(expect)
        # On a GPU the buffers are copied to the host for the check only (a
        # cached host copy would double the layer's memory).
        ops = self._operands() if self.qweight.device.type == "cpu" else self._host_arrays()
        _C.check_glut(*ops, self.bits, self.group_size, self.in_features)
        self._checked = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._checked = False
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    # -- math -------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """Ŵ as float32 (out, in) on the layer's device; on a GPU with the CUDA
        kernels decoded there (the same bits as the CPU decode)."""
        if self.qweight.device.type == "cuda":
            from . import kernels_cuda_glut

            if kernels_cuda_glut.available():
                if not self._checked:
                    self.validate()
                return kernels_cuda_glut.glut_dequantize(self, torch.float32, self.qweight.device)
            w = _C.glut_dequantize(*self._host_arrays(), self.bits, self.group_size,
                                   self.in_features)
            return torch.from_numpy(w).to(self.qweight.device)
        w = _C.glut_dequantize(*self._operands(), self.bits, self.group_size, self.in_features)
        return torch.from_numpy(w).to(self.qweight.device)

    def backend(self, device: torch.device) -> str:
        if device.type != "cuda":
            return "cpu"
        from . import kernels_cuda_glut

        return ("cuda" if kernels_cuda_glut.available()
                else "cuda-dequantize (no CUDA glut kernels built)")

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device != self.qweight.device:
            raise ValueError(f"input is on {x2.device} but the layer's buffers are on "
                             f"{self.qweight.device}")
        if not self._checked:
            self.validate()
        if x2.device.type == "cuda":
            from . import kernels_cuda_glut

            if kernels_cuda_glut.available():
                if x2.shape[0] <= kernels_cuda_glut.GEMV_MAX_BATCH:
                    # fp32 in and out: forward() adds the bias and rounds once
                    return kernels_cuda_glut.glut_matmul(x2.to(torch.float32), self)
                # decoded on the GPU for this call only (memory stays packed)
                w = kernels_cuda_glut.glut_dequantize(self, x2.dtype, x2.device)
                return torch.nn.functional.linear(x2, w)
        if x2.device.type != "cpu" or x2.shape[0] >= GEMM_MIN_ROWS:
            # Many rows (a prompt, a perplexity window) or no kernel for the
            # device: decode Ŵ (O(out*in), small next to the GEMM) and use the
            # framework's matmul; not cached, so memory stays packed.
            if x2.device.type != "cpu" and not self._warned_fallback:
                log.info("GlutQuantLinear(%dx%d): no %s kernel; dequantizing and using F.linear",
                         self.out_features, self.in_features, x2.device.type)
                self._warned_fallback = True
            w = self.dequantize().to(x2.device)
            return torch.nn.functional.linear(x2.to(torch.float32), w)
        xf = x2.detach().to(torch.float32).contiguous()
        y = _C.glut_matmul(xf.numpy(), *self._operands(), self.bits, self.group_size,
                           self.in_features, 0, True)
        return torch.from_numpy(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}"
