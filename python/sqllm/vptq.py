"""VPTQ: vector post-training quantization with second-order error feedback.

:func:`vptq_quantize` quantizes one weight with its Hessian (the C++ quantizer
``include/sqllm/quant/vptq.hpp`` on the GPTQ engine); the registered method
``vptq`` runs it on every Linear of a model with Hessians from the block
streamer and stores :class:`sqllm.nn_vq.VQQuantLinear` layers.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import _C
from .methods import QuantMethod, register_method
from .nn import QuantLinearBase
from .nn_vq import VQQuantLinear

__all__ = ["VPTQ", "vptq_quantize", "VPTQ_PRESETS"]

log = logging.getLogger(__name__)

#: bits -> (vector length, centroids, residual centroids): the paper's settings
#: (2.02 bits = v6/k4096; 3.01 bits = v4/k4096; 4.02 bits = v6/k4096 + residual 4096).
VPTQ_PRESETS = {2: (6, 4096, 0), 3: (4, 4096, 0), 4: (6, 4096, 4096)}


def vptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, v: int = 8, k: int = 4096,
                  k_res: int = 0, outlier_cols: int = 0, v_out: int = 0, k_out: int = 0,
                  group_num: int = 1, enable_perm: bool = True, enable_norm: bool = False,
                  hessian_weights: bool = True, blocksize: int = 128, percdamp: float = 0.01,
                  kiter: int = 100, ktol: float = 1e-5, init: str = "random", seed: int = 0,
                  num_threads: int = 0, bias: Optional[torch.Tensor] = None,
                  return_result: bool = False) -> Any:
    """VPTQ one weight ``(out, in)`` with its Hessian ``(in, in)`` (any positive multiple
    of XᵀX).  Returns the :class:`VQQuantLinear`, or with ``return_result=True`` the pair
    (layer, result dict with the proxy errors ``proxy_nearest``, ``proxy_gptq``,
    ``proxy_residual`` and ``proxy_weight`` = tr(W H Wᵀ))."""
    if not isinstance(weight, torch.Tensor) or not isinstance(hessian, torch.Tensor):
        raise TypeError("weight and hessian must be torch tensors")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    h = hessian.detach().to("cpu", torch.float64).contiguous().numpy()
    res = _C.vptq_quantize(w, h, v=v, k=k, k_res=k_res, outlier_cols=outlier_cols, v_out=v_out,
                           k_out=k_out, group_num=group_num, enable_perm=enable_perm,
                           enable_norm=enable_norm, hessian_weights=hessian_weights,
                           blocksize=blocksize, percdamp=percdamp, kiter=kiter, ktol=ktol,
                           init=init, seed=seed, num_threads=num_threads)
    layer = VQQuantLinear.from_result(res, w.shape[1], w.shape[0], v, k, k_res, group_num,
                                      v_out, k_out, enable_perm, enable_norm, bias=bias)
    return (layer, res) if return_result else layer


def _pair(values: Optional[List[int]], name: str) -> Optional[List[int]]:
    if values is None:
        return None
    if isinstance(values, (int, np.integer)):
        values = [-1, int(values)]
    values = [int(x) for x in values]
    if len(values) == 1:
        values = [-1] + values
    if len(values) != 2:
        raise ValueError(f"{name} takes [outlier, main] (upstream's two values) or one value, "
                         f"got {values}")
    return values


@register_method
@dataclasses.dataclass
class VPTQ(QuantMethod):
    """VPTQ: vector codebooks on vectors down the output dimension, GPTQ error feedback.

    Options use upstream's names; list options take upstream's two values
    ``[outlier, main]`` (-1: none) or one value for the main codebooks.

    Attributes
    ----------
    bits : int
        Picks vector_lens/num_centroids/num_res_centroids when they are not
        given: 2 -> v6/k4096, 3 -> v4/k4096, 4 -> v6/k4096 + residual 4096.
    vector_lens : list of int
        Vector lengths [outlier, main] (2..16; -1 = no outlier codebook).
    num_centroids : list of int
        Centroids [outlier, main]; main a power of two up to 65536.
    num_res_centroids : list of int
        Residual centroids [outlier (-1), main] (-1 = no residual codebook).
    npercent : float
        Percent of input columns (the most sensitive after perm) given the outlier codebook.
    group_num : int
        Codebooks over the non-outlier columns (split into equal column groups).
    blocksize : int
        GPTQ lazy-update block.
    percdamp : float
        GPTQ damping, fraction of the mean Hessian diagonal.
    kmeans_mode : {"hessian", "plain"}
        k-means sample weight: the Hessian diagonal of the vector's column, or 1.
    kmeans_init : {"random", "kmeans++"}
        k-means initialisation (upstream: random).
    enable_perm : bool
        Order columns by decreasing Hessian diagonal (stored, undone at inference).
    enable_norm : bool
        Per-input-channel min/max normalisation (weight_scale, weight_bias).
    kiter : int
        k-means iterations.
    ktol : float
        k-means stops when the objective falls by less than this fraction.
    seed : int
        Seeds the k-means initialisation.
    """

    name = "vptq"
    needs_calibration = True
    stats = ("hessian",)

    vector_lens: Optional[List[int]] = None
    num_centroids: Optional[List[int]] = None
    num_res_centroids: Optional[List[int]] = None
    npercent: float = 0.0
    group_num: int = 1
    blocksize: int = 128
    percdamp: float = 0.01
    kmeans_mode: str = "hessian"
    kmeans_init: str = "random"
    enable_perm: bool = True
    enable_norm: bool = True
    kiter: int = 100
    ktol: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        preset = VPTQ_PRESETS.get(int(self.bits))
        vl = _pair(self.vector_lens, "vector_lens")
        nc = _pair(self.num_centroids, "num_centroids")
        nr = _pair(self.num_res_centroids, "num_res_centroids")
        if (vl is None or nc is None) and preset is None:
            raise ValueError(f"vptq: give vector_lens and num_centroids, or bits in "
                             f"{sorted(VPTQ_PRESETS)} for the paper's settings (got bits={self.bits})")
        self.vector_lens = vl if vl is not None else [-1, preset[0]]
        self.num_centroids = nc if nc is not None else [-1, preset[1]]
        self.num_res_centroids = nr if nr is not None else [-1, preset[2] if preset and vl is None else -1]
        v, k = self.vector_lens[1], self.num_centroids[1]
        if not 2 <= v <= 16:
            raise ValueError(f"vptq: the main vector length must be in 2..16, got {v}")
        if k < 2 or k > 65536 or k & (k - 1):
            raise ValueError(f"vptq: num_centroids must be a power of two in 2..65536 (indices are "
                             f"packed in log2(k) bits), got {k}")
        kr = self.num_res_centroids[1]
        if kr not in (-1, 0) and (kr < 2 or kr > 65536 or kr & (kr - 1)):
            raise ValueError(f"vptq: num_res_centroids must be -1 (none) or a power of two in "
                             f"2..65536, got {kr}")
        if not 0.0 <= float(self.npercent) < 100.0:
            raise ValueError(f"vptq: npercent must be in [0, 100), got {self.npercent}")
        if self.npercent > 0 and (self.vector_lens[0] < 2 or self.num_centroids[0] < 1):
            raise ValueError("vptq: npercent > 0 needs an outlier codebook: vector_lens[0] in 2..16 "
                             "and num_centroids[0] >= 1")
        if self.kmeans_mode not in ("hessian", "plain"):
            raise ValueError(f"vptq: kmeans_mode must be 'hessian' or 'plain', got {self.kmeans_mode!r}")
        if self.kmeans_init not in ("random", "kmeans++"):
            raise ValueError(f"vptq: kmeans_init must be 'random' or 'kmeans++', got {self.kmeans_init!r}")
        if self.group_num < 1 or self.blocksize < 1 or self.kiter < 0 or self.ktol < 0:
            raise ValueError("vptq: group_num and blocksize must be >= 1, kiter and ktol >= 0")

    def collect(self, model: nn.Module, layers: Dict[str, nn.Linear],
                batches: Optional[torch.Tensor], progress: bool) -> Dict[str, Any]:
        from .gptq import collect_hessians

        if batches is None:
            raise ValueError("vptq needs calibration data for the layer Hessians (pass calibration=...)")
        return collect_hessians(model, layers, batches, progress=progress)

    def quantize_layer(self, name: str, linear: nn.Linear,
                       stats: Dict[str, Any]) -> QuantLinearBase:
        from .gptq import hessian_for_gptq

        h = hessian_for_gptq(stats, name)
        in_f = linear.in_features
        outliers = int(math.ceil(self.npercent * in_f / 100.0)) if self.npercent > 0 else 0
        kr = max(self.num_res_centroids[1], 0)
        try:
            layer, r = vptq_quantize(
                linear.weight, h, v=self.vector_lens[1], k=self.num_centroids[1], k_res=kr,
                outlier_cols=outliers, v_out=self.vector_lens[0] if outliers else 0,
                k_out=self.num_centroids[0] if outliers else 0, group_num=self.group_num,
                enable_perm=self.enable_perm, enable_norm=self.enable_norm,
                hessian_weights=self.kmeans_mode == "hessian", blocksize=self.blocksize,
                percdamp=self.percdamp, kiter=self.kiter, ktol=self.ktol, init=self.kmeans_init,
                seed=self.seed, bias=linear.bias, return_result=True)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
        ref = r["proxy_weight"] if r["proxy_weight"] > 0 else 1.0
        msg = (f"{name} proxy error tr(dW H dW^T)/tr(W H W^T): nearest {r['proxy_nearest'] / ref:.4g}, "
               f"after VPTQ {r['proxy_gptq'] / ref:.4g}")
        if r["proxy_residual"] is not None:
            msg += f", after residual {r['proxy_residual'] / ref:.4g}"
        log.info("%s (tr(W H W^T) = %.4g; %.3f bits/weight)", msg, r["proxy_weight"],
                 layer.bits_per_weight())
        return layer


def upstream_config(q: Dict[str, Any], where: str = "quantization_config") -> Any:
    """A :class:`sqllm.QuantizationConfig` for upstream VPTQ's ``quantization_config``
    (``quant_method: "vptq"``, ``config_for_layers``, ``shared_layer_config``): every
    listed module becomes a ``vq`` layer whose tensors carry upstream's names."""
    from .config import LayerFormat, QuantizationConfig, QuantizationConfigError

    layers = q.get("config_for_layers")
    if not isinstance(layers, dict) or not layers:
        raise QuantizationConfigError(f"{where}: a VPTQ config needs config_for_layers (an object "
                                      "naming every quantized module)")
    shared = q.get("shared_layer_config") or {}
    qc = QuantizationConfig(method="vptq", options={}, modules_to_not_convert=["lm_head"],
                            extra={"converted_from": "vptq"})
    for name, entry in layers.items():
        e = {**shared, **(entry or {})}
        w = f"{where}.config_for_layers[{name!r}]"
        try:
            vl, nc = list(e["vector_lens"]), list(e["num_centroids"])
            nr = list(e.get("num_res_centroids", [-1, -1]))
            in_f, out_f = int(e["in_features"]), int(e["out_features"])
        except (KeyError, TypeError, ValueError) as err:
            raise QuantizationConfigError(f"{w}: missing or malformed key ({err})") from None
        if not e.get("is_indice_packed", True):
            raise QuantizationConfigError(f"{w}: unpacked indices (is_indice_packed=false) are "
                                          "not supported")
        outlier = int(e.get("outlier_size", 0) or 0)
        params = {"vector_len": int(vl[1]), "num_centroids": int(nc[1]),
                  "num_res_centroids": max(int(nr[1]), 0), "group_num": int(e.get("group_num", 1)),
                  "group_size": int(e.get("group_size", -1)), "outlier_size": outlier,
                  "outlier_vector_len": int(vl[0]) if outlier else 0,
                  "outlier_centroids": int(nc[0]) if outlier else 0,
                  "enable_perm": bool(e.get("enable_perm", False)),
                  "enable_norm": bool(e.get("enable_norm", False))}
        lf = LayerFormat("vq", in_f, out_f, bool(e.get("bias", False)), params, 1)
        try:
            lf.build()  # checks the parameters now, naming the layer
        except ValueError as err:
            raise QuantizationConfigError(f"{w}: {err}") from None
        qc.layers[name] = lf
    return qc
