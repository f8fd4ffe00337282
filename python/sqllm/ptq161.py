"""PTQ1.61: below two bits per weight (seed 003; docs/formats.md, "ptq161").

Per Linear, a structured mask keeps the input channels with the largest
activation statistic (the top ``salient_ratio``, default 20 %) at ``wbits``-bit
per-row asymmetric codes; every other weight is one sign bit,

    Ŵ_bin = (r1 · r2) ⊙ (α ⊙ sign(W − μ) + μ)

with μ the row mean of the binarised weights, α the per-row scale (started at
its closed-form L2 optimum mean |W − μ|) and r1 (out) · r2 (in) a learnable
rank-1 factor.  α, r1, r2 (and, as options, learnable clipping of the salient
grids, LWC, and a per-channel scale between each norm and the Linears it feeds,
LET) are trained block by block with AdamW against the full-precision block
(upstream's loss: MSE to the full-precision block's output on the
full-precision input chain and on the quantized chain, plus the two
log-cosine terms).  The result is stored packed (:class:`PTQ161QuantLinear`).

Functions here are the pieces (mask, binarisation, salient grids, LET folding),
:class:`PTQ161` is the registered method ``"ptq161"``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .methods import QuantMethod, register_method
from .nn import QuantLinearBase
from .nn_ptq161 import PTQ161QuantLinear, _round_ste, fake_quant_activations
from .nn_uniform import check_uniform_options

__all__ = ["PTQ161", "salient_mask", "binarize", "closed_form_alpha", "salient_grid",
           "quantize_salient", "ptq161_linear", "find_norm_groups", "fold_let",
           "fake_quant_activations", "load_masks", "fold_let_vo", "vo_heads", "expand_vo_scale"]

log = logging.getLogger(__name__)


# -- the pieces -------------------------------------------------------------------

def salient_mask(stat: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool ``[in]``: the ``round(ratio * in)`` channels with the largest ``stat`` (ties: lower index)."""
    stat = torch.as_tensor(stat).detach().to(torch.float64).flatten()
    if stat.numel() == 0:
        raise ValueError("the activation statistic is empty")
    if not torch.isfinite(stat).all():
        raise ValueError("the activation statistic has NaN or Inf values")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"salient_ratio must be in [0, 1], got {ratio}")
    k = int(round(float(ratio) * stat.numel()))
    order = np.argsort(-stat.cpu().numpy(), kind="stable")
    mask = torch.zeros(stat.numel(), dtype=torch.bool)
    mask[torch.from_numpy(order[:k].copy())] = True
    return mask


def closed_form_alpha(d: torch.Tensor) -> torch.Tensor:
    """argmin_α Σ_j (d_j − α sign(d_j))² per row = mean |d| (the L2 optimum for fixed signs)."""
    return d.abs().mean(dim=1)


