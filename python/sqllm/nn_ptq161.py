"""The PTQ1.61 layer format (``format = "ptq161"``): below two bits per weight.

A per-input-channel mask splits the weight (docs/formats.md, "ptq161"):

* salient channels (mask bit set): ``wbits``-bit codes on per-(row, group)
  uniform grids, the ``uniform`` format's layout over the salient columns in
  increasing channel order;
* the other channels: one sign bit per weight,
  ``Ŵ[o, i_j] = r1[o] · r2[j] · (alpha[o] · s[o, j] + mu[o])``.

Buffers:

* ``mask`` uint8 ``[ceil(in/8)]`` — bit ``i % 8`` of byte ``i // 8`` set: channel
  i is salient;
* ``signs`` uint8 ``[out, ceil(n_bin/8)]`` — bit ``j % 8`` of byte ``j // 8`` set:
  ``s[o, j] = +1`` for the j-th binarised channel;
* ``alpha``, ``mu``, ``r1`` float16 ``[out]``; ``r2`` float16 ``[n_bin]``;
* ``qweight`` int32 ``[out, ceil(n_sal*wbits/32)]``, ``scales``, ``zeros``
  float16 ``[out, groups]`` — the salient part (``groups = ceil(n_sal /
  group_size)``, 1 for per-row grids, 0 when no channel is salient);
* ``bias`` (optional).

The CPU kernel (include/sqllm/binary_matmul.hpp) never materialises Ŵ: the
binary part reads one 256-entry partial-sum table per byte of signs.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from . import _C
from .nn import QuantLinearBase, _u32, _version_of, register_format
from .nn_uniform import check_uniform_options

__all__ = ["PTQ161QuantLinear", "pack_bits", "unpack_bits", "fake_quant_activations"]

log = logging.getLogger(__name__)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean array along its last axis, little-endian bit order in each byte."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` bits of each row of ``packed`` (the inverse of :func:`pack_bits`)."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=n,
                         bitorder="little").astype(bool)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def fake_quant_activations(x: torch.Tensor, abits: int) -> torch.Tensor:
    """Per-token asymmetric min-max fake quantization of activations to ``abits`` bits
    (16: unchanged), straight-through gradient; the range includes 0."""
    if abits >= 16:
        return x
    maxq = (1 << abits) - 1
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-5)
    zero = (-lo / scale).round()
    q = (_round_ste(x / scale) + zero).clamp(0, maxq)
    return (q - zero) * scale


def _salient_groups(n_sal: int, group_size: int) -> int:
    if n_sal == 0:
        return 0
    return 1 if group_size < 0 else -(-n_sal // group_size)


@register_format
class PTQ161QuantLinear(QuantLinearBase):
    """A Linear stored as 1-bit signs plus ``wbits``-bit codes on the salient channels.

    Parameters
    ----------
    in_features, out_features : int
    wbits : int
        Code width of the salient channels (2..8).
    group_size : int
        -1 (one grid per row over the salient channels) or 32, 64, 128 salient
        columns per grid.
    n_salient : int
        Number of salient (masked) input channels, 0..in_features.
    abits : int
        Inputs are fake-quantized per token to ``abits`` bits before the product
        (16: not at all).
    bias : bool
    """

    format = "ptq161"
    format_version = 1
    layer_params = {"wbits": int, "group_size": int, "n_salient": int, "abits": int}
    supports = {"bits": (1,), "devices": ("cpu",)}
    _FIXED_DTYPE_BUFFERS = ("alpha", "mu", "r1", "r2", "scales", "zeros")
    _BUFFERS = ("mask", "signs", "alpha", "mu", "r1", "r2", "qweight", "scales", "zeros")

    def __init__(self, in_features: int, out_features: int, wbits: int = 4, group_size: int = -1,
                 n_salient: int = 0, bias: bool = True, abits: int = 16,
                 bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, bias_dtype)
        self.wbits, self.group_size = check_uniform_options(wbits, group_size)
        if isinstance(n_salient, bool) or not 0 <= int(n_salient) <= in_features:
            raise ValueError(f"n_salient must be in 0..in_features={in_features}, got {n_salient!r}")
        self.n_salient = int(n_salient)
        if isinstance(abits, bool) or not 1 <= int(abits) <= 16:
            raise ValueError(f"abits must be in 1..16 (16: no activation quantization), got {abits!r}")
        self.abits = int(abits)
        n_bin = in_features - self.n_salient
        words = _C.packed_words(self.n_salient, self.wbits) if self.n_salient else 0
        groups = _salient_groups(self.n_salient, self.group_size)
        self.register_buffer("mask", torch.zeros((in_features + 7) // 8, dtype=torch.uint8))
        self.register_buffer("signs", torch.zeros(out_features, (n_bin + 7) // 8, dtype=torch.uint8))
        self.register_buffer("alpha", torch.ones(out_features, dtype=torch.float16))
        self.register_buffer("mu", torch.zeros(out_features, dtype=torch.float16))
        self.register_buffer("r1", torch.ones(out_features, dtype=torch.float16))
        self.register_buffer("r2", torch.ones(n_bin, dtype=torch.float16))
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float16))
        self._checked = False
        self._cache: Dict[str, Any] = {}
        self._warned_fallback = False

    @property
    def n_binary(self) -> int:
        return self.in_features - self.n_salient

    # -- construction -------------------------------------------------------
    @classmethod
    def from_parts(cls, mask: Any, signs: Any, alpha: Any, mu: Any, r1: Any, r2: Any,
                   codes: Any, scales: Any, zeros: Any, wbits: int, group_size: int,
                   bias: Optional[torch.Tensor] = None, abits: int = 16) -> "PTQ161QuantLinear":
        """A layer from unpacked parts: ``mask`` bool ``[in]``, ``signs`` bool ``[out, n_bin]``
        (True = +1), ``alpha``/``mu``/``r1`` ``[out]``, ``r2`` ``[n_bin]``, ``codes`` integer
        ``[out, n_sal]``, ``scales``/``zeros`` ``[out, groups]``; floats are stored as fp16.
        Validated."""
        def arr(a: Any, dtype: Any) -> np.ndarray:
            if isinstance(a, torch.Tensor):
                a = a.detach().cpu().numpy()
            return np.ascontiguousarray(np.asarray(a), dtype=dtype)

        m = arr(mask, bool)
        if m.ndim != 1 or m.size == 0:
            raise ValueError(f"mask must be a non-empty 1-D boolean array, got shape {m.shape}")
        s = arr(signs, bool)
        c = arr(codes, np.int64)
        if s.ndim != 2 or c.ndim != 2:
            raise ValueError(f"signs and codes must be 2-D, got shapes {s.shape} and {c.shape}")
        in_f, out_f, n_sal = m.size, s.shape[0], int(m.sum())
        if s.shape != (out_f, in_f - n_sal) or c.shape != (out_f, n_sal):
            raise ValueError(f"signs must have shape ({out_f}, {in_f - n_sal}) and codes ({out_f}, "
                             f"{n_sal}) for a mask of {n_sal} salient channels out of {in_f}, got "
                             f"{s.shape} and {c.shape}")
        wbits, group_size = check_uniform_options(wbits, group_size)
        if c.size and (c.min() < 0 or c.max() >= 1 << wbits):
            raise ValueError(f"codes must be in 0..{(1 << wbits) - 1} for wbits={wbits}")
        layer = cls(in_f, out_f, wbits, group_size, n_sal, bias=bias is not None, abits=abits,
                    bias_dtype=bias.dtype if bias is not None else torch.float32)
        layer.mask.copy_(torch.from_numpy(pack_bits(m)))
        layer.signs.copy_(torch.from_numpy(pack_bits(s).reshape(out_f, -1)))
        for name, a in (("alpha", alpha), ("mu", mu), ("r1", r1), ("r2", r2), ("scales", scales),
                        ("zeros", zeros)):
            buf = getattr(layer, name)
            v = arr(a, np.float32)
            if v.shape != tuple(buf.shape):
                raise ValueError(f"{name} must have shape {tuple(buf.shape)}, got {v.shape}")
            if not np.isfinite(v).all():
                raise ValueError(f"{name} has NaN or Inf values")
            buf.copy_(torch.from_numpy(v.astype(np.float16)))
        if n_sal:
            packed = _C.pack_codes32(c.astype(np.uint32), wbits)
            layer.qweight.copy_(torch.from_numpy(packed.view(np.int32)))
        if bias is not None:
            layer.bias.copy_(bias.detach().to("cpu"))
        layer.validate()
        return layer

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "PTQ161QuantLinear":
        try:
            return cls(int(cfg["in_features"]), int(cfg["out_features"]), int(cfg["wbits"]),
                       int(cfg.get("group_size", -1)), int(cfg["n_salient"]),
                       bool(cfg.get("bias", False)), int(cfg.get("abits", 16)))
        except KeyError as e:
            raise ValueError(f"quantized layer config lacks the key {e.args[0]!r}: {cfg}") from None

    def layer_config(self) -> Dict[str, Any]:
        cfg = super().layer_config()
        cfg.update(wbits=self.wbits, group_size=self.group_size, n_salient=self.n_salient,
                   abits=self.abits)
        return cfg

    # -- state ------------------------------------------------------------
    def salient_mask(self) -> torch.Tensor:
        """The mask as a bool tensor ``[in]`` (True = salient channel)."""
        return torch.from_numpy(unpack_bits(self.mask.detach().cpu().numpy(), self.in_features))

    def _operands(self) -> Tuple[np.ndarray, ...]:
        b = self._buffers
        bufs = [b[n] for n in self._BUFFERS]
        try:  # one pass over the version counters (inference tensors have none)
            key = (bufs, tuple([t._version for t in bufs]))
        except RuntimeError:
            key = (bufs, tuple(_version_of(t) for t in bufs))
        hit = self._cache.get("cpu")
        if hit is not None and hit[0][1] == key[1] and \
                all(x is y for x, y in zip(hit[0][0], bufs)):
            return hit[1]
        ops = []
        for n, b in zip(self._BUFFERS, bufs):
            t = b.detach().cpu()
            if n == "qweight":
                ops.append(_u32(t))
            elif t.dtype == torch.float16:
                ops.append(t.numpy().view(np.uint16))
            else:
                ops.append(t.numpy())
        ops_t = tuple(ops)
        self._cache["cpu"] = (key, ops_t)
        return ops_t

    def validate(self) -> None:
        n_bin = self.n_binary
        words = _C.packed_words(self.n_salient, self.wbits) if self.n_salient else 0
        groups = _salient_groups(self.n_salient, self.group_size)
        o = self.out_features
        expect = {"mask": (((self.in_features + 7) // 8,), torch.uint8),
                  "signs": ((o, (n_bin + 7) // 8), torch.uint8),
                  "alpha": ((o,), torch.float16), "mu": ((o,), torch.float16),
                  "r1": ((o,), torch.float16), "r2": ((n_bin,), torch.float16),
                  "qweight": ((o, words), torch.int32),
                  "scales": ((o, groups), torch.float16), "zeros": ((o, groups), torch.float16)}
        self._check_buffer_specs(expect)
        ops = self._operands()
        n_mask = int(np.unpackbits(ops[0]).sum())
        if n_mask != self.n_salient:
            raise ValueError(f"mask marks {n_mask} salient channels but the layer was built for "
                             f"n_salient={self.n_salient}")
        _C.check_ptq161(*ops, self.wbits, self.group_size, self.in_features)
        self._checked = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._checked = False
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    # -- math -------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        if not self._checked:
            self.validate()
        w = _C.ptq161_dequantize(*self._operands(), self.wbits, self.group_size, self.in_features)
        return torch.from_numpy(w).to(self.signs.device)

    def backend(self, device: torch.device) -> str:
        return "cuda-dequantize" if device.type == "cuda" else "cpu"

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device != self.signs.device:
            raise ValueError(f"input is on {x2.device} but the layer's buffers are on "
                             f"{self.signs.device}")
        if not self._checked:
            self.validate()
        if self.abits < 16:
            x2 = fake_quant_activations(x2.detach().to(torch.float32), self.abits)
        if x2.device.type != "cpu":
            if not self._warned_fallback:
                log.info("PTQ161QuantLinear(%dx%d): no %s kernel; dequantizing and using F.linear",
                         self.out_features, self.in_features, x2.device.type)
                self._warned_fallback = True
            return torch.nn.functional.linear(x2.to(torch.float32), self.dequantize().to(x2.device))
        xf = x2.detach().to(torch.float32).contiguous()
        ops = self._operands()
        hit = self._cache.get("handle")
        if hit is None or hit[0] is not ops:  # built once per set of buffers (validated there)
            hit = (ops, _C.Ptq161Handle(*ops, self.wbits, self.group_size, self.in_features))
            self._cache["handle"] = hit
        return torch.from_numpy(hit[1].matmul(xf.numpy()))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", wbits={self.wbits}, group_size={self.group_size}, "
                f"n_salient={self.n_salient}" + (f", abits={self.abits}" if self.abits < 16 else ""))
