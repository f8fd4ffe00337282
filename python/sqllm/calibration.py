"""Calibration statistics: the Fisher diagonal SqueezeLLM weights its k-means by.

The sensitivity of weight w is approximated by the diagonal of the empirical
Fisher information: the squared gradient of the language-model loss,
accumulated over calibration sequences one sequence at a time
(F = sum_s (dL_s/dw)^2, as SqueezeLLM's gradient framework computes it).

Gradients are never held for the whole model at once: each target weight's
gradient is squared into its accumulator by a post-accumulate-grad hook the
moment backward produces it, and then freed.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["fisher_diagonal", "find_linear_layers"]

log = logging.getLogger(__name__)


def find_linear_layers(model: nn.Module, exclude: Iterable[str] = ("lm_head",),
                       include_output_embeddings: bool = False) -> Dict[str, nn.Linear]:
    """All ``nn.Linear`` modules of a model by qualified name, discovered generically.

    The output embedding (``model.get_output_embeddings()``, e.g. ``lm_head``)
    and any module whose name or last name component is in ``exclude`` are
    left out.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) and not include_output_embeddings else None
    excl = set(exclude)
    layers: Dict[str, nn.Linear] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod is out_emb:
            continue
        if name in excl or name.rsplit(".", 1)[-1] in excl:
            continue
        layers[name] = mod
    return layers


def fisher_diagonal(model: nn.Module, batches: torch.Tensor,
                    layers: Optional[Dict[str, nn.Linear]] = None,
                    progress: bool = True) -> Dict[str, torch.Tensor]:
    """Sum over sequences of the squared gradient of the LM loss, per Linear weight.

    Parameters
    ----------
    model : a causal LM returning ``.loss`` when called with ``labels``.
    batches : LongTensor [nsamples, seqlen]
        Calibration token windows; each row is one backward pass.
    layers : dict name -> nn.Linear, optional
        Whose weights to measure; default :func:`find_linear_layers`.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    dict name -> float32 tensor shaped like the weight (on the CPU), >= 0.

    The sum over sequences is a compensated float64 sum rounded once
    (:mod:`sqllm.calib.compensated`), so it does not depend on the order of the
    sequences (data-parallel runs give the same bits).
    """
    parts = fisher_partials(model, batches, layers, progress)
    return {k: v.value().float().cpu() for k, v in parts.items()}


def fisher_partials(model: nn.Module, batches: torch.Tensor,
                    layers: Optional[Dict[str, nn.Linear]] = None,
                    progress: bool = True) -> Dict[str, Any]:
    """:func:`fisher_diagonal` before the final rounding: name -> a
    :class:`~sqllm.calib.compensated.CompensatedSum` of the squared gradients
    (float64 pairs, 16 bytes per weight), for merging the sums of several processes."""
    from .calib.compensated import CompensatedSum

    if not isinstance(batches, torch.Tensor) or batches.dim() != 2:
        raise ValueError("batches must be a 2-D LongTensor [nsamples, seqlen], got "
                         f"{getattr(batches, 'shape', type(batches).__name__)}")
    if batches.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"batches must hold token ids (int64), got {batches.dtype}")
    if batches.shape[0] == 0 or batches.shape[1] < 2:
        raise ValueError(f"batches must hold at least one sequence of >= 2 tokens, got shape "
                         f"{tuple(batches.shape)}")
    if layers is None:
        layers = find_linear_layers(model)
    if not layers:
        raise ValueError("no Linear layers to measure")

    device = next(model.parameters()).device
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    fisher: Dict[str, Any] = {}
    hooks: List[torch.utils.hooks.RemovableHandle] = []
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, lin in layers.items():
            w = lin.weight
            w.requires_grad_(True)
            fisher[name] = CompensatedSum(w.shape, device=w.device)

            def hook(param: torch.Tensor, acc: Any = fisher[name]) -> None:
                acc.add_square(param.grad.float())  # grad^2 exact in fp64, compensated sum
                param.grad = None

            hooks.append(w.register_post_accumulate_grad_hook(hook))
        for row in tqdm(batches, desc="fisher", unit="seq", disable=not progress):
            ids = row.unsqueeze(0).to(device)
            loss = model(input_ids=ids, labels=ids).loss
            if not torch.isfinite(loss):
                raise ValueError(f"calibration loss is not finite ({loss.item()})")
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return fisher
