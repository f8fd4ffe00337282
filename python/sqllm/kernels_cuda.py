"""CUDA LUT kernels on torch tensors.

Thin wrapper over ``sqllm._C.cuda_lut_matmul`` / ``cuda_dequantize`` (the
framework-free library ``cuda/sqllm_cuda.h``): checks devices, dtypes, shapes
and contiguity, launches on the current CUDA stream of the input's device,
and returns new tensors.

Formats (docs/formats.md): ``codes`` is an int32 tensor ``[out, W]`` holding
the packed uint32 words bit for bit, ``W = ceil(in * bits / 32)``; ``tables``
is float32 ``[out, 2**bits]`` (row grouping) or ``[in, 2**bits]`` (column
grouping); the optional Dense-and-Sparse part is a CSR tuple
``(row_ptr int32 [out+1], col_idx int32 [nnz], values float16 [nnz])``.

Precision modes of :func:`lut_matmul_cuda`:

``"fast"`` (default)
    The tuned kernel (bits 2-4, float16/bfloat16/float32 activations, batch
    <= 16): fp32 FMA accumulation in an unspecified order, one rounding to
    the output type.  Larger batches dequantize the weight to ``x.dtype`` and
    call ``torch.matmul`` (cuBLAS).  Other widths use the exact kernel in
    fp32.
``"fp32"``, ``"fp16"``, ``"emulated"``
    The reproducible kernel: bit for bit equal to the CPU reference
    ``sqllm._C.lut_matmul_reference`` (same arithmetic, same summation order;
    see ``include/sqllm/float_emu.hpp``).  ``emu = (mul_exp, mul_man,
    acc_exp, acc_man)`` sets the formats of the emulated multiply and
    accumulate; it is used by ``"emulated"`` only.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "FAST_KERNELS",
    "FAST_MAX_BATCH",
    "LutMatmulPlan",
    "PRECISIONS",
    "cuda_compiled",
    "dequantize_cuda",
    "lut_matmul_cuda",
]

#: Largest batch (rows of x) that the fast kernel handles; above it
#: ``precision="fast"`` dequantizes and uses torch.matmul.
FAST_MAX_BATCH = 16
#: Accepted values of ``precision``.
PRECISIONS = ("fast", "fp32", "fp16", "emulated")
#: Accepted values of ``kernel`` (which fast kernel; see :func:`lut_matmul_cuda`).
FAST_KERNELS = ("auto", "tiled", "warp")

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_GROUP_AXES = ("row", "column")
CsrTuple = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_NO_SWITCH = contextlib.nullcontext()


def _module():
    from . import _C

    return _C


def cuda_compiled() -> bool:
    """True when ``sqllm._C`` was built with the CUDA kernels."""
    return bool(_module().cuda_compiled())


def _require_cuda_build():
    C = _module()
    if not C.cuda_compiled():
        raise RuntimeError(
            "sqllm was built without CUDA kernels (nvcc was not found when the package was "
            "built); reinstall with the CUDA toolkit on PATH (SQLLM_CUDA=ON forces it)")
    return C


def _check_tensor(t, name: str, dtypes, shape, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of x), got {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() once when loading)")


def _check_common(codes, tables, bits, in_features, out_features, group_axis, csr,
                  device: torch.device):
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if group_axis not in _GROUP_AXES:
        raise ValueError(f"group_axis must be 'row' or 'column', got {group_axis!r}")
    words = (in_features * bits + 31) // 32
    _check_tensor(codes, "codes", (torch.int32,), (out_features, words), device)
    groups = out_features if group_axis == "row" else in_features
    _check_tensor(tables, "tables", (torch.float32,), (groups, 2 ** bits), device)
    if csr is None:
        return (0, 0, 0, 0)
    if not isinstance(csr, (tuple, list)) or len(csr) != 3:
        raise TypeError("csr must be a tuple (row_ptr, col_idx, values) or None")
    row_ptr, col_idx, values = csr
    _check_tensor(row_ptr, "csr row_ptr", (torch.int32,), (out_features + 1,), device)
    _check_tensor(col_idx, "csr col_idx", (torch.int32,), None, device)
    if col_idx.dim() != 1:
        raise ValueError(f"csr col_idx must be 1-D, got shape {tuple(col_idx.shape)}")
    _check_tensor(values, "csr values", (torch.float16,), (col_idx.shape[0],), device)
    nnz = int(col_idx.shape[0])
    if nnz == 0:
        return (0, 0, 0, 0)
    return (row_ptr.data_ptr(), col_idx.data_ptr(), values.data_ptr(), nnz)


def dequantize_cuda(codes: torch.Tensor, tables: torch.Tensor, bits: int, in_features: int,
                    out_features: int, group_axis: str = "row", csr: Optional[CsrTuple] = None,
                    dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dense weight ``W[out, in]`` of ``dtype`` from packed codes and tables.

    With ``csr`` the sparse values are added (the sum is formed in fp32 and
    rounded once; column indices within a row must be distinct, as in a
    canonical CSR).  Runs on the current stream of ``codes.device``.
    """
    C = _require_cuda_build()
    if not isinstance(codes, torch.Tensor) or codes.device.type != "cuda":
        raise ValueError("codes must be a CUDA tensor, got "
                         f"{codes.device if isinstance(codes, torch.Tensor) else type(codes)}")
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    device = codes.device
    sp = _check_common(codes, tables, bits, in_features, out_features, group_axis, csr, device)
    w = torch.empty((out_features, in_features), dtype=dtype, device=device)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        C.cuda_dequantize(codes.data_ptr(), tables.data_ptr(), in_features, out_features, bits,
                          group_axis == "column", sp[0], sp[1], sp[2], sp[3], w.data_ptr(),
                          _DTYPE_NAMES[dtype], stream)
    return w


