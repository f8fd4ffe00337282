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
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import _C
from .methods import QuantMethod, register_method
from .nn import QuantLinearBase
from .nn_vq import VQQuantLinear

__all__ = ["VPTQ", "vptq_quantize", "VPTQ_PRESETS", "UPSTREAM_HESSIAN_KEYS",
           "upstream_hessian_file", "load_upstream_hessian", "upstream_layer_entry",
           "add_upstream_keys", "sqllm_view"]

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


#: The file key of each decoder-layer Linear in upstream's Hessian folders
#: (``<layer index>_<key>.pt``, written by the QuIP# collector VPTQ uses; q/k/v
#: and gate/up share their input and so one file).
UPSTREAM_HESSIAN_KEYS = {
    "self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
    "self_attn.o_proj": "o", "mlp.gate_proj": "up", "mlp.up_proj": "up",
    "mlp.down_proj": "down"}

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def upstream_hessian_file(hessian_path: "os.PathLike[str] | str", name: str) -> Path:
    """The file of layer ``name`` (e.g. ``model.layers.3.mlp.up_proj``) in an upstream
    Hessian folder: ``<hessian_path>/<index>_<key>.pt`` (ValueError for a Linear outside
    the decoder layers' attention/MLP, which upstream's folders do not cover)."""
    m = _LAYER_RE.search(name)
    key = UPSTREAM_HESSIAN_KEYS.get(m.group(2)) if m else None
    if key is None:
        raise ValueError(f"layer {name!r} has no file in upstream's Hessian layout (it names "
                         f"<index>_<key>.pt for layers.<index>.{{{', '.join(sorted(UPSTREAM_HESSIAN_KEYS))}}})")
    return Path(hessian_path) / f"{int(m.group(1))}_{key}.pt"


