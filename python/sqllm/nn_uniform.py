"""The uniform (integer-grid) layer format of RTN and GPTQ (``format = "uniform"``).

Buffers (docs/formats.md, "uniform"):

* ``qweight`` int32 ``[out, ceil(in*bits/32)]`` — packed b-bit codes, the
  layout of the ``lut`` format;
* ``scales``, ``zeros`` float16 ``[out, groups]`` — one grid per (row, group);
  ``groups = ceil(in / group_size)`` (1 when ``group_size == -1``);
* ``g_idx`` int32 ``[in]`` — present only when act-order formed the groups in
  another column order (``act_order`` without ``static_groups``): column i
  belongs to group ``g_idx[i]``; otherwise group ``i // group_size``;
* ``bias`` (optional).

``Ŵ[o, i] = scales[o, g(i)] * (code(o, i) - zeros[o, g(i)])``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from . import _C
from .nn import QuantLinearBase, _u32, _version_of, register_format

__all__ = ["UniformQuantLinear"]

log = logging.getLogger(__name__)


def check_uniform_options(bits: int, group_size: int) -> Tuple[int, int]:
    """Validate bits (2..8) and group_size (-1, 32, 64, 128); return them as ints."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"uniform quantization: bits must be in 2..8, got {bits}")
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or \
            int(group_size) not in (-1, 32, 64, 128):
        raise ValueError("uniform quantization: group_size must be -1 (per row), 32, 64 or 128, "
                         f"got {group_size!r}")
    return int(bits), int(group_size)


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size < 0 else -(-in_features // group_size)


@register_format
class UniformQuantLinear(QuantLinearBase):
    """A Linear stored as b-bit codes on per-(row, group) uniform grids.

    Parameters
    ----------
    in_features, out_features : int
    bits : int
        2..8.
    group_size : int
        -1 (one grid per output row) or 32, 64, 128 input columns per grid.
    has_g_idx : bool
        Store an explicit column -> group map (GPTQ act-order without static groups).
    bias : bool
    """

    format = "uniform"
    format_version = 1
    layer_params = {"bits": int, "group_size": int, "g_idx": bool}
    #: CUDA tensors run through dequantize + F.linear (no CUDA kernel yet), so
    #: only the CPU is listed as a kernel device.
    supports = {"bits": tuple(range(2, 9)), "group_size": (-1, 32, 64, 128), "sparse": False,
                "devices": ("cpu",)}
    #: fp16 grid parameters are part of the format: a model-wide .half()/.to(dtype)
    #: moves them but never converts them.
    _FIXED_DTYPE_BUFFERS = ("scales", "zeros")

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = -1,
                 has_g_idx: bool = False, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, bias_dtype)
        self.bits, self.group_size = check_uniform_options(bits, group_size)
        words = _C.packed_words(in_features, self.bits)
        groups = num_groups(in_features, self.group_size)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float16))
        if has_g_idx:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        else:
            self.g_idx = None
        self._checked = False
        self._cache: Dict[str, Any] = {}
        self._warned_fallback = False

    # -- construction -------------------------------------------------------
    @classmethod
    def from_packed(cls, qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                    in_features: int, bits: int, group_size: int,
                    g_idx: Optional[np.ndarray] = None,
                    bias: Optional[torch.Tensor] = None) -> "UniformQuantLinear":
        """A layer from packed codes (uint32) and fp16 scales/zeros (as float16 or
        their uint16 bit patterns); validated."""
        out_features = int(qweight.shape[0])
        layer = cls(in_features, out_features, bits, group_size, has_g_idx=g_idx is not None,
                    bias=bias is not None,
                    bias_dtype=bias.dtype if bias is not None else torch.float32)
        layer.qweight.copy_(torch.from_numpy(np.ascontiguousarray(qweight).view(np.int32)))
        layer.scales.copy_(torch.from_numpy(np.ascontiguousarray(scales).view(np.float16)))
        layer.zeros.copy_(torch.from_numpy(np.ascontiguousarray(zeros).view(np.float16)))
        if g_idx is not None:
            layer.g_idx.copy_(torch.from_numpy(np.ascontiguousarray(g_idx, dtype=np.int32)))
        if bias is not None:
            layer.bias.copy_(bias.detach().to("cpu"))
        layer.validate()
        return layer

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "UniformQuantLinear":
        try:
            return cls(int(cfg["in_features"]), int(cfg["out_features"]), int(cfg["bits"]),
                       int(cfg.get("group_size", -1)), bool(cfg.get("g_idx", False)),
                       bool(cfg.get("bias", False)))
        except KeyError as e:
            raise ValueError(f"quantized layer config lacks the key {e.args[0]!r}: {cfg}") from None

    def layer_config(self) -> Dict[str, Any]:
        cfg = super().layer_config()
        cfg.update(bits=self.bits, group_size=self.group_size, g_idx=self.g_idx is not None)
        return cfg

    # -- state ------------------------------------------------------------
    def _operands(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        bufs = (self.qweight, self.scales, self.zeros, self.g_idx)
        key = tuple(b for b in bufs) + tuple(_version_of(b) for b in bufs if b is not None)
        hit = self._cache.get("cpu")
        if hit is not None and len(hit[0]) == len(key) and all(
                a is b or (type(a) is int and a == b) for a, b in zip(hit[0], key)):
            return hit[1]
        ops = (_u32(self.qweight.cpu()),
               self.scales.detach().cpu().numpy().view(np.uint16),
               self.zeros.detach().cpu().numpy().view(np.uint16),
               None if self.g_idx is None else self.g_idx.detach().cpu().numpy())
        self._cache["cpu"] = (key, ops)
        return ops

    def validate(self) -> None:
        words = _C.packed_words(self.in_features, self.bits)
        groups = num_groups(self.in_features, self.group_size)
        if self.g_idx is not None and self.group_size < 0:
            raise ValueError("g_idx needs a group_size > 0")
        expect = {"qweight": ((self.out_features, words), torch.int32),
                  "scales": ((self.out_features, groups), torch.float16),
                  "zeros": ((self.out_features, groups), torch.float16)}
        if self.g_idx is not None:
            expect["g_idx"] = ((self.in_features,), torch.int32)
        self._check_buffer_specs(expect)
        _C.check_uniform(*self._operands(), self.bits, self.group_size, self.in_features)
        self._checked = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._checked = False
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    # -- math -------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        w = _C.uniform_dequantize(*self._operands(), self.bits, self.group_size, self.in_features)
        return torch.from_numpy(w).to(self.qweight.device)

    def backend(self, device: torch.device) -> str:
        return "cuda-dequantize" if device.type == "cuda" else "cpu"

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device != self.qweight.device:
            raise ValueError(f"input is on {x2.device} but the layer's buffers are on "
                             f"{self.qweight.device}")
        if x2.device.type != "cpu":
            # No GPU kernel for this format yet: materialise Ŵ and use the
            # framework's matmul (correct, but memory-hungry and slower).
            if not self._warned_fallback:
                log.info("UniformQuantLinear(%dx%d): no %s kernel for the uniform format; "
                         "dequantizing and using F.linear", self.out_features, self.in_features,
                         x2.device.type)
                self._warned_fallback = True
            bufs = (self.qweight, self.scales, self.zeros, self.g_idx)
            key = [id(b) for b in bufs] + [_version_of(b) for b in bufs if b is not None]
            hit = self._cache.get("dense")
            if hit is not None and hit[0] == key and hit[1].device == x2.device:
                w = hit[1]
            else:  # rebuilt after .to() or an in-place change of a buffer
                w = self.dequantize().to(x2.device)
                self._cache["dense"] = (key, w)
            return torch.nn.functional.linear(x2.to(torch.float32), w)
        if not self._checked:
            self.validate()
        xf = x2.detach().to(torch.float32).contiguous()
        y = _C.uniform_matmul(xf.numpy(), *self._operands(), self.bits, self.group_size,
                              self.in_features, 0, True)
        return torch.from_numpy(y)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}"
        if self.g_idx is not None:
            s += ", g_idx=True"
        return s
