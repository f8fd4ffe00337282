"""The ``glut`` method: grouped lookup tables, GPTQ error feedback, budgeted bits.

* Tables: one 2^b-entry table per group of ``group_size`` weights along each
  row, from the Fisher-weighted exact 1-D k-means of the group, stored as
  uint8 entries with an fp16 scale and offset (:mod:`sqllm.nn_glut`).
* Feedback (``gptq=True``): the codes are assigned by the GPTQ engine column by
  column (nearest entry of the updated weight, the error spread over the
  columns not yet assigned), then each row's tables are refit to the final
  codes by least squares in the Hessian metric (``refit=True``).
* Budget: a non-integer ``bits`` (or ``allocate=True``) is a budget of stored
  bits per weight over all quantized layers; every layer gets the
  (bits, group_size) of ``candidate_bits`` x ``candidate_groups`` chosen by an
  exact multiple-choice knapsack on the measured Fisher-weighted errors
  (:mod:`sqllm.allocate`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .methods import QuantMethod, _tensor_arg, register_method
from .nn import QuantLinearBase
from .nn_glut import GlutQuantLinear, check_glut_options

__all__ = ["GLUT", "glut_quantize"]

log = logging.getLogger(__name__)


def glut_quantize(weight: torch.Tensor, sensitivity: Optional[torch.Tensor] = None,
                  hessian: Optional[torch.Tensor] = None, *, bits: int = 4,
                  group_size: int = 128, kmeans: str = "exact", refit: bool = True,
                  act_order: bool = False, blocksize: int = 128, percdamp: float = 0.01,
                  bias: Optional[torch.Tensor] = None,
                  return_info: bool = False) -> Any:
    """Quantize one (out, in) weight into a :class:`GlutQuantLinear`.

    ``sensitivity``: the Fisher diagonal (None: plain k-means); ``hessian``: a
    positive multiple of XᵀX (float64 [in, in]) for GPTQ feedback (None: codes
    are the nearest table entries).  With ``return_info`` returns (layer, dict)
    with the proxy errors of the feedback."""
    from . import _C

    bits, group_size = check_glut_options(bits, group_size)
    weight = _tensor_arg(weight, "weight")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D tensor, got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    s = None
    if sensitivity is not None:
        s = _tensor_arg(sensitivity, "sensitivity").detach().to("cpu", torch.float32).contiguous()
        if tuple(s.shape) != w.shape:
            raise ValueError(f"sensitivity shape {tuple(s.shape)} must equal the weight shape "
                             f"{w.shape}")
        s = s.numpy()
    info: Dict[str, Any] = {}
    if hessian is None:
        r = _C.glut_quantize(w, s, bits, group_size, kmeans)
        info["fisher_error"] = float(np.sum(r["sse"]))
    else:
        h = _tensor_arg(hessian, "hessian").detach().to("cpu", torch.float64).contiguous().numpy()
        r = _C.glut_gptq(w, h, s, bits, group_size, kmeans, act_order, blocksize, percdamp, refit)
        info.update(proxy_error_gptq=r["proxy_error_gptq"], proxy_error=r["proxy_error"],
                    rows_refit=r["rows_refit"])
    layer = GlutQuantLinear.from_packed(r["qweight"], r["tables"], r["scales"], r["offsets"],
                                        w.shape[1], bits, group_size, bias=bias)
    return (layer, info) if return_info else layer


@register_method
@dataclasses.dataclass
class GLUT(QuantMethod):
    """Grouped lookup tables (compact 8-bit tables), GPTQ feedback, budgeted bits.

    Attributes
    ----------
    bits : float
        Code width 1..8 -- or, when not a whole number (or with allocate=True), a
        budget of stored bits per weight (codes + tables) over all quantized
        layers, allocated per layer.
    group_size : int
        Weights per table along a row (fixed-width mode).
    allocate : bool
        Treat bits as a budget even when it is a whole number.
    candidate_bits : list of int
        Code widths the allocation may choose.
    candidate_groups : list of int
        Group sizes the allocation may choose.
    kmeans : {"exact", "lloyd"}
        Exact weighted 1-D k-means per group, or Lloyd.
    weighted : bool
        Weight the k-means by the Fisher diagonal.
    gptq : bool
        Assign the codes with GPTQ error feedback (needs the Hessians).
    refit : bool
        With gptq: refit the tables to the final codes (least squares, Hessian metric).
    act_order : bool
        GPTQ: quantize columns by decreasing Hessian diagonal (the tables stay with
        their columns, so the format needs no index; on heavy-tailed activations
        it lowers the proxy error by a third).
    blocksize : int
        GPTQ lazy-update block.
    percdamp : float
        GPTQ damping (fraction of the mean Hessian diagonal).
    sensitivity_rows : int
        Budget mode: measure each layer's error on at most this many rows (every
        s-th row, scaled up; 0: all rows).
    """

    name = "glut"
    needs_calibration = True
    stats = ("fisher", "hessian")

    bits: float = 4
    group_size: int = 256
    allocate: bool = False
    candidate_bits: List[int] = dataclasses.field(default_factory=lambda: [2, 3, 4, 5])
    candidate_groups: List[int] = dataclasses.field(default_factory=lambda: [128, 256, 576])
    kmeans: str = "exact"
    weighted: bool = True
    gptq: bool = True
    refit: bool = True
    act_order: bool = True
    blocksize: int = 128
    percdamp: float = 0.01
    sensitivity_rows: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float, np.integer,
                                                                       np.floating)):
            raise TypeError(f"bits must be a number, got {type(self.bits).__name__}")
        if not np.isfinite(float(self.bits)) or float(self.bits) <= 0:
            raise ValueError(f"bits must be a positive number, got {self.bits}")
        if self.kmeans not in ("exact", "lloyd"):
            raise ValueError(f"kmeans must be 'exact' or 'lloyd', got {self.kmeans!r}")
        self.candidate_bits = [int(b) for b in self.candidate_bits]
        self.candidate_groups = [int(g) for g in self.candidate_groups]
        if self.budget_mode:
            if not self.candidate_bits or not self.candidate_groups:
                raise ValueError("glut: candidate_bits and candidate_groups must be non-empty")
            for b in self.candidate_bits:
                for g in self.candidate_groups:
                    check_glut_options(b, g)
        else:
            if float(self.bits) != int(self.bits):
                raise ValueError(f"bits must be a whole number here, got {self.bits}")
            self.bits = int(self.bits)
            check_glut_options(self.bits, self.group_size)
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if not 0.0 <= self.percdamp:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp}")
        self.needs_calibration = bool(self.required_stats())
        self._plan: Dict[str, Tuple[int, int]] = {}

    @property
    def budget_mode(self) -> bool:
        return bool(self.allocate) or float(self.bits) != int(float(self.bits))

    def required_stats(self) -> Tuple[str, ...]:
        need = []
        if self.weighted or self.budget_mode:
            need.append("fisher")
        if self.gptq:
            need.append("hessian")
        return tuple(need)

    def collect(self, model: nn.Module, layers: Dict[str, nn.Linear],
                batches: Optional[torch.Tensor], progress: bool) -> Dict[str, Any]:
        needed = self.required_stats()
        if not needed:
            return {}
        if batches is None:
            raise ValueError("glut needs calibration data (pass calibration=... or sensitivity=)")
        out: Dict[str, Any] = {}
        if "fisher" in needed:
            from .calibration import fisher_diagonal

            out["fisher"] = fisher_diagonal(model, batches, layers, progress=progress)
        if "hessian" in needed:
            from .gptq import collect_hessians

            out.update(collect_hessians(model, layers, batches, progress=progress))
        return out

    def prepare(self, model: nn.Module, layers: Dict[str, nn.Linear], stats: Dict[str, Any],
                batches: Optional[torch.Tensor], progress: bool) -> None:
        """Before any layer is quantized (called by :func:`sqllm.quantize`): in budget
        mode, the Fisher diagonal (computed here unless given, then kept in ``stats``)
        and the per-layer plan."""
        if not self.budget_mode:
            return
        from .allocate import allocate_glut
        from .calib.checkpoint import is_meta_model

        if is_meta_model(model):
            raise ValueError("glut with a bit budget needs the model's weights in memory "
                             "(not on the meta device)")
        if "fisher" not in stats:
            if batches is None:
                raise ValueError("glut with a bit budget needs calibration data for the Fisher "
                                 "diagonal (pass calibration=... or sensitivity=)")
            from .calibration import fisher_diagonal

            stats["fisher"] = fisher_diagonal(model, batches, layers, progress=progress)
        fisher = stats["fisher"]
        weights = {n: lin.weight.detach().to("cpu", torch.float32).numpy() for n, lin in layers.items()}
        fis = {n: fisher[n].detach().to("cpu", torch.float32).numpy() for n in layers}
        cands = [(b, g) for b in self.candidate_bits for g in self.candidate_groups]
        self._plan = allocate_glut(weights, fis, float(self.bits), cands, self.kmeans,
                                   progress=progress, max_rows=int(self.sensitivity_rows))

    def layer_choice(self, name: str) -> Tuple[int, int]:
        if self.budget_mode:
            if name not in self._plan:
                raise ValueError(f"glut: no bit allocation for layer {name!r} (a budget needs "
                                 "sqllm.quantize, which runs the allocation first)")
            return self._plan[name]
        return int(self.bits), int(self.group_size)

    def quantize_layer(self, name: str, linear: nn.Linear,
                       stats: Dict[str, Any]) -> QuantLinearBase:
        bits, g = self.layer_choice(name)
        fisher = stats.get("fisher", {}).pop(name, None) if self.weighted else None
        if self.weighted and fisher is None:
            raise ValueError(f"no sensitivity for layer {name!r}")
        h = None
        if self.gptq:
            from .gptq import hessian_for_gptq

            h = hessian_for_gptq(stats, name)
        try:
            layer, info = glut_quantize(linear.weight, fisher, h, bits=bits, group_size=g,
                                        kmeans=self.kmeans, refit=self.refit,
                                        act_order=self.act_order, blocksize=self.blocksize,
                                        percdamp=self.percdamp, bias=linear.bias,
                                        return_info=True)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        log.debug("glut %s: %d-bit g%d %s", name, bits, g, info)
        return layer
