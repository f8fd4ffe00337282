"""Quantization methods, by name.

A method turns one ``nn.Linear`` (plus statistics gathered once per model) into
a layer of the QuantLinear family.  New methods (VPTQ, PTQ1.61, GPTQ, ...)
register with :func:`register_method` and are then reachable through
``sqllm.quantize(model, method=...)`` and the CLI.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

import numpy as np
import torch
from torch import nn

from .nn import QuantLinear, QuantLinearBase, _check_axis, _check_bits
from .nn_uniform import UniformQuantLinear, check_uniform_options

__all__ = ["QuantMethod", "METHODS", "register_method", "get_method", "SqueezeLLM", "RTN", "GPTQ"]

log = logging.getLogger(__name__)

METHODS: Dict[str, Type["QuantMethod"]] = {}


def register_method(cls: Type["QuantMethod"]) -> Type["QuantMethod"]:
    """Class decorator: make a method reachable by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Type["QuantMethod"]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


@dataclasses.dataclass
class QuantMethod:
    """Base of all methods.  Options are dataclass fields (documented defaults).

    Subclasses set ``name``, declare the statistics they need in ``stats`` (names
    of collectors in :data:`sqllm.calib.COLLECTORS`: ``"hessian"``, ``"act_stats"``,
    ``"fisher"``), and implement :meth:`quantize_layer`.  The block streamer
    (:mod:`sqllm.calib.streamer`) gathers the statistics block by block and hands
    :meth:`quantize_layer` ``stats[collector][layer_name]`` (for ``"hessian"`` also
    ``stats["hessian_count"][layer_name]``, the number of token rows).  Methods
    that train whole blocks override :meth:`quantize_block`.  :meth:`collect` is
    the whole-model path used without streaming.

    Options are documented in the class docstring's ``Attributes`` section
    (``name : type`` then an indented description) or with
    ``dataclasses.field(metadata={"help": ..., "choices": ...})``; the CLI
    turns each into a flag (``sqllm quantize --method NAME --help``) and the
    saved ``quantization_config`` records them (``sqllm.method_options``).

    Attributes
    ----------
    bits : int
        Code width.
    """

    name = ""
    needs_calibration = False
    #: Collectors whose statistics :meth:`quantize_layer` reads (see ``sqllm.calib``).
    stats: ClassVar[Tuple[str, ...]] = ()

    bits: int = 3

    def required_stats(self) -> Tuple[str, ...]:
        """The collectors this configured instance needs (``stats`` unless an option drops them)."""
        return tuple(self.stats)

    def quantize_block(self, block: nn.Module, block_inputs: Any, fp_outputs: Any,
                       stats: Dict[str, Any], *,
                       layers: Dict[str, nn.Linear]) -> Dict[str, QuantLinearBase]:
        """Quantize the Linears of one decoder block; return full name -> quantized layer.

        ``block_inputs`` (:class:`sqllm.calib.BlockInputs`) are the block's inputs on the
        calibration data (from the quantized previous blocks unless ``fp_inputs``),
        ``fp_outputs`` the full-precision block's outputs on them (a list of tensors, one per
        calibration batch; None when no calibration data is used), ``layers`` the block's
        Linears by full name.  The default quantizes each Linear in turn with
        :meth:`quantize_layer`; the streamer swaps the returned layers in.
        """
        return {name: self.quantize_layer(name, lin, stats) for name, lin in layers.items()}

    def collect(self, model: nn.Module, layers: Dict[str, nn.Linear],
                batches: Optional[torch.Tensor], progress: bool) -> Dict[str, Any]:
        return {}

    def quantize_layer(self, name: str, linear: nn.Linear,
                       stats: Dict[str, Any]) -> QuantLinearBase:
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """The options recorded in ``quantization_config``."""
        return {"method": self.name, **dataclasses.asdict(self)}


