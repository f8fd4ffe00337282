"""The vector-quantized layer format of VPTQ (``format = "vq"``).

State-dict keys are upstream VPTQ's, so a layer reads and writes its published
layout (docs/formats.md, "vq"); G = ``group_num``, B = log2 k + log2 k_res:

* ``indices`` int32 ``[G, ceil(out/v), ceil(group_size*B/32)]`` — one LSB-first
  stream of B-bit slots ``main | (res << log2 k)`` per group and vector row;
* ``centroids.weight`` ``[G, k*v]``, ``res_centroids.weight`` ``[G, k_res*v]``
  (fp16 or bf16, kept as stored);
* ``outlier_indices`` int16 ``[1, ceil(out/v_o), outlier_size]`` (read as uint16),
  ``outlier_centroids.weight`` ``[1, k_o*v_o]``;
* ``perm`` int16 ``[in]`` (read as uint16): position j holds column ``perm[j]``;
* ``weight_scale``, ``weight_bias`` ``[in]`` (``enable_norm``); ``bias`` ``[out]``.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import _C
from .nn import QuantLinearBase, register_format

__all__ = ["VQQuantLinear"]

log = logging.getLogger(__name__)

#: Batches of at most this many rows use the gather kernel; larger ones the tiled
#: dequantize + GEMM path of the same C++ module (GEMM throughput wins there).
GATHER_MAX_BATCH = 16


def _log2(k: int, what: str) -> int:
    if k < 2 or k > 65536 or k & (k - 1):
        raise ValueError(f"{what} must be a power of two in 2..65536 (indices are packed in "
                         f"log2(k) bits), got {k}")
    return k.bit_length() - 1


class _Codebook(nn.Module):
    """Holds one codebook as ``weight`` (upstream's nn.Embedding key), never dtype-converted."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(rows, cols, dtype=dtype))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "_Codebook":
        old = self._buffers["weight"]
        out = super()._apply(fn, *args, **kwargs)
        new = self._buffers["weight"]
        if new is not None and new.dtype != old.dtype:
            self._buffers["weight"] = old.to(device=new.device)
        return out


@register_format
class VQQuantLinear(QuantLinearBase):
    """A Linear stored as VPTQ vector codebooks (+ residual and outlier codebooks).

    Parameters
    ----------
    in_features, out_features : int
    vector_len : int
        v, outputs per vector (2..16).
    num_centroids : int
        k, a power of two (2..65536).
    num_res_centroids : int
        k_res, 0 (no residual) or a power of two.
    group_num : int
        Codebook groups of the non-outlier columns.
    group_size : int
        Columns per group (the last group may be shorter).
    outlier_size : int
        Leading permuted columns with their own codebook.
    outlier_vector_len, outlier_centroids : int
        v_o and k_o of the outlier codebook (0 without outliers).
    enable_perm, enable_norm : bool
        Whether ``perm`` and ``weight_scale``/``weight_bias`` are stored.
    bias : bool
    codebook_dtype : torch.dtype
        fp16 (default) or bf16.
    """

    format = "vq"
    layer_params: ClassVar[Mapping[str, type]] = {
        "vector_len": int, "num_centroids": int, "num_res_centroids": int, "group_num": int,
        "group_size": int, "outlier_size": int, "outlier_vector_len": int,
        "outlier_centroids": int, "enable_perm": bool, "enable_norm": bool}
    _FIXED_DTYPE_BUFFERS = ("weight_scale", "weight_bias")

    def __init__(self, in_features: int, out_features: int, vector_len: int = 8,
                 num_centroids: int = 4096, num_res_centroids: int = 0, group_num: int = 1,
                 group_size: int = -1, outlier_size: int = 0, outlier_vector_len: int = 0,
                 outlier_centroids: int = 0, enable_perm: bool = True, enable_norm: bool = False,
                 bias: bool = True, bias_dtype: torch.dtype = torch.float32,
                 codebook_dtype: torch.dtype = torch.float16) -> None:
        super().__init__(in_features, out_features, bias, bias_dtype)
        if not 2 <= vector_len <= 16:
            raise ValueError(f"vector_len must be in 2..16, got {vector_len}")
        self.vector_len, self.num_centroids = int(vector_len), int(num_centroids)
        self.num_res_centroids = int(num_res_centroids)
        self.main_bits = _log2(self.num_centroids, "num_centroids")
        self.res_bits = (0 if self.num_res_centroids in (0, -1)
                         else _log2(self.num_res_centroids, "num_res_centroids"))
        if self.num_res_centroids == -1:
            self.num_res_centroids = 0
        if not 0 <= outlier_size < in_features:
            raise ValueError(f"outlier_size must be in 0..in_features-1, got {outlier_size}")
        if group_num < 1:
            raise ValueError(f"group_num must be >= 1, got {group_num}")
        rest = in_features - outlier_size
        if group_size == -1:
            group_size = -(-rest // group_num)
        if group_size < 1 or (group_num - 1) * group_size >= rest or group_num * group_size < rest:
            raise ValueError(f"{group_num} groups of {group_size} columns do not cover the {rest} "
                             "non-outlier columns")
        self.group_num, self.group_size = int(group_num), int(group_size)
        self.outlier_size = int(outlier_size)
        self.outlier_vector_len = int(outlier_vector_len) if outlier_size else 0
        self.outlier_centroids_n = int(outlier_centroids) if outlier_size else 0
        if outlier_size and not (2 <= self.outlier_vector_len <= 16 and
                                 1 <= self.outlier_centroids_n <= 65536):
            raise ValueError("outliers need outlier_vector_len in 2..16 and outlier_centroids in "
                             f"1..65536, got {outlier_vector_len}, {outlier_centroids}")
        if enable_perm and in_features > 65536:
            raise ValueError("perm is stored as int16: in_features must be <= 65536")
        self.enable_perm, self.enable_norm = bool(enable_perm), bool(enable_norm)
        v, k = self.vector_len, self.num_centroids
        rows = -(-out_features // v)
        words = -(-self.group_size * self.index_bits // 32)
        self.register_buffer("indices", torch.zeros(self.group_num, rows, words, dtype=torch.int32))
        self.centroids = _Codebook(self.group_num, k * v, codebook_dtype)
        self.res_centroids = (_Codebook(self.group_num, self.num_res_centroids * v, codebook_dtype)
                              if self.num_res_centroids else None)
        if self.outlier_size:
            vo = self.outlier_vector_len
            self.register_buffer("outlier_indices", torch.zeros(
                1, -(-out_features // vo), self.outlier_size, dtype=torch.int16))
            self.outlier_centroids = _Codebook(1, self.outlier_centroids_n * vo, codebook_dtype)
        else:
            self.outlier_indices = None
            self.outlier_centroids = None
        if self.enable_perm:
            self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32)
                                 .to(torch.int16))
        else:
            self.perm = None
        if self.enable_norm:
            self.register_buffer("weight_scale", torch.ones(in_features, dtype=codebook_dtype))
            self.register_buffer("weight_bias", torch.zeros(in_features, dtype=codebook_dtype))
        else:
            self.weight_scale = self.weight_bias = None
        self._cache: Dict[str, Any] = {}
        self._checked = False
        self._warned_fallback = False

    @property
    def index_bits(self) -> int:
        return self.main_bits + self.res_bits

    # -- construction -------------------------------------------------------
    @classmethod
    def from_result(cls, res: Dict[str, Any], in_features: int, out_features: int, v: int,
                    k: int, k_res: int, group_num: int, v_out: int = 0, k_out: int = 0,
                    enable_perm: bool = True, enable_norm: bool = False,
                    bias: Optional[torch.Tensor] = None) -> "VQQuantLinear":
        """A layer from the dict :func:`sqllm._C.vptq_quantize` returns (unpacked indices)."""
        outlier = 0 if res["outlier_idx"] is None else int(res["outlier_idx"].shape[1])
        layer = cls(in_features, out_features, v, k, k_res, group_num, int(res["group_size"]),
                    outlier, v_out, k_out, enable_perm, enable_norm, bias=bias is not None,
                    bias_dtype=bias.dtype if bias is not None else torch.float32)
        slots = res["main_idx"].astype(np.uint32)
        if k_res:
            slots = slots | (res["res_idx"].astype(np.uint32) << np.uint32(layer.main_bits))
        G, rows, gs = slots.shape
        packed = _C.pack_codes32(slots.reshape(G * rows, gs), layer.index_bits)
        layer.indices.copy_(torch.from_numpy(packed.view(np.int32).reshape(G, rows, -1)))
        cb = layer.centroids.weight
        layer.centroids.weight.copy_(torch.from_numpy(res["centroids"]).to(cb.dtype))
        if k_res:
            layer.res_centroids.weight.copy_(torch.from_numpy(res["res_centroids"]).to(cb.dtype))
        if outlier:
            layer.outlier_indices.copy_(torch.from_numpy(
                res["outlier_idx"].astype(np.uint16).view(np.int16))[None])
            layer.outlier_centroids.weight.copy_(
                torch.from_numpy(res["outlier_centroids"]).to(cb.dtype))
        if enable_perm:
            layer.perm.copy_(torch.from_numpy(res["perm"].astype(np.uint16).view(np.int16)))
        if enable_norm:
            layer.weight_scale.copy_(torch.from_numpy(res["scale"]).to(cb.dtype))
            layer.weight_bias.copy_(torch.from_numpy(res["bias"]).to(cb.dtype))
        if bias is not None:
            layer.bias.copy_(bias.detach().to("cpu"))
        layer.validate()
        return layer

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "VQQuantLinear":
        try:
            return cls(int(cfg["in_features"]), int(cfg["out_features"]), int(cfg["vector_len"]),
                       int(cfg["num_centroids"]), int(cfg.get("num_res_centroids", 0)),
                       int(cfg.get("group_num", 1)), int(cfg.get("group_size", -1)),
                       int(cfg.get("outlier_size", 0)), int(cfg.get("outlier_vector_len", 0)),
                       int(cfg.get("outlier_centroids", 0)), bool(cfg.get("enable_perm", False)),
                       bool(cfg.get("enable_norm", False)), bool(cfg.get("bias", False)))
        except KeyError as e:
            raise ValueError(f"quantized layer config lacks the key {e.args[0]!r}: {cfg}") from None

    def layer_config(self) -> Dict[str, Any]:
        cfg = super().layer_config()
        cfg.update(vector_len=self.vector_len, num_centroids=self.num_centroids,
                   num_res_centroids=self.num_res_centroids, group_num=self.group_num,
                   group_size=self.group_size, outlier_size=self.outlier_size,
                   outlier_vector_len=self.outlier_vector_len,
                   outlier_centroids=self.outlier_centroids_n, enable_perm=self.enable_perm,
                   enable_norm=self.enable_norm)
        return cfg

    # -- state ------------------------------------------------------------
    def _buffer_list(self) -> Tuple[Optional[torch.Tensor], ...]:
        return (self.indices, self.centroids.weight,
                None if self.res_centroids is None else self.res_centroids.weight,
                self.outlier_indices,
                None if self.outlier_centroids is None else self.outlier_centroids.weight,
                self.perm, self.weight_scale, self.weight_bias)

    def _operands(self) -> Tuple[Any, ...]:
        """The arguments of _C.vq_dequantize/vq_matmul (fp32 codebooks; cached per buffer version)."""
        bufs = self._buffer_list()
        key = tuple((id(b), b._version) if b is not None else None for b in bufs)
        hit = self._cache.get("cpu")
        if hit is not None and hit[0] == key:
            return hit[1]

        def f32(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
            return None if t is None else t.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1)

        idx, cb, rcb, oidx, ocb, perm, sc, bi = bufs
        ops = (self.out_features, self.in_features, self.vector_len, self.num_centroids,
               self.num_res_centroids, self.group_num, self.group_size,
               idx.detach().cpu().contiguous().numpy().view(np.uint32), f32(cb), f32(rcb),
               self.outlier_size, self.outlier_vector_len, self.outlier_centroids_n,
               None if oidx is None else oidx.detach().cpu().contiguous().numpy().view(np.uint16).reshape(-1),
               f32(ocb),
               None if perm is None else perm.detach().cpu().numpy().view(np.uint16).astype(np.int32),
               f32(sc), f32(bi))
        self._cache["cpu"] = (key, ops)
        return ops

    def validate(self) -> None:
        v, vo = self.vector_len, self.outlier_vector_len
        fdt = (torch.float16, torch.bfloat16, torch.float32)
        expect: Dict[str, Tuple[Tuple[int, ...], Tuple[torch.dtype, ...]]] = {
            "indices": ((self.group_num, -(-self.out_features // v),
                         -(-self.group_size * self.index_bits // 32)), (torch.int32,)),
            "centroids.weight": ((self.group_num, self.num_centroids * v), fdt)}
        if self.res_centroids is not None:
            expect["res_centroids.weight"] = ((self.group_num, self.num_res_centroids * v), fdt)
        if self.outlier_size:
            expect["outlier_indices"] = ((1, -(-self.out_features // vo), self.outlier_size),
                                         (torch.int16,))
            expect["outlier_centroids.weight"] = ((1, self.outlier_centroids_n * vo), fdt)
        if self.enable_perm:
            expect["perm"] = ((self.in_features,), (torch.int16,))
        if self.enable_norm:
            expect["weight_scale"] = ((self.in_features,), fdt)
            expect["weight_bias"] = ((self.in_features,), fdt)
        for name, (shape, dtypes) in expect.items():
            t = self.get_buffer(name)
            if tuple(t.shape) != shape or t.dtype not in dtypes:
                raise ValueError(f"vq layer: {name} must be {'/'.join(map(str, dtypes))} of shape "
                                 f"{shape}, got {t.dtype} of shape {tuple(t.shape)}")
        # The C++ view check: perm a permutation, outlier indices < k_o, finite codebooks.
        _C.vq_matmul(np.zeros((0, self.in_features), np.float32), *self._operands())
        self._checked = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._checked = False
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def bits_per_weight(self) -> float:
        return self.storage_bits() / float(self.in_features * self.out_features)

    # -- math -------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        w = _C.vq_dequantize(*self._operands())
        return torch.from_numpy(w).to(self.indices.device)

    def backend(self, device: torch.device) -> str:
        if device.type != "cuda":
            return "cpu"
        from . import kernels_cuda_vq

        return "cuda" if kernels_cuda_vq.available() else "cuda-dequantize (no CUDA VQ kernels built)"

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device != self.indices.device:
            raise ValueError(f"input is on {x2.device} but the layer's buffers are on "
                             f"{self.indices.device}")
        if not self._checked:
            self.validate()
        if x2.device.type == "cuda":
            from . import kernels_cuda_vq

            if kernels_cuda_vq.available():
                if x2.shape[0] <= kernels_cuda_vq.GEMV_MAX_BATCH:
                    # fp32 in and out: the bias is added and the result rounded once by forward()
                    return kernels_cuda_vq.vq_matmul(x2.to(torch.float32), self)
                dt = x2.dtype
                key = tuple((id(b), b._version) if b is not None else None
                            for b in self._buffer_list()) + (str(x2.device), dt)
                hit = self._cache.get("cuda_dense")
                if hit is not None and hit[0] == key:
                    w = hit[1]
                else:  # decoded on the GPU once per device, dtype and buffer version
                    w = kernels_cuda_vq.vq_dequantize(self, dt, x2.device)
                    self._cache["cuda_dense"] = (key, w)
                return torch.nn.functional.linear(x2, w)
        if x2.device.type != "cpu":
            if not self._warned_fallback:
                log.info("VQQuantLinear(%dx%d): no %s kernel for the vq format; dequantizing and "
                         "using F.linear", self.out_features, self.in_features, x2.device.type)
                self._warned_fallback = True
            key = tuple((id(b), b._version) if b is not None else None for b in self._buffer_list())
            hit = self._cache.get("dense")
            if hit is not None and hit[0] == key and hit[1].device == x2.device:
                w = hit[1]
            else:  # rebuilt after .to() or an in-place change of a buffer
                w = self.dequantize().to(x2.device)
                self._cache["dense"] = (key, w)
            return torch.nn.functional.linear(x2.to(torch.float32), w)
        xf = x2.detach().to(torch.float32).contiguous()
        # Small batches gather codebook vectors; larger ones decode tiles of W and use a GEMM.
        y = _C.vq_matmul(xf.numpy(), *self._operands(), 0, False, xf.shape[0] > GATHER_MAX_BATCH)
        return torch.from_numpy(y)

    def extra_repr(self) -> str:
        s = (super().extra_repr() + f", v={self.vector_len}, k={self.num_centroids}"
             f", k_res={self.num_res_centroids}, groups={self.group_num}")
        if self.outlier_size:
            s += (f", outliers={self.outlier_size} (v={self.outlier_vector_len}, "
                  f"k={self.outlier_centroids_n})")
        return s + f", perm={self.enable_perm}, norm={self.enable_norm}"
