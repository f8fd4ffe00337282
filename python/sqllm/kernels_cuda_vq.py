"""The CUDA kernels of the ``vq`` format (cuda/sqllm_cuda_vq.h) for :class:`VQQuantLinear`.

* :func:`vq_matmul` -- the fused gather GEMV ``x Wᵀ`` for small batches (the weight is
  never materialised; perm and norm are folded into the staged activation);
* :func:`vq_dequantize` -- the dense weight on the device, for a cuBLAS GEMM
  (``F.linear``) above :data:`GEMV_MAX_BATCH` rows.

The layer's buffers are converted once per device and buffer version (codebooks,
scales to float32, ``perm`` int16 -> int32) and cached on the layer.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from . import _C

__all__ = ["available", "vq_matmul", "vq_dequantize", "GEMV_MAX_BATCH"]

#: Batches up to this many rows run the fused GEMV; larger ones dequantize once + GEMM.
GEMV_MAX_BATCH: int = int(getattr(_C, "cuda_vq_gemv_max_batch", 8))

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def available() -> bool:
    """Whether the CUDA VQ kernels were compiled in and a CUDA device is visible."""
    return (bool(_C.cuda_compiled()) and hasattr(_C, "cuda_vq_matmul")
            and torch.cuda.is_available())


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else int(t.data_ptr())


def _operands(layer: Any, device: torch.device) -> Dict[str, Any]:
    """The layer's buffers on ``device`` in the kernels' types (cached per buffer version)."""
    bufs = layer._buffer_list()
    key = (str(device),) + tuple((id(b), b._version) if b is not None else None for b in bufs)
    hit = layer._cache.get("cuda_ops")
    if hit is not None and hit[0] == key:
        return hit[1]
    idx, cb, rcb, oidx, ocb, perm, sc, bi = bufs

    def f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().to(device=device, dtype=torch.float32).contiguous()

    ops = {
        "indices": idx.detach().to(device).contiguous(),
        "centroids": f32(cb), "res_centroids": f32(rcb),
        "outlier_indices": None if oidx is None else oidx.detach().to(device).contiguous(),
        "outlier_centroids": f32(ocb),
        # int16 read as uint16 (upstream), widened to int32 for the kernel
        "perm": None if perm is None else (perm.detach().to(device).to(torch.int32) & 0xFFFF).contiguous(),
        "weight_scale": f32(sc), "weight_bias": f32(bi),
    }
    layer._cache["cuda_ops"] = (key, ops)
    return ops


def _weight_args(layer: Any, ops: Dict[str, Any]) -> Dict[str, Any]:
    return dict(in_features=layer.in_features, out_features=layer.out_features,
                v=layer.vector_len, k=layer.num_centroids, k_res=layer.num_res_centroids,
                group_num=layer.group_num, group_size=layer.group_size,
                indices=_ptr(ops["indices"]), centroids=_ptr(ops["centroids"]),
                res_centroids=_ptr(ops["res_centroids"]), outlier_size=layer.outlier_size,
                v_out=layer.outlier_vector_len, k_out=layer.outlier_centroids_n,
                outlier_indices=_ptr(ops["outlier_indices"]),
                outlier_centroids=_ptr(ops["outlier_centroids"]), perm=_ptr(ops["perm"]),
                weight_scale=_ptr(ops["weight_scale"]), weight_bias=_ptr(ops["weight_bias"]))


def _check(x: torch.Tensor, layer: Any) -> None:
    if not available():
        raise RuntimeError("the CUDA VQ kernels are not available (sqllm built without CUDA, "
                           "or no CUDA device)")
    if x.device.type != "cuda":
        raise ValueError(f"x must be on a CUDA device, got {x.device}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"x must have shape (batch, {layer.in_features}), got {tuple(x.shape)}")


def vq_matmul(x: torch.Tensor, layer: Any, bias: bool = False) -> torch.Tensor:
    """``x Wᵀ`` (+ the layer's bias with ``bias=True``) by the fused GEMV, in ``x``'s dtype.
    ``x``: (batch, in) on the layer's CUDA device, unit stride along ``in``."""
    _check(x, layer)
    if x.stride(1) != 1:
        x = x.contiguous()
    ops = _operands(layer, x.device)
    y = torch.empty(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    b = None
    if bias and layer.bias is not None:
        b = layer.bias.detach().to(device=x.device, dtype=torch.float32).contiguous()
    with torch.cuda.device(x.device):
        _C.cuda_vq_matmul(_ptr(x), _ptr(y), x.shape[0], x.stride(0), _ptr(b), _DTYPES[x.dtype],
                          **_weight_args(layer, ops),
                          stream=torch.cuda.current_stream(x.device).cuda_stream)
    return y


def vq_dequantize(layer: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The dense weight ``(out, in)`` of ``dtype`` on ``device``, decoded on the GPU."""
    device = torch.device(device)
    if not available() or device.type != "cuda":
        raise RuntimeError("vq_dequantize needs the CUDA VQ kernels and a CUDA device")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    ops = _operands(layer, device)
    w = torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=device)
    with torch.cuda.device(device):
        _C.cuda_vq_dequantize(_ptr(w), _DTYPES[dtype], **_weight_args(layer, ops),
                              stream=torch.cuda.current_stream(device).cuda_stream)
    return w
