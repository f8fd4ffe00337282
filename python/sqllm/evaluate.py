"""Perplexity evaluation with the GPTQ / SqueezeLLM methodology.

The token stream is cut into ``T // seqlen`` non-overlapping windows of
``seqlen`` tokens (the remainder is dropped); each window is run through the
model independently, and the perplexity is ``exp`` of the mean negative
log-likelihood of every predicted token (positions 1..seqlen-1 of each window,
each predicted from the window's earlier tokens). This is exactly GPTQ's
``exp(sum(loss_i * seqlen) / (n * seqlen))``, since every window predicts the
same number of tokens.

Functions
---------
perplexity
    Evaluate a causal LM on a token stream; returns a :class:`PerplexityResult`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "perplexity"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Result of :func:`perplexity`.

    Attributes
    ----------
    ppl : float
        Perplexity, ``exp(nll)``.
    nll : float
        Mean negative log-likelihood per predicted token, in nats.
    n_windows : int
        Number of ``seqlen``-token windows evaluated.
    seqlen : int
        Window length in tokens.
    n_tokens_evaluated : int
        Number of predicted (scored) tokens: ``n_windows * (seqlen - 1)``.
    seconds : float
        Wall-clock time of the evaluation.
    """

    ppl: float
    nll: float
    n_windows: int
    seqlen: int
    n_tokens_evaluated: int
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"ppl={self.ppl:.4f} (nll={self.nll:.5f} nats/token, {self.n_windows} windows x "
            f"{self.seqlen} tokens, {self.n_tokens_evaluated} predicted, {self.seconds:.1f} s)"
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Run the model and return its logits ``[B, L, V]``."""
    if hasattr(model, "config"):  # transformers model: skip building a KV cache
        out: Any = model(input_ids=batch, use_cache=False)
    else:
        out = model(batch)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM over non-overlapping windows of a token stream.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM: a transformers model, or any module mapping ``[B, L]`` ids
        to logits ``[B, L, V]`` (or an output with ``.logits``). It is run on
        its own device, in eval mode (its previous mode is restored afterwards),
        under :func:`torch.inference_mode`.
    input_ids : torch.LongTensor
        Token ids, shape ``[1, T]`` (or ``[T]``), e.g. from
        :func:`sqllm.data.tokenize_text`.
    seqlen : int, default 2048
        Window length. ``T // seqlen`` windows are evaluated; the remaining
        ``T % seqlen`` tokens are dropped.
    max_tokens : int, optional
        Use only the first ``max_tokens`` tokens (e.g. ``256 * seqlen`` for C4
        as in GPTQ).
    batch_size : int, default 1
        Windows per forward pass; does not change the result beyond float
        rounding.
    progress : bool, default True
        Show a tqdm progress bar.

    Under ``torch.distributed`` with several processes (:mod:`sqllm.distributed`)
    every rank calls this with the same arguments and evaluates a contiguous run
    of the windows; the per-window sums are gathered and added in window order,
    so the result equals the single-process one bit for bit.

    Returns
    -------
    PerplexityResult
        Perplexity, mean NLL, and the counts used.

    Raises
    ------
    ValueError
        If ``input_ids`` is not ``[1, T]`` integers, ``seqlen < 2``,
        ``batch_size < 1``, or there are fewer tokens than one window.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError("input_ids must be an integer torch.Tensor of shape [1, T]")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape [1, T], got {list(input_ids.shape)}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 (one context token and one target), got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        input_ids = input_ids[:, :max_tokens]
    n_tokens = input_ids.shape[1]
    n_windows = n_tokens // seqlen
    if n_windows == 0:
        raise ValueError(
            f"too few tokens for perplexity: {n_tokens} tokens"
            f"{' (after max_tokens)' if max_tokens is not None else ''}, need at least seqlen={seqlen}"
        )

    device = _model_device(model)
    windows = input_ids[0, : n_windows * seqlen].reshape(n_windows, seqlen).to(torch.long)
    was_training = model.training
    model.eval()
    window_nll = []  # per window, in order; summed below as Python floats (double precision)
    firsts = list(range(0, n_windows, batch_size))
    from .distributed import current

    dist = current()  # several processes: each evaluates a contiguous run of the batches
    if dist is not None:
        firsts = firsts[dist.rank * len(firsts) // dist.world:
                        (dist.rank + 1) * len(firsts) // dist.world]
        progress = progress and dist.rank == 0
    start = time.perf_counter()
    try:
        with torch.inference_mode(), tqdm(
            total=sum(min(batch_size, n_windows - f) for f in firsts), desc="perplexity",
            unit="window", disable=not progress
        ) as bar:
            for first in firsts:
                batch = windows[first : first + batch_size].to(device)
                logits = _logits(model, batch)
                if logits.shape[:2] != batch.shape:
                    raise ValueError(
                        f"model returned logits of shape {list(logits.shape)} for input {list(batch.shape)}"
                    )
                # Row by row: logits[b, :-1] is a contiguous view, so no [B, L, V] copy.
                for row in range(batch.shape[0]):
                    nll = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum")
                    window_nll.append(float(nll))
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    if dist is not None:
        window_nll = dist.all_sum_float(window_nll, "gathering the perplexity of the windows")
    total_nll = 0.0
    for v in window_nll:  # in window order: the same sum in one or several processes
        total_nll += v
    seconds = time.perf_counter() - start

    n_predicted = n_windows * (seqlen - 1)
    mean_nll = total_nll / n_predicted
    ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf
    result = PerplexityResult(
        ppl=ppl,
        nll=mean_nll,
        n_windows=n_windows,
        seqlen=seqlen,
        n_tokens_evaluated=n_predicted,
        seconds=seconds,
    )
    logger.info("perplexity: %s", result)
    return result