def load_upstream_hessian(path: "os.PathLike[str] | str",
                          in_features: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """Read one Hessian file of upstream's layout and return ``(E[x xᵀ], ct)`` in float64.

    The file is a dict saved by ``torch.save``: ``flatH`` (float32, the lower triangle of
    the covariance ``Σxxᵀ/ct − μμᵀ`` row by row, n(n+1)/2 values), ``mu`` (float32
    [n], the mean input), ``n`` (the dimension) and ``ct`` (the number of rows; may
    be absent).  Upstream adds μμᵀ back, divides by the mean of the diagonal and adds
    1e-2·I; sqllm returns the second moment (μμᵀ added back) and lets the GPTQ engine
    damp with ``percdamp`` = 0.01 × mean diagonal, which is the same matrix up to a
    positive factor (GPTQ and the Hessian-weighted k-means are invariant to it)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Hessian file {str(p)!r} does not exist")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a torch file
        raise ValueError(f"Hessian file {str(p)!r} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not {"flatH", "mu", "n"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"Hessian file {str(p)!r} must hold a dict with flatH, mu and n, got {keys}")
    try:
        n = int(data["n"])
    except (TypeError, ValueError):
        raise ValueError(f"Hessian file {str(p)!r}: n must be an integer, got {data['n']!r}") from None
    flat, mu = data["flatH"], data["mu"]
    if not isinstance(flat, torch.Tensor) or not isinstance(mu, torch.Tensor):
        raise ValueError(f"Hessian file {str(p)!r}: flatH and mu must be tensors")
    if n < 1 or flat.dim() != 1 or flat.numel() != n * (n + 1) // 2 or tuple(mu.shape) != (n,):
        raise ValueError(f"Hessian file {str(p)!r}: n = {n} needs flatH of {n * (n + 1) // 2} values "
                         f"and mu of shape ({n},), got {tuple(flat.shape)} and {tuple(mu.shape)}")
    if in_features is not None and n != in_features:
        raise ValueError(f"Hessian file {str(p)!r} is {n}x{n}, the layer has {in_features} inputs")
    ct = int(data.get("ct", 0) or 0)
    flat64, mu64 = flat.to(torch.float64), mu.to(torch.float64)
    if not (torch.isfinite(flat64).all() and torch.isfinite(mu64).all()):
        raise ValueError(f"Hessian file {str(p)!r} holds NaN or Inf")
    h = torch.zeros(n, n, dtype=torch.float64)
    r, c = torch.tril_indices(n, n)
    h[r, c] = flat64
    h[c, r] = flat64
    h += torch.outer(mu64, mu64)
    if not float(h.diagonal().mean()) > 0.0:
        raise ValueError(f"Hessian file {str(p)!r}: the second moment has a non-positive mean "
                         "diagonal (all-zero inputs?)")
    return h, ct


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
    hessian_path : str
        Read each layer's Hessian from this folder in upstream's layout
        (``<index>_{qkv,o,up,down}.pt``, :func:`load_upstream_hessian`) instead of
        collecting it; no calibration data is then needed.
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
    hessian_path: Optional[str] = None

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
        if self.hessian_path is not None:
            self.hessian_path = str(self.hessian_path)
            if not os.path.isdir(self.hessian_path):
                raise ValueError(f"vptq: hessian_path {self.hessian_path!r} is not a folder")
        self.needs_calibration = bool(self.required_stats())

    def required_stats(self) -> "Tuple[str, ...]":
        return () if self.hessian_path is not None else tuple(self.stats)

    def collect(self, model: nn.Module, layers: Dict[str, nn.Linear],
                batches: Optional[torch.Tensor], progress: bool) -> Dict[str, Any]:
        from .gptq import collect_hessians

        if self.hessian_path is not None:
            return {}
        if batches is None:
            raise ValueError("vptq needs calibration data for the layer Hessians (pass calibration=...)")
        return collect_hessians(model, layers, batches, progress=progress)

    def quantize_layer(self, name: str, linear: nn.Linear,
                       stats: Dict[str, Any]) -> QuantLinearBase:
        from .gptq import hessian_for_gptq

        in_f = linear.in_features
        if self.hessian_path is not None:
            path = upstream_hessian_file(self.hessian_path, name)
            log.info("%s: Hessian from %s", name, path)
            h, _ = load_upstream_hessian(path, in_f)
        else:
            h = hessian_for_gptq(stats, name)
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


# -- writing upstream's config_for_layers ----------------------------------------------

#: Keys of upstream's quantization_config that sqllm writes beside its own.
UPSTREAM_KEYS = ("config_for_layers", "shared_layer_config")


def upstream_layer_entry(lf: Any) -> Dict[str, Any]:
    """Upstream's ``config_for_layers`` entry (the keyword arguments of its
    ``VQuantLinear``) of one ``vq`` :class:`sqllm.config.LayerFormat`."""
    p = lf.params
    outlier = int(p.get("outlier_size", 0))
    kr = int(p.get("num_res_centroids", 0))
    return {"in_features": int(lf.in_features), "out_features": int(lf.out_features),
            "vector_lens": [int(p["outlier_vector_len"]) if outlier else -1, int(p["vector_len"])],
            "num_centroids": [int(p["outlier_centroids"]) if outlier else -1,
                              int(p["num_centroids"])],
            "num_res_centroids": [-1, kr if kr > 0 else -1],
            "group_num": int(p.get("group_num", 1)), "group_size": int(p["group_size"]),
            "outlier_size": outlier, "indices_as_float": False, "is_indice_packed": True,
            "enable_norm": bool(p.get("enable_norm", False)),
            "enable_perm": bool(p.get("enable_perm", False)), "bias": bool(lf.bias)}


def add_upstream_keys(q: Dict[str, Any]) -> Dict[str, Any]:
    """sqllm's stored ``quantization_config`` ``q`` in upstream VPTQ's layout as well, when
    every quantized layer is ``vq``: ``quant_method: "vptq"``, ``config_for_layers`` (one
    entry per layer, :func:`upstream_layer_entry`) and ``shared_layer_config`` beside
    sqllm's own keys, which upstream's readers ignore and :func:`sqllm_view` reads back.
    Any other config is returned unchanged."""
    from .config import QuantizationConfig

    qc = QuantizationConfig.from_dict(q)
    if not qc.layers or any(lf.format != "vq" for lf in qc.layers.values()):
        return q
    out = dict(q)
    out["quant_method"] = "vptq"
    out["config_for_layers"] = {n: upstream_layer_entry(lf) for n, lf in qc.layers.items()}
    out["shared_layer_config"] = {}
    return out


def sqllm_view(q: Any) -> Any:
    """The sqllm ``quantization_config`` inside ``q``: ``q`` itself, or for a folder sqllm
    saved in upstream's layout (quant_method "vptq" with sqllm's ``format_version`` and
    ``layers`` beside ``config_for_layers``) the same dict as sqllm wrote it; ``q`` as
    is when it is neither (a plain upstream config)."""
    if (isinstance(q, dict) and q.get("quant_method") == "vptq" and "format_version" in q
            and "layers" in q and "config_for_layers" in q):
        d = {k: v for k, v in q.items() if k not in UPSTREAM_KEYS}
        d["quant_method"] = "sqllm"
        return d
    return q
