"""GPTQ from Python: ``sqllm.gptq_quantize`` and the Hessian collector.

The algorithm lives in C++ (``include/sqllm/quant/gptq.hpp``); this module
converts arguments, names errors, and gathers the per-layer Hessian statistic
X^T X that GPTQ needs.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import _C
from .nn_uniform import UniformQuantLinear, check_uniform_options

__all__ = ["gptq_quantize", "GptqResult", "collect_hessians", "hessian_for_gptq", "take_hessian"]

log = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray]


@dataclasses.dataclass
class GptqResult:
    """Everything GPTQ produced for one weight.

    Attributes
    ----------
    weight : Tensor float32 [out, in] or None
        The dequantized weight Ŵ (None when not asked for: ``return_weight=False``).
    qweight : ndarray uint32 [out, words]
        Packed codes (docs/formats.md).
    scales, zeros : ndarray float16 [out, groups]
    g_idx : ndarray int32 [in]
        Group of every input column.
    perm : ndarray int32 [in]
        The order the columns were quantized in (identity without act-order).
    proxy_error : float
        tr((W - Ŵ) H (W - Ŵ)ᵀ) for the H given.
    bits, group_size, act_order, static_groups :
        The options used.
    hessian_overwritten : bool
        H's memory was used as the engine's working matrix (``overwrite_hessian``).
    """

    weight: Optional[torch.Tensor]
    qweight: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    g_idx: np.ndarray
    perm: np.ndarray
    proxy_error: float
    bits: int
    group_size: int
    act_order: bool
    static_groups: bool
    hessian_overwritten: bool = False

    @property
    def needs_g_idx(self) -> bool:
        """act-order groups formed in the permuted order must be stored explicitly."""
        return self.act_order and not self.static_groups and self.group_size > 0

    def to_layer(self, bias: Optional[torch.Tensor] = None) -> UniformQuantLinear:
        """The packed ``UniformQuantLinear`` these codes make."""
        return UniformQuantLinear.from_packed(
            self.qweight, self.scales, self.zeros, int(self.g_idx.shape[0]), self.bits,
            self.group_size, g_idx=self.g_idx if self.needs_g_idx else None, bias=bias)


def _as_numpy(a: ArrayLike, dtype: type, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float64 if dtype is np.float64 else torch.float32).numpy()
    elif not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=dtype)


def _hessian_to_overwrite(H: ArrayLike) -> np.ndarray:
    """H itself as a writable float64 C-contiguous array (no copy), or ValueError."""
    if isinstance(H, torch.Tensor):
        if H.device.type != "cpu" or H.dtype != torch.float64 or not H.is_contiguous():
            raise ValueError("overwrite_hessian=True needs a contiguous float64 CPU Hessian, got "
                             f"{H.dtype} on {H.device} (contiguous={H.is_contiguous()})")
        H = H.detach().numpy()
    if not isinstance(H, np.ndarray):
        raise TypeError(f"H must be a torch.Tensor or numpy array, got {type(H).__name__}")
    if H.dtype != np.float64 or not H.flags.c_contiguous or not H.flags.writeable:
        raise ValueError("overwrite_hessian=True needs a writable, C-contiguous float64 Hessian, "
                         f"got dtype {H.dtype}, c_contiguous={H.flags.c_contiguous}, "
                         f"writeable={H.flags.writeable}")
    if H.ndim != 2:
        raise ValueError(f"H must be 2-D, got shape {H.shape}")
    return H


def gptq_quantize(W: ArrayLike, H: ArrayLike, bits: int = 4, group_size: int = -1,
                  act_order: bool = False, blocksize: int = 128, percdamp: float = 0.01,
                  static_groups: bool = False, sym: bool = False, return_result: bool = False,
                  num_threads: int = 0, overwrite_hessian: bool = False,
                  return_weight: bool = True) -> Union[torch.Tensor, GptqResult]:
    """Quantize a weight with GPTQ onto uniform grids.

    Parameters
    ----------
    W : Tensor or ndarray [out, in]
        The weight (converted to float32).
    H : Tensor or ndarray [in, in]
        A positive multiple of XᵀX of the layer's inputs (float64; sqllm passes
        2·XᵀX / n, upstream's scaling — the codes do not depend on the multiple).
    bits : int
        2..8.
    group_size : int
        -1 (one grid per row) or 32, 64, 128.
    act_order : bool
        Quantize columns by decreasing H_ii.
    blocksize : int
        Columns per lazy-update block.
    percdamp : float
        Damping as a fraction of the mean diagonal of H.
    static_groups : bool
        Fit every group's grid on W before GPTQ starts (with act_order: groups
        stay in the original column order, no g_idx needed).
    sym : bool
        Symmetric grids.
    return_result : bool
        Return a :class:`GptqResult` (codes, grids, perm, proxy error) instead
        of the dequantized weight.
    num_threads : int
        OpenMP threads (0: the default).
    overwrite_hessian : bool
        Give H's memory to the engine as its n x n working matrix instead of
        allocating a second one (0.97 GB for an 11008-wide layer); H's contents
        are destroyed.  Only with a float64, C-contiguous, writable CPU H (else
        ValueError).  Used when H is aligned as Eigen aligns its own matrices
        (torch's CPU tensors are), else H is copied, so that the result is
        bit-identical either way (``GptqResult.hessian_overwritten`` says which).
    return_weight : bool
        With ``return_result``: False skips the dequantized weight
        (``GptqResult.weight`` is None; out x in float32 less to hold).

    Returns
    -------
    Tensor float32 [out, in] (the dequantized weight), or a GptqResult.
    """
    bits, group_size = check_uniform_options(bits, group_size)
    w = _as_numpy(W, np.float32, "W")
    h = _hessian_to_overwrite(H) if overwrite_hessian else _as_numpy(H, np.float64, "H")
    d = _C.gptq_uniform(w, h, bits, group_size, sym, bool(act_order), int(blocksize),
                        float(percdamp), bool(static_groups), int(num_threads),
                        bool(overwrite_hessian), bool(return_weight) or not return_result)
    weight = torch.from_numpy(d["weight"]) if d["weight"] is not None else None
    if not return_result:
        return weight
    return GptqResult(weight=weight, qweight=d["qweight"], scales=d["scales"].view(np.float16),
                      zeros=d["zeros"].view(np.float16), g_idx=d["g_idx"], perm=d["perm"],
                      proxy_error=float(d["proxy_error"]), bits=bits, group_size=group_size,
                      act_order=bool(act_order), static_groups=bool(static_groups),
                      hessian_overwritten=bool(d["hessian_overwritten"]))


def collect_hessians(model: nn.Module, layers: Dict[str, nn.Linear], batches: torch.Tensor,
                     progress: bool = True) -> Dict[str, Dict[str, object]]:
    """Sum of XᵀX (float64) of every listed Linear's input over the calibration tokens.

    The model runs one calibration sequence at a time (no gradients); a
    forward hook on each Linear adds the sequence's XᵀX to the layer's
    float64 accumulator, so the peak memory is one sequence's activations
    plus the accumulators (in² · 8 bytes per layer).

    Returns
    -------
    {"hessian": {name: float64 Tensor [in, in]}, "hessian_count": {name: rows of X}}
    """
    if not isinstance(batches, torch.Tensor) or batches.dim() != 2 or batches.shape[0] == 0:
        raise ValueError("batches must be a non-empty 2-D LongTensor [nsamples, seqlen], got "
                         f"{getattr(batches, 'shape', type(batches).__name__)}")
    if not layers:
        raise ValueError("no Linear layers to collect Hessians for")
    device = next(model.parameters()).device
    hess: Dict[str, torch.Tensor] = {}
    count: Dict[str, int] = {}
    hooks: List[torch.utils.hooks.RemovableHandle] = []
    was_training = model.training
    model.eval()
    try:
        for name, lin in layers.items():
            hess[name] = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64,
                                     device=lin.weight.device)
            count[name] = 0

            def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
                hess[name].addmm_(x.t(), x)
                count[name] += int(x.shape[0])

            hooks.append(lin.register_forward_hook(hook))
        with torch.no_grad():
            for row in tqdm(batches, desc="hessian", unit="seq", disable=not progress):
                model(input_ids=row.unsqueeze(0).to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {"hessian": {k: v.cpu() for k, v in hess.items()}, "hessian_count": count}


def take_hessian(stats: Dict[str, Dict[str, object]], name: str) -> Tuple[torch.Tensor, bool]:
    """Layer ``name``'s unscaled XᵀX and whether the caller may overwrite it
    (``overwrite_hessian=``): true when the streamer collected or loaded it for this run (``stats["hessian_owned"]``; then it is removed from ``stats``), false for
    statistics the user passed in (left in place).
    """
    h = hessian_for_gptq(stats, name, scaled=False)
    owned = bool(stats.get("hessian_owned", {}).pop(name, False))
    owned = owned and h.dtype == torch.float64 and h.device.type == "cpu" and h.is_contiguous()
    if owned:
        try:
            owned = h.numpy().flags.writeable
        except (RuntimeError, ValueError):
            owned = False
    if owned:  # it is about to be overwritten: nobody else may read it
        stats["hessian"].pop(name, None)
    return h, owned


def hessian_for_gptq(stats: Dict[str, Dict[str, object]], name: str, scaled: bool = True) -> torch.Tensor:
    """2·XᵀX / n for layer ``name`` from collected statistics (ValueError if absent).

    With ``scaled=False`` it returns the collected float64 XᵀX itself (no copy
    when it already is float64): GPTQ's codes do not depend on the Hessian's
    scale, and for a 7B ``down_proj`` the scaled copy alone is 0.97 GB.  Its
    proxy error is then in units of XᵀX (multiply by 2 / ``hessian_count``).
    """
    try:
        xtx = stats["hessian"][name]
        n = int(stats["hessian_count"][name])
    except KeyError:
        raise ValueError(f"no Hessian statistic for layer {name!r}; GPTQ needs calibration data") from None
    if n <= 0:
        raise ValueError(f"the Hessian of layer {name!r} was accumulated over {n} rows")
    if not scaled:
        return xtx.to(torch.float64)
    return xtx.to(torch.float64) * (2.0 / n)