def binarize(w: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binarise the unmasked channels of ``w`` (out, in): returns ``(signs, alpha, mu)``,
    signs bool ``[out, n_bin]`` (True = +1, ``w − μ >= 0``), α and μ ``[out]``."""
    wb = w[:, ~mask]
    if wb.shape[1] == 0:
        z = torch.zeros(w.shape[0], dtype=w.dtype)
        return torch.zeros(w.shape[0], 0, dtype=torch.bool), z, z.clone()
    mu = wb.mean(dim=1)
    d = wb - mu[:, None]
    return d >= 0, closed_form_alpha(d), mu


def _groups_view(ws: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, int]:
    """(out, n) -> (out, groups, gs) zero-padded."""
    out, n = ws.shape
    gs = n if group_size < 0 else group_size
    groups = -(-n // gs)
    pad = groups * gs - n
    if pad:
        ws = F.pad(ws, (0, pad))
    return ws.view(out, groups, gs), pad


def salient_grid(ws: torch.Tensor, wbits: int, group_size: int,
                 lwc_lo: Optional[torch.Tensor] = None,
                 lwc_hi: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) asymmetric min-max grid of the salient columns ``ws`` (out, n_sal):
    ``(scale, zero)`` each ``[out, groups]``.  The range includes 0 (the ``uniform`` format's
    rule, so the zero point is a code); LWC shrinks it by sigmoid factors."""
    g, pad = _groups_view(ws, group_size)
    n = ws.shape[1]
    gs = g.shape[2]
    if pad:  # padded entries must not widen the range: give them the group's first value
        valid = (torch.arange(g.shape[1] * gs) < n).view(1, g.shape[1], gs)
        g = torch.where(valid, g, g[:, :, :1])
    lo = g.amin(dim=2).clamp(max=0)
    hi = g.amax(dim=2).clamp(min=0)
    if lwc_lo is not None:
        lo = lo * torch.sigmoid(lwc_lo)
        hi = hi * torch.sigmoid(lwc_hi)
    maxq = (1 << wbits) - 1
    scale = ((hi - lo) / maxq).clamp(min=1e-5)
    zero = (-lo / scale).round().clamp(0, maxq)
    return scale, zero


def _expand(t: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    """(out, groups) -> (out, n): each column's group value."""
    gs = n if group_size < 0 else group_size
    return t.repeat_interleave(gs, dim=1)[:, :n]


def quantize_salient(ws: torch.Tensor, wbits: int, group_size: int, scale: torch.Tensor,
                     zero: torch.Tensor) -> torch.Tensor:
    """Codes ``[out, n_sal]`` on the given grid (scale > 0, zero a code)."""
    n = ws.shape[1]
    s, z = _expand(scale, n, group_size), _expand(zero, n, group_size)
    return (torch.round(ws / s) + z).clamp(0, (1 << wbits) - 1)


def _half(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back (the stored precision), saturating at fp16's range."""
    return t.detach().float().clamp(-65504.0, 65504.0).half().float()


def ptq161_linear(w: torch.Tensor, mask: torch.Tensor, *, wbits: int = 4, group_size: int = -1,
                  alpha: Optional[torch.Tensor] = None, r1: Optional[torch.Tensor] = None,
                  r2: Optional[torch.Tensor] = None, lwc_lo: Optional[torch.Tensor] = None,
                  lwc_hi: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  abits: int = 16) -> PTQ161QuantLinear:
    """The packed layer of weight ``w`` (out, in) with salient ``mask`` [in]: signs and μ from
    ``w``, α (default: closed form), r1/r2 (default: ones), the salient grids (with LWC
    factors if given) rounded to fp16 before the codes are chosen."""
    w = torch.as_tensor(w).detach().to("cpu", torch.float32)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D tensor, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN or Inf values")
    mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
    if tuple(mask.shape) != (w.shape[1],):
        raise ValueError(f"mask must have shape ({w.shape[1]},), got {tuple(mask.shape)}")
    wbits, group_size = check_uniform_options(wbits, group_size)
    signs, a0, mu = binarize(w, mask)
    out, n_bin = signs.shape
    alpha = a0 if alpha is None else alpha.detach().float().cpu()
    r1 = torch.ones(out) if r1 is None else r1.detach().float().cpu().flatten()
    r2 = torch.ones(n_bin) if r2 is None else r2.detach().float().cpu().flatten()
    ws = w[:, mask]
    if ws.shape[1]:
        scale, zero = salient_grid(ws, wbits, group_size,
                                   None if lwc_lo is None else lwc_lo.detach().float().cpu(),
                                   None if lwc_hi is None else lwc_hi.detach().float().cpu())
        scale = _half(scale).clamp(min=2.0 ** -24)
        codes = quantize_salient(ws, wbits, group_size, scale, zero)
    else:
        scale = zero = torch.zeros(out, 0)
        codes = torch.zeros(out, 0)
    layer = PTQ161QuantLinear.from_parts(mask, signs, _half(alpha), _half(mu), _half(r1),
                                         _half(r2), codes.to(torch.int64), scale, zero, wbits,
                                         group_size, bias=bias, abits=abits)
    return layer


# -- LET: the norm -> Linears groups and the fold ------------------------------------

def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None


@torch.no_grad()
def find_norm_groups(block: nn.Module, linears: Dict[str, nn.Linear],
                     run: Any) -> List[Tuple[str, List[str]]]:
    """The block's norms whose output feeds Linears directly: ``[(norm name, [linear names])]``,
    found by running the block once (``run(block)``) and matching tensors by identity."""
    # The norm outputs are kept alive for the run: an id() is only unique among live
    # objects, and a freed output's id can come back as, e.g., the attention output.
    outs: Dict[int, Tuple[str, torch.Tensor]] = {}
    feeds: Dict[str, List[str]] = {}
    hooks = []

    def norm_of(x: Any) -> str:
        hit = outs.get(id(x))
        return hit[0] if hit is not None and hit[1] is x else ""

    for n, m in block.named_modules():
        if _is_norm(m):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, n=n: outs.__setitem__(id(out), (n, out))))
    for n, lin in linears.items():
        hooks.append(lin.register_forward_pre_hook(
            lambda mod, inp, n=n: feeds.setdefault(norm_of(inp[0]), []).append(n)))
    try:
        run(block)
    finally:
        for h in hooks:
            h.remove()
        outs.clear()
    return [(k, sorted(set(v), key=list(linears).index)) for k, v in feeds.items() if k]


@torch.no_grad()
def fold_let(norm: nn.Module, linears: List[nn.Linear], scale: torch.Tensor,
             shift: Optional[torch.Tensor] = None) -> None:
    """Fold a per-channel LET into ``norm`` and the ``linears`` it feeds: the norm's output
    becomes ``(y − shift) / scale`` and each Linear's weight ``W · diag(scale)`` (bias
    ``+ W · shift``), so the block computes the same function.  A shift needs a norm bias."""
    scale = scale.detach().to(norm.weight.device, torch.float32)
    if not torch.isfinite(scale).all() or bool((scale == 0).any()):
        raise ValueError("LET scale must be finite and non-zero")
    if shift is not None and getattr(norm, "bias", None) is None:
        raise ValueError(f"a LET shift needs a norm with a bias ({type(norm).__name__} has none)")
    for lin in linears:
        if shift is not None:
            b = lin.weight.float() @ shift.float()
            if lin.bias is None:
                lin.bias = nn.Parameter(b.to(lin.weight.dtype), requires_grad=False)
            else:
                lin.bias.add_(b.to(lin.bias.dtype))
        lin.weight.mul_(scale.to(lin.weight.dtype)[None, :])
    if shift is not None:
        norm.bias.sub_(shift.to(norm.bias.dtype))
        norm.bias.div_(scale.to(norm.bias.dtype))
    norm.weight.div_(scale.to(norm.weight.dtype))


def vo_heads(block: nn.Module, layers: Dict[str, Any]) -> Optional[Tuple[str, str, int, int]]:
    """The block's value and output projections for the v→o LET: ``(v name, o name, head_dim,
    query heads per kv head)``, or None when the block has no such pair."""
    rel = {id(m): n for n, m in block.named_modules()}
    v = next((n for n in layers if n.endswith("v_proj")), None)
    o = next((n for n in layers if n.endswith("o_proj")), None)
    if v is None or o is None or id(layers[v]) not in rel or id(layers[o]) not in rel:
        return None
    vrel, orel = rel[id(layers[v])], rel[id(layers[o])]
    parent = vrel.rsplit(".", 1)[0] if "." in vrel else ""
    if parent != (orel.rsplit(".", 1)[0] if "." in orel else ""):
        return None
    attn = block.get_submodule(parent)
    hd = getattr(attn, "head_dim", None)
    groups = getattr(attn, "num_key_value_groups", None)
    vout, oin = layers[v].weight.shape[0], layers[o].weight.shape[1]
    if not hd or not groups or vout % hd or vout * groups != oin:
        return None
    return v, o, int(hd), int(groups)


def expand_vo_scale(scale: torch.Tensor, head_dim: int, groups: int) -> torch.Tensor:
    """A scale per value channel (kv heads × head_dim) as one per o_proj input channel: each
    query head reads the value channels of its kv head (grouped-query attention)."""
    return scale.view(-1, 1, head_dim).expand(-1, groups, head_dim).reshape(-1)


@torch.no_grad()
def fold_let_vo(v_proj: nn.Linear, o_proj: nn.Linear, scale: torch.Tensor, head_dim: int,
                groups: int) -> None:
    """Fold the v→o LET (OmniQuant's out-projection smoothing): value channel c is divided by
    ``scale[c]`` (v_proj's row and bias) and every o_proj input channel that reads it is
    multiplied by it.  Attention mixes tokens per channel (softmax(QKᵀ) V), so the block
    computes the same function."""
    scale = scale.detach().to(v_proj.weight.device, torch.float32)
    if scale.shape != (v_proj.weight.shape[0],):
        raise ValueError(f"v→o LET scale must have {v_proj.weight.shape[0]} entries, got "
                         f"{tuple(scale.shape)}")
    if not torch.isfinite(scale).all() or bool((scale == 0).any()):
        raise ValueError("LET scale must be finite and non-zero")
    v_proj.weight.div_(scale.to(v_proj.weight.dtype)[:, None])
    if v_proj.bias is not None:
        v_proj.bias.div_(scale.to(v_proj.bias.dtype))
    o_proj.weight.mul_(expand_vo_scale(scale, head_dim, groups).to(o_proj.weight.dtype)[None, :])


# -- training ---------------------------------------------------------------------

class _TrainLinear(nn.Module):
    """A Linear fake-quantized as PTQ1.61 with learnable α, r1, r2 (and LWC, LET)."""

    def __init__(self, lin: nn.Linear, mask: torch.Tensor, wbits: int, group_size: int, lwc: bool,
                 abits: int, let_scale: Optional[nn.Parameter]) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        self.register_buffer("w", w)
        self.bias = None if lin.bias is None else lin.bias.detach().float()
        self.mask = mask.to(w.device)
        self.bin_idx = torch.nonzero(~self.mask).flatten()
        self.sal_idx = torch.nonzero(self.mask).flatten()
        self.wbits, self.group_size, self.abits = wbits, group_size, abits
        self.let_scale = let_scale
        self.let_out: Optional[nn.Parameter] = None  # v→o LET on this layer's rows (v_proj)
        self.let_vo_in: Optional[Tuple[nn.Parameter, int, int]] = None  # ... on its columns (o_proj)
        weff = self._weff()
        _, a0, _ = binarize(weff, self.mask)
        self.alpha = nn.Parameter(a0.clone())
        self.r1 = nn.Parameter(torch.ones(w.shape[0], device=w.device))
        self.r2 = nn.Parameter(torch.ones(len(self.bin_idx), device=w.device))
        groups = 0
        if len(self.sal_idx):
            groups = 1 if group_size < 0 else -(-len(self.sal_idx) // group_size)
        self.lwc_lo = self.lwc_hi = None
        if lwc and groups:
            # OmniQuant's start: sigmoid(4) ~ 0.982 of the min/max
            self.lwc_lo = nn.Parameter(torch.full((w.shape[0], groups), 4.0, device=w.device))
            self.lwc_hi = nn.Parameter(torch.full((w.shape[0], groups), 4.0, device=w.device))

    def _weff(self) -> torch.Tensor:
        w = self.w if self.let_scale is None else self.w * self.let_scale[None, :]
        if self.let_out is not None:
            w = w / self.let_out[:, None]
        if self.let_vo_in is not None:
            p, hd, groups = self.let_vo_in
            w = w * expand_vo_scale(p, hd, groups)[None, :]
        return w

    def _bias(self) -> Optional[torch.Tensor]:
        if self.bias is None or self.let_out is None:
            return self.bias
        return self.bias / self.let_out

    def weight_hat(self) -> torch.Tensor:
        weff = self._weff()
        parts = torch.zeros_like(weff)
        if len(self.bin_idx):
            wb = weff[:, self.bin_idx]
            mu = wb.mean(dim=1, keepdim=True)
            s = torch.where(wb - mu >= 0, 1.0, -1.0).detach()
            wq = self.r1[:, None] * self.r2[None, :] * (self.alpha[:, None] * s + mu)
            parts = parts.index_copy(1, self.bin_idx, wq)
        if len(self.sal_idx):
            ws = weff[:, self.sal_idx]
            scale, zero = salient_grid(ws, self.wbits, self.group_size, self.lwc_lo, self.lwc_hi)
            n = ws.shape[1]
            sc, zc = _expand(scale, n, self.group_size), _expand(zero, n, self.group_size)
            q = (_round_ste(ws / sc) + zc).clamp(0, (1 << self.wbits) - 1)
            parts = parts.index_copy(1, self.sal_idx, (q - zc) * sc)
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.let_scale is not None:
            x = x / self.let_scale
        x = fake_quant_activations(x, self.abits)
        return F.linear(x, self.weight_hat(), self._bias())

    def to_packed(self, bias: Optional[torch.Tensor]) -> PTQ161QuantLinear:
        return ptq161_linear(self._weff().detach(), self.mask.cpu(), wbits=self.wbits,
                             group_size=self.group_size, alpha=self.alpha, r1=self.r1, r2=self.r2,
                             lwc_lo=self.lwc_lo, lwc_hi=self.lwc_hi, bias=bias, abits=self.abits)


def _ptq161_loss(yq: torch.Tensor, yfp: torch.Tensor, yfq: torch.Tensor) -> torch.Tensor:
    """Upstream's loss: MSE(Y_fp, Y_q) + MSE(Y_fq, Y_q) − log|cos(Y_q, Y_fp)| − log|cos(Y_fq, Y_q)|
    (cosines per token over the hidden dimension, averaged)."""
    yq, yfp, yfq = yq.float(), yfp.float(), yfq.float()
    cos1 = F.cosine_similarity(yq, yfp, dim=-1).mean().abs().clamp(min=1e-8)
    cos2 = F.cosine_similarity(yfq, yq, dim=-1).mean().abs().clamp(min=1e-8)
    return F.mse_loss(yq, yfp) + F.mse_loss(yq, yfq) - torch.log(cos1) - torch.log(cos2)


def load_masks(path: str) -> Dict[str, torch.Tensor]:
    """Salient masks ``{layer name: bool [in]}`` from a saved ptq161 model folder (its
    ``mask`` buffers) or a safetensors file of bool/uint8 masks named by layer."""
    from safetensors.torch import load_file

    from .nn_ptq161 import unpack_bits

    files: List[str] = []
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    elif os.path.isfile(path):
        files = [path]
    if not files:
        raise ValueError(f"no safetensors masks at {path!r}")
    out: Dict[str, torch.Tensor] = {}
    for f in files:
        for k, t in load_file(f).items():
            if k.endswith(".mask") and t.dtype == torch.uint8 and t.dim() == 1:
                # a packed ptq161 mask: its length is known only with in_features; kept packed
                out[k[:-len(".mask")]] = t
            elif t.dtype == torch.bool and t.dim() == 1:
                out[k] = t
    if not out:
        raise ValueError(f"{path!r} holds no ptq161 masks")
    return out


def _mask_for(masks: Dict[str, torch.Tensor], name: str, in_features: int) -> torch.Tensor:
    from .nn_ptq161 import unpack_bits

    if name not in masks:
        raise ValueError(f"the mask file has no mask for layer {name!r}")
    t = masks[name]
    if t.dtype == torch.uint8:
        if t.numel() != (in_features + 7) // 8:
            raise ValueError(f"the mask of {name!r} has {t.numel()} bytes, expected "
                             f"{(in_features + 7) // 8} for in_features={in_features}")
        return torch.from_numpy(unpack_bits(t.numpy(), in_features))
    if t.numel() != in_features:
        raise ValueError(f"the mask of {name!r} has {t.numel()} entries, expected {in_features}")
    return t.clone()


@register_method
@dataclasses.dataclass
class PTQ161(QuantMethod):
    """PTQ1.61: salient channels at wbits, the rest binarised with trained scales (~1.6 bits).

    Attributes
    ----------
    bits : int
        Bits of the binarised part: 1 (sqllm.quantize's default 3 is read as unset).
    wbits : int
        Code width of the salient (masked) channels, 2..8.
    group_size : int
        -1 (one grid per row over the salient channels) or 32, 64, 128.
    abits : int
        Activation fake-quantization (per token, asymmetric) in training and evaluation;
        16 = none.
    salient_ratio : float
        Fraction of input channels kept at wbits (upstream hard-codes 0.2).
    act_stat : {"max_abs", "mean_abs"}
        The per-channel activation statistic that ranks channels for the mask.
    epochs : int
        Training epochs per block (0: closed-form α, no training).
    lwc : bool
        Learnable weight clipping of the salient grids.
    let : bool
        Learnable per-channel scale between each norm and the Linears it feeds, folded
        into the norm and the weights after training.
    lwc_lr : float
        Learning rate of the LWC parameters.
    let_lr : float
        Learning rate of the LET scales.
    let_vo : bool
        With ``let``, also the v→o scale (upstream's out-projection smoothing): per value
        channel, dividing v_proj's rows and multiplying the o_proj columns that read it,
        folded into both after training.
    alpha_lr : float
        Learning rate of α.
    factor_lr : float
        Learning rate of the rank-1 factors r1, r2.
    train_samples : int
        Calibration windows used per training epoch (0: all of --nsamples).
    seed : int
        Seeds the order of the training samples.
    masks : str
        Reuse the salient masks of a saved ptq161 model folder (the second PTQ after
        the restorative LoRA); empty: masks from the activation statistic.
    """

    name = "ptq161"
    needs_calibration = True
    stats = ("act_stats",)

    bits: int = 1
    wbits: int = 4
    group_size: int = -1
    abits: int = 16
    salient_ratio: float = 0.2
    act_stat: str = dataclasses.field(default="max_abs", metadata={
        "help": "the per-channel activation statistic that ranks channels for the mask",
        "choices": ["max_abs", "mean_abs"]})
    epochs: int = 20
    lwc: bool = False
    let: bool = False
    lwc_lr: float = 1e-2
    let_lr: float = 5e-3
    let_vo: bool = True
    alpha_lr: float = 5e-4
    factor_lr: float = 1e-3
    train_samples: int = 0
    seed: int = 0
    masks: str = ""

    def __post_init__(self) -> None:
        # sqllm.quantize passes its own default bits=3 to every method: taken as "unset".
        if int(self.bits) not in (1, 3):
            raise ValueError(f"ptq161 binarises the unmasked channels (1 bit); the salient "
                             f"channels' width is wbits: bits must be 1, got {self.bits}")
        self.bits = 1
        self.wbits, self.group_size = check_uniform_options(self.wbits, self.group_size)
        if not 1 <= int(self.abits) <= 16:
            raise ValueError(f"abits must be in 1..16 (16: no activation quantization), got {self.abits}")
        if not 0.0 <= float(self.salient_ratio) <= 1.0:
            raise ValueError(f"salient_ratio must be in [0, 1], got {self.salient_ratio}")
        if self.act_stat not in ("max_abs", "mean_abs"):
            raise ValueError(f"act_stat must be 'max_abs' or 'mean_abs', got {self.act_stat!r}")
        if self.epochs < 0 or self.train_samples < 0:
            raise ValueError("epochs and train_samples must be >= 0")
        for k in ("lwc_lr", "let_lr", "alpha_lr", "factor_lr"):
            v = float(getattr(self, k))
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{k} must be a finite number >= 0, got {v}")
        self._masks: Optional[Dict[str, torch.Tensor]] = load_masks(self.masks) if self.masks else None
        self._fp_chain: Optional[List[torch.Tensor]] = None
        self._last_block = -1
        self.history: Dict[str, List[float]] = {}

    def required_stats(self) -> Tuple[str, ...]:
        return () if self._masks is not None and not self.let else tuple(self.stats)

    def config(self) -> Dict[str, Any]:
        return {"method": self.name, **{f.name: getattr(self, f.name)
                                         for f in dataclasses.fields(self)}}

    # -- per layer (no training: the closed form) ---------------------------------
    def layer_mask(self, name: str, linear: nn.Linear, stats: Dict[str, Any]) -> torch.Tensor:
        if self._masks is not None:
            return _mask_for(self._masks, name, linear.in_features)
        st = stats.get("act_stats", {}).get(name)
        if st is None:
            raise ValueError(f"no activation statistics for layer {name!r}")
        return salient_mask(st[self.act_stat], self.salient_ratio)

    def quantize_layer(self, name: str, linear: nn.Linear,
                       stats: Dict[str, Any]) -> QuantLinearBase:
        try:
            return ptq161_linear(linear.weight, self.layer_mask(name, linear, stats),
                                 wbits=self.wbits, group_size=self.group_size, bias=linear.bias,
                                 abits=self.abits)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None

    # -- per block (training) --------------------------------------------------
    def _block_index(self, layers: Dict[str, nn.Linear]) -> int:
        m = re.search(r"\.(\d+)\.", os.path.commonprefix(list(layers)) if len(layers) > 1
                      else next(iter(layers), ""))
        return int(m.group(1)) if m else -1

    def quantize_block(self, block: nn.Module, block_inputs: Any, fp_outputs: Any,
                       stats: Dict[str, Any], *,
                       layers: Dict[str, nn.Linear]) -> Dict[str, QuantLinearBase]:
        if not layers:
            return {}
        if block_inputs is None or (self.epochs == 0 and not self.let):
            return {n: self.quantize_layer(n, lin, stats) for n, lin in layers.items()}
        from .calib.streamer import BlockInputs

        idx = self._block_index(layers)
        if idx <= 0 or idx != self._last_block + 1 or self._fp_chain is None or \
                len(self._fp_chain) != len(block_inputs):
            self._fp_chain = list(block_inputs.hidden)  # block 0: both chains coincide
        self._last_block = idx
        fp_in = block_inputs.with_hidden(self._fp_chain)
        y_fp = fp_in.run(block)                     # full-precision block, full-precision chain
        y_fq = fp_outputs if fp_outputs is not None else block_inputs.run(block)  # fp block, quantized chain
        self._fp_chain = y_fp

        masks = {n: self.layer_mask(n, lin, stats) for n, lin in layers.items()}
        dev = next(iter(layers.values())).weight.device
        # LET: one scale per norm -> Linears group (OmniQuant's start: sqrt(max|x| / max|w|))
        let_params: List[Tuple[nn.Module, List[str], nn.Parameter]] = []
        if self.let:
            for norm_name, names in find_norm_groups(block, layers, lambda b: block_inputs.with_hidden(
                    block_inputs.hidden[:1]).run(b)):
                act = stats["act_stats"][names[0]]["max_abs"].to(dev, torch.float32)
                wmax = torch.stack([layers[n].weight.detach().abs().amax(dim=0).float()
                                    for n in names]).amax(dim=0)
                s0 = (act.clamp(min=1e-5).sqrt() / wmax.clamp(min=1e-5).sqrt()).clamp(min=1e-5)
                let_params.append((block.get_submodule(norm_name), names, nn.Parameter(s0)))
        let_of = {n: p for _, names, p in let_params for n in names}
        vo = vo_heads(block, layers) if self.let and self.let_vo else None
        vo_param: Optional[nn.Parameter] = None
        if vo is not None:
            vn, on, hd, grp = vo
            act = stats["act_stats"][on]["max_abs"].to(dev, torch.float32)
            act = act.view(-1, grp, hd).amax(dim=1).reshape(-1)
            wmax = layers[on].weight.detach().abs().amax(dim=0).float().view(-1, grp, hd)
            wmax = wmax.amax(dim=1).reshape(-1)
            vo_param = nn.Parameter((act.clamp(min=1e-5).sqrt() / wmax.clamp(min=1e-5).sqrt())
                                    .clamp(min=1e-5))

        rel = {id(m): n for n, m in block.named_modules()}
        train = {n: _TrainLinear(lin, masks[n], self.wbits, self.group_size, self.lwc, self.abits,
                                 let_of.get(n)) for n, lin in layers.items()}
        if vo_param is not None:
            train[vo[0]].let_out = vo_param
            train[vo[1]].let_vo_in = (vo_param, vo[2], vo[3])
            with torch.no_grad():  # α's closed-form start for the scaled weights
                for n in vo[:2]:
                    train[n].alpha.copy_(binarize(train[n]._weff(), train[n].mask)[1])
        params = [p for p in block.parameters()]
        req = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        from .api import set_module

        for n, lin in layers.items():
            set_module(block, rel[id(lin)], train[n])
        groups = [{"params": [t.alpha for t in train.values()], "lr": self.alpha_lr},
                  {"params": [p for t in train.values() for p in (t.r1, t.r2)], "lr": self.factor_lr}]
        lwc_p = [p for t in train.values() for p in (t.lwc_lo, t.lwc_hi) if p is not None]
        if lwc_p:
            groups.append({"params": lwc_p, "lr": self.lwc_lr})
        let_all = [p for _, _, p in let_params] + ([vo_param] if vo_param is not None else [])
        if let_all:
            groups.append({"params": let_all, "lr": self.let_lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        gen = torch.Generator().manual_seed(self.seed + max(idx, 0))
        nb = len(block_inputs)
        nuse = min(nb, self.train_samples) if self.train_samples else nb
        hist: List[float] = []
        try:
            with torch.enable_grad():
                for _ in range(self.epochs):
                    order = torch.randperm(nb, generator=gen)[:nuse].tolist()
                    tot = 0.0
                    for b in order:
                        h = block_inputs.hidden[b]
                        o = block(h, *block_inputs.args[b], **block_inputs.kwargs[b])
                        yq = o[0] if isinstance(o, (tuple, list)) else o
                        loss = _ptq161_loss(yq, y_fp[b], y_fq[b])
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"ptq161: the training loss of block {idx} "
                                                     "became NaN/Inf; lower the learning rates")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        with torch.no_grad():
                            for p in let_all:  # keep scales away from zero
                                p.clamp_(min=1e-5)
                        tot += float(loss.detach())
                    hist.append(tot / max(nuse, 1))
        finally:
            for n, lin in layers.items():
                set_module(block, rel[id(lin)], lin)
            for p, r in zip(params, req):
                p.requires_grad_(r)
        if hist:
            log.info("ptq161 block %d: loss %.4g -> %.4g over %d epochs", idx, hist[0], hist[-1],
                     len(hist))
        self.history[str(idx)] = hist
        for norm, names, p in let_params:
            fold_let(norm, [layers[n] for n in names], p.detach())
        if vo_param is not None:
            fold_let_vo(layers[vo[0]], layers[vo[1]], vo_param.detach(), vo[2], vo[3])
        out = {}
        for n, lin in layers.items():
            t = train[n]
            if t.let_scale is not None or t.let_out is not None or t.let_vo_in is not None:
                t.let_scale = t.let_out = t.let_vo_in = None  # the folds put the scales into lin.weight
                t.w = lin.weight.detach().float()
            out[n] = t.to_packed(lin.bias)
        return out