def _tensor_arg(a: Any, name: str) -> torch.Tensor:
    """A tensor argument (a NumPy array is taken as one); TypeError for anything else."""
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(a).__name__}")
    if not (a.is_floating_point() or a.dtype in (torch.int8, torch.int16, torch.int32,
                                                 torch.int64, torch.uint8)):
        raise TypeError(f"{name} must be a real numeric tensor, got {a.dtype}")
    return a


def _check_fp16_residual(w: torch.Tensor, sparse: Any) -> None:
    """The Dense-and-Sparse residuals are stored in fp16: refuse (instead of storing
    ±inf) a kept weight whose residual |W - Ŵ_dense| exceeds fp16's 65504."""
    row_ptr, col_idx, values = sparse
    bits = np.asarray(values).view(np.uint16)
    bad = np.flatnonzero((bits & 0x7C00) == 0x7C00)
    if bad.size == 0:
        return
    k = int(bad[0])
    row = int(np.searchsorted(np.asarray(row_ptr), k, side="right") - 1)
    col = int(np.asarray(col_idx)[k])
    raise ValueError(
        f"Dense-and-Sparse cannot keep weight[{row}, {col}] = {float(w[row, col]):g}: its residual "
        f"from the lookup table exceeds the float16 range (65504) of the sparse part "
        f"({bad.size} such value(s)); use sparsity=0 (the lookup tables are float32 and hold it) "
        "or rescale the layer")