def lut_matmul_cuda(x: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, bits: int,
                    in_features: int, out_features: int, group_axis: str = "row",
                    csr: Optional[CsrTuple] = None, precision: str = "fast",
                    emu: Sequence[int] = (5, 10, 8, 23),
                    out_dtype: Optional[torch.dtype] = None,
                    kernel: str = "auto") -> torch.Tensor:
    """``y = x @ W.T`` (+ the CSR part) straight from packed codes on the GPU.

    Parameters
    ----------
    x : torch.Tensor (..., in_features)
        float16, bfloat16 or float32 CUDA tensor; any leading shape, any
        strides (copied only when its last dimension is not contiguous).
    codes : torch.Tensor (out_features, W) int32
        Packed codes (uint32 words stored bit for bit).
    tables : torch.Tensor float32
        (out_features, 2**bits) for ``group_axis="row"``, (in_features,
        2**bits) for ``"column"``.
    bits, in_features, out_features : int
    group_axis : {"row", "column"}
    csr : tuple (row_ptr int32, col_idx int32, values float16), optional
        Dense-and-Sparse outliers, CSR over (out_features, in_features).
    precision : {"fast", "fp32", "fp16", "emulated"}
        See the module docstring.
    emu : (mul_exp, mul_man, acc_exp, acc_man)
        Formats of ``precision="emulated"`` (exponent 2..8, mantissa 0..23 bits).
    out_dtype : torch.dtype, optional
        Dtype of the result (default: ``x.dtype``); the kernel computes in
        ``x.dtype`` and the result is converted.
    kernel : {"auto", "tiled", "warp"}
        Which fast kernel ``precision="fast"`` uses for batches <= 16:
        "auto" takes the warp kernel (row grouping, in % 32 == 0, 16-byte
        aligned x rows) for batches <= 4 where it applies, else the tiled
        one (the faster choice on an H200, docs/benchmarks.md).  Forcing one is
        for benchmarks and tests; a forced kernel that does not apply raises
        ValueError.  Both sum in the same order.

    Returns
    -------
    torch.Tensor (..., out_features)
    """
    _require_cuda_build()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cuda":
        raise ValueError(f"x must be a CUDA tensor, got device {x.device}")
    if x.dtype not in _DTYPE_NAMES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., in_features={in_features}), "
                         f"got {tuple(x.shape)}")
    plan = LutMatmulPlan(codes, tables, bits, in_features, out_features, group_axis, csr,
                         device=x.device)
    lead = tuple(x.shape[:-1])
    y = plan(x.reshape(-1, in_features), precision=precision, emu=emu, out_dtype=out_dtype,
             kernel=kernel)
    return y.reshape(lead + (out_features,))


