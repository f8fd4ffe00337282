"""The CUDA kernels of the ``glut`` format (cuda/sqllm_cuda_glut.h) for :class:`GlutQuantLinear`.

* :func:`glut_matmul` -- the fused GEMV ``x Ŵᵀ`` for small batches (codes, uint8
  tables and fp16 scale/offset decoded in registers; the weight is never
  materialised);
* :func:`glut_dequantize` -- the dense weight on the device (fp32: the CPU
  ``dequantize()`` bit for bit; fp16/bf16: those values rounded once), for a
  cuBLAS GEMM (``F.linear``) above :data:`GEMV_MAX_BATCH` rows.

The kernels read the layer's buffers as they are (``qweight`` int32 as uint32
words, ``tables`` uint8, ``scales``/``offsets`` float16 as their bits): nothing is
converted or cached.  The buffers' contents are validated on the host once
(``GlutQuantLinear.validate``); the kernels check shapes and arguments.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from . import _C

__all__ = ["available", "glut_matmul", "glut_dequantize", "GEMV_MAX_BATCH"]

#: Batches up to this many rows run the fused GEMV; larger ones dequantize + GEMM.
GEMV_MAX_BATCH: int = int(getattr(_C, "cuda_glut_gemv_max_batch", 8))

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def available() -> bool:
    """Whether the CUDA glut kernels were compiled in and a CUDA device is visible."""
    return (bool(_C.cuda_compiled()) and hasattr(_C, "cuda_glut_matmul")
            and torch.cuda.is_available())


def _layer_args(layer: Any, device: torch.device) -> Dict[str, Any]:
    bufs = {name: getattr(layer, name) for name in ("qweight", "tables", "scales", "offsets")}
    for name, t in bufs.items():
        if t.device != device:
            raise ValueError(f"the layer's {name} is on {t.device}, not on {device}")
        if not t.is_contiguous():
            raise ValueError(f"the layer's {name} must be contiguous")
    return dict(qweight=bufs["qweight"].data_ptr(), tables=bufs["tables"].data_ptr(),
                scales=bufs["scales"].data_ptr(), offsets=bufs["offsets"].data_ptr(),
                out_features=layer.out_features, in_features=layer.in_features,
                bits=layer.bits, group_size=layer.group_size)


def glut_matmul(x: torch.Tensor, layer: Any) -> torch.Tensor:
    """``x Ŵᵀ`` by the fused GEMV, in ``x``'s dtype (fp32 accumulation, one rounding).
    ``x``: (batch, in_features) float16/bfloat16/float32 on the layer's CUDA device."""
    if not available():
        raise RuntimeError("the CUDA glut kernels are not available (sqllm built without CUDA, "
                           "or no CUDA device)")
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        raise ValueError(f"x must be a tensor on a CUDA device, got "
                         f"{x.device if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"x must have shape (batch, {layer.in_features}), got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    args = _layer_args(layer, x.device)
    y = torch.empty(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        _C.cuda_glut_matmul(x.data_ptr(), y.data_ptr(), x.shape[0], x.stride(0), _DTYPES[x.dtype],
                            **args, stream=torch.cuda.current_stream(x.device).cuda_stream)
    return y


def glut_dequantize(layer: Any, dtype: torch.dtype = torch.float32,
                    device: Any = None) -> torch.Tensor:
    """The dense weight ``(out, in)`` of ``dtype``, decoded on the layer's CUDA device."""
    device = torch.device(device) if device is not None else layer.qweight.device
    if not available():
        raise RuntimeError("the CUDA glut kernels are not available (sqllm built without CUDA, "
                           "or no CUDA device)")
    if device.type != "cuda":
        raise ValueError(f"glut_dequantize needs a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    args = _layer_args(layer, device)
    w = torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=device)
    with torch.cuda.device(device):
        _C.cuda_glut_dequantize(w.data_ptr(), _DTYPES[dtype], **args,
                                stream=torch.cuda.current_stream(device).cuda_stream)
    return w