@register_method
@dataclasses.dataclass
class SqueezeLLM(QuantMethod):
    """Sensitivity-weighted non-uniform quantization (+ Dense-and-Sparse).

    Attributes
    ----------
    bits : int
        Code width (2, 3, 4 are SqueezeLLM's; 1..8 accepted).
    group_axis : {"row", "column"}
        One lookup table per output row (SqueezeLLM) or per input column.
    kmeans : {"exact", "lloyd"}
        Exact optimal weighted 1-D k-means, or fast Lloyd refinement.
    sparsity : float
        Fraction of each matrix kept in fp16 (0.0045 = SqueezeLLM's 0.45%).
    sensitive_fraction : float
        Share of the sparse budget given to the most sensitive values; the rest
        goes to magnitude outliers (1/9: 0.45% = 0.40% outliers + 0.05% sensitive).
    weighted : bool
        Weight the k-means by the Fisher diagonal (False = plain k-means, no
        calibration needed).
    gptq : bool
        SqueezeLLM with GPTQ error feedback: the lookup tables come from the
        k-means as usual, then GPTQ assigns the codes column by column (nearest
        table entry of the updated weight), spreading each column's error over
        the columns not yet assigned.  Needs the Hessian XᵀX; row tables and
        dense-only (sparsity 0).
    """

    name = "squeezellm"
    needs_calibration = True
    stats = ("fisher", "hessian")

    group_axis: str = "row"
    kmeans: str = "exact"
    sparsity: float = 0.0
    sensitive_fraction: float = 1.0 / 9.0
    weighted: bool = True
    gptq: bool = False

    def __post_init__(self) -> None:
        self.bits = _check_bits(self.bits)
        self.group_axis = _check_axis(self.group_axis)
        if self.kmeans not in ("exact", "lloyd"):
            raise ValueError(f"kmeans must be 'exact' or 'lloyd', got {self.kmeans!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= float(self.sensitive_fraction) <= 1.0:
            raise ValueError(f"sensitive_fraction must be in [0, 1], got {self.sensitive_fraction}")
        QuantLinear.check_supports(bits=self.bits, group_axis=self.group_axis,
                                   sparse=self.sparsity > 0)
        if self.gptq:
            if self.group_axis != "row":
                raise ValueError("squeezellm with gptq=True needs group_axis='row' (one table per "
                                 f"row), got {self.group_axis!r}")
            if self.sparsity:
                raise ValueError("squeezellm with gptq=True is dense-only (sparsity=0), got "
                                 f"sparsity={self.sparsity}")
        self.needs_calibration = bool(self.required_stats())

    def required_stats(self) -> Tuple[str, ...]:
        return tuple(s for s in self.stats
                     if (s == "fisher" and self.weighted) or (s == "hessian" and self.gptq))

    def collect(self, model: nn.Module, layers: Dict[str, nn.Linear],
                batches: Optional[torch.Tensor], progress: bool) -> Dict[str, Any]:
        needed = self.required_stats()
        if not needed:
            return {}
        if batches is None:
            raise ValueError("squeezellm needs calibration data for the Fisher diagonal "
                             "(pass calibration=..., a precomputed sensitivity=, or weighted=False)")
        out: Dict[str, Any] = {}
        if "fisher" in needed:
            from .calibration import fisher_diagonal

            out["fisher"] = fisher_diagonal(model, batches, layers, progress=progress)
        if "hessian" in needed:
            from .gptq import collect_hessians

            out.update(collect_hessians(model, layers, batches, progress=progress))
        return out

    def quantize_layer(self, name: str, linear: nn.Linear,
                       stats: Dict[str, Any]) -> QuantLinearBase:
        fisher = stats.get("fisher", {}).pop(name, None) if self.weighted else None
        if self.weighted and fisher is None:
            raise ValueError(f"no sensitivity for layer {name!r}")
        try:
            layer = self.quantize_linear(linear, fisher)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        if self.gptq:
            from . import _C
            from .gptq import take_hessian
            import numpy as np

            # scale-free: the collected XᵀX itself; when the streamer owns it, its
            # memory becomes the engine's working matrix (no second n x n)
            h, owned = take_hessian(stats, name)
            w = linear.weight.detach().to("cpu", torch.float32).contiguous().numpy()
            packed, _, _ = _C.gptq_lut(w, h.numpy(), layer.lookup_table.float().numpy(),
                                       self.bits, overwrite_hessian=owned, return_weight=False)
            del h
            layer.qweight.copy_(torch.from_numpy(packed.view(np.int32)))
        return layer

    def quantize_linear(self, linear: nn.Linear, sensitivity: Optional[torch.Tensor] = None,
                        num_threads: int = 0) -> QuantLinear:
        """Quantize one ``nn.Linear`` (``sensitivity``: its Fisher diagonal, or None
        for plain k-means) into a :class:`~sqllm.QuantLinear`."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if sensitivity is not None and not isinstance(sensitivity, (torch.Tensor, np.ndarray)):
            raise TypeError("sensitivity must be a torch.Tensor, a NumPy array or None, got "
                            f"{type(sensitivity).__name__}")
        return self.quantize_weight(linear.weight, sensitivity, bias=linear.bias,
                                    num_threads=num_threads)

    def quantize_weight(self, weight: torch.Tensor, sensitivity: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None, num_threads: int = 0) -> QuantLinear:
        """The algorithm: sensitivity-weighted k-means per row (or column) and the
        Dense-and-Sparse split, on a (out, in) weight; returns the packed layer."""
        from . import _C

        weight = _tensor_arg(weight, "weight")
        sensitivity = None if sensitivity is None else _tensor_arg(sensitivity, "sensitivity")
        bias = None if bias is None else _tensor_arg(bias, "bias")
        if weight.dim() != 2 or weight.numel() == 0:
            raise ValueError(f"weight must be a non-empty 2-D tensor, got shape {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (out_features), got "
                             f"{tuple(bias.shape)}")
        w = weight.detach().to("cpu", torch.float32).contiguous()
        # NaN/Inf in w: the C++ core rejects them (sparse_select, nuq_quantize)
        # in its own pass over the values, so no separate check here.
        s_np = None
        if sensitivity is not None:
            s = sensitivity.detach().to("cpu", torch.float32).contiguous()
            if tuple(s.shape) != tuple(w.shape):
                raise ValueError(f"sensitivity shape {tuple(s.shape)} must equal the weight "
                                 f"shape {tuple(w.shape)}")
            s_np = s.numpy()
        w_np = w.numpy()
        keep = None
        if self.sparsity > 0:
            keep = _C.sparse_select(w_np, s_np, float(self.sparsity),
                                    float(self.sensitive_fraction))
        packed, tables, _ = _C.nuq_quantize(w_np, s_np, self.bits, self.group_axis, self.kmeans,
                                            50, keep, num_threads)
        sparse = None
        if keep is not None:
            sparse = _C.sparse_residual(w_np, packed, tables, keep, self.bits, self.group_axis)
            _check_fp16_residual(w, sparse)
        return QuantLinear.from_packed(packed, tables, self.bits, w.shape[1], self.group_axis,
                                       sparse=sparse, bias=bias)


@register_method
@dataclasses.dataclass
class RTN(QuantMethod):
    """Baseline: round-to-nearest onto uniform min-max grids (the ``uniform`` format).

    Attributes
    ----------
    bits : int
        2..8.
    group_size : int
        -1 (one grid per output row) or 32, 64, 128 input columns per grid.
    sym : bool
        Symmetric grids (zero point 2^(bits-1)).
    """

    name = "rtn"

    group_size: int = -1
    sym: bool = False

    def __post_init__(self) -> None:
        self.bits = _check_bits(self.bits)
        check_uniform_options(self.bits, self.group_size)

    def quantize_layer(self, name: str, linear: nn.Linear,
                       stats: Dict[str, Any]) -> QuantLinearBase:
        from . import _C

        w = linear.weight.detach().to("cpu", torch.float32).contiguous()
        try:
            packed, scales, zeros = _C.uniform_rtn(w.numpy(), self.bits, self.group_size, self.sym)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        return UniformQuantLinear.from_packed(packed, scales, zeros, w.shape[1], self.bits,
                                              self.group_size, bias=linear.bias)


@register_method
@dataclasses.dataclass
class GPTQ(QuantMethod):
    """GPTQ (Frantar et al.): uniform grids, codes chosen column by column with
    second-order error feedback from the layer's input Hessian.

    Attributes
    ----------
    bits : int
        2..8.
    group_size : int
        -1 or 32, 64, 128.
    act_order : bool
        Quantize columns by decreasing Hessian diagonal.
    blocksize : int
        Columns per lazy-update block.
    percdamp : float
        Damping, a fraction of the mean Hessian diagonal.
    static_groups : bool
        Fit group grids before GPTQ (and before act-order's permutation).
    sym : bool
        Symmetric grids.
    """

    name = "gptq"
    needs_calibration = True
    stats = ("hessian",)

    bits: int = 4
    group_size: int = -1
    act_order: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    static_groups: bool = False
    sym: bool = False

    def __post_init__(self) -> None:
        check_uniform_options(self.bits, self.group_size)
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if not 0.0 <= self.percdamp:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp}")

    def collect(self, model: nn.Module, layers: Dict[str, nn.Linear],
                batches: Optional[torch.Tensor], progress: bool) -> Dict[str, Any]:
        from .gptq import collect_hessians

        if batches is None:
            raise ValueError("gptq needs calibration data for the layer Hessians "
                             "(pass calibration=...)")
        return collect_hessians(model, layers, batches, progress=progress)

    def quantize_layer(self, name: str, linear: nn.Linear,
                       stats: Dict[str, Any]) -> QuantLinearBase:
        from .gptq import gptq_quantize, take_hessian

        # GPTQ is scale-free: the collected XᵀX itself; when the streamer owns it,
        # its memory becomes the engine's working matrix (no second n x n)
        h, owned = take_hessian(stats, name)
        try:
            res = gptq_quantize(linear.weight, h, bits=self.bits, group_size=self.group_size,
                                act_order=self.act_order, blocksize=self.blocksize,
                                percdamp=self.percdamp, static_groups=self.static_groups,
                                sym=self.sym, return_result=True, overwrite_hessian=owned,
                                return_weight=False)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        del h
        log.debug("gptq %s: proxy error %.4g", name,
                  res.proxy_error * 2.0 / int(stats["hessian_count"][name]))
        return res.to_layer(bias=linear.bias)