class LutMatmulPlan:
    """The validated, fixed arguments of :func:`lut_matmul_cuda` for one layer.

    Construction checks the codes, tables and CSR once (devices, dtypes,
    shapes, contiguity) and keeps references to them; calling the plan on a
    2-D activation ``x2 (N, in_features)`` then only checks ``x2`` and
    launches.  ``QuantLinear`` keeps one per layer so that a decode step pays
    for the launch, not for re-validating its buffers.  ``device`` defaults
    to the device of ``codes``; every tensor must be on it.
    """

    __slots__ = ("_C", "device", "bits", "in_features", "out_features", "group_axis",
                 "codes", "tables", "csr", "_sp")

    def __init__(self, codes: torch.Tensor, tables: torch.Tensor, bits: int, in_features: int,
                 out_features: int, group_axis: str = "row", csr: Optional[CsrTuple] = None,
                 device: Optional[torch.device] = None) -> None:
        self._C = _require_cuda_build()
        if device is None:
            if not isinstance(codes, torch.Tensor) or codes.device.type != "cuda":
                raise ValueError("codes must be a CUDA tensor, got "
                                 f"{codes.device if isinstance(codes, torch.Tensor) else type(codes)}")
            device = codes.device
        self.device = torch.device(device)
        self._sp = _check_common(codes, tables, bits, in_features, out_features, group_axis, csr,
                                 self.device)
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.group_axis = group_axis
        self.codes, self.tables = codes, tables
        self.csr = csr if self._sp[3] > 0 else None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_cuda(self.codes, self.tables, self.bits, self.in_features,
                               self.out_features, self.group_axis, self.csr, dtype=dtype)

    def __call__(self, x2: torch.Tensor, precision: str = "fast",
                 emu: Sequence[int] = (5, 10, 8, 23),
                 out_dtype: Optional[torch.dtype] = None,
                 kernel: str = "auto") -> torch.Tensor:
        """``x2 (N, in_features)`` -> ``(N, out_features)``; see :func:`lut_matmul_cuda`."""
        if not isinstance(x2, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x2).__name__}")
        if x2.device != self.device:
            raise ValueError(f"x must be on {self.device} (the device of codes), got {x2.device}")
        if x2.dtype not in _DTYPE_NAMES:
            raise TypeError(f"x must be float16, bfloat16 or float32, got {x2.dtype}")
        if x2.dim() != 2 or x2.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (N, in_features={self.in_features}), "
                             f"got {tuple(x2.shape)}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if kernel not in FAST_KERNELS:
            raise ValueError(f"kernel must be one of {FAST_KERNELS}, got {kernel!r}")
        if kernel != "auto" and precision != "fast":
            raise ValueError(f"kernel={kernel!r} selects a fast kernel; it needs precision='fast', "
                             f"got {precision!r}")
        emu = tuple(emu)
        if len(emu) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in emu):
            raise ValueError(f"emu must be 4 ints (mul_exp, mul_man, acc_exp, acc_man), got {emu!r}")
        if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
            raise TypeError(f"out_dtype must be a torch.dtype or None, got {out_dtype!r}")
        batch = int(x2.shape[0])
        result_dtype = out_dtype or x2.dtype
        if batch == 0:
            return torch.empty((0, self.out_features), dtype=result_dtype, device=self.device)

        if precision == "fast" and batch > FAST_MAX_BATCH and kernel == "auto":
            y = torch.matmul(x2, self.dequantize(x2.dtype).t())
            return y if y.dtype == result_dtype else y.to(result_dtype)

        if x2.stride(-1) != 1 or (batch > 1 and x2.stride(0) < self.in_features):
            x2 = x2.contiguous()
        x_stride = int(x2.stride(0)) if batch > 1 else self.in_features
        y = torch.empty((batch, self.out_features), dtype=x2.dtype, device=self.device)
        sp = self._sp
        # Launch on x's device (switching only when it is not the current one)
        # and on that device's current stream.
        switch = self.device.index is not None and self.device.index != torch.cuda.current_device()
        with torch.cuda.device(self.device) if switch else _NO_SWITCH:
            stream = torch.cuda.current_stream(self.device).cuda_stream
            self._C.cuda_lut_matmul(
                x2.data_ptr(), y.data_ptr(), batch, self.in_features, self.out_features, x_stride,
                self.bits, self.codes.data_ptr(), self.tables.data_ptr(),
                self.group_axis == "column", sp[0], sp[1], sp[2], sp[3], _DTYPE_NAMES[x2.dtype],
                "fp32" if precision == "fast" else precision, emu[0], emu[1], emu[2], emu[3],
                precision != "fast", stream, kernel)
        return y if y.dtype == result_dtype else y.to(result_dtype)
