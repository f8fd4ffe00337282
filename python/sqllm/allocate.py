"""Bits where they matter: per-layer choices under a total bit budget.

Every layer ``l`` has candidate configurations ``k`` with a storage cost
``cost[l][k]`` (bits, integers) and a measured error ``err[l][k]`` (the
Fisher-weighted squared error of the layer quantized that way: ½ Σ F δw² is the
second-order estimate of the loss increase, additive over layers).  The
allocation minimises Σ err over one choice per layer subject to Σ cost ≤
budget: a multiple-choice knapsack, solved exactly by dynamic programming over
the budget discretised in units of ``unit`` bits.  Costs are rounded *up* to
whole units and the budget *down*, so the result never exceeds the budget; it
is the exact optimum whenever the costs are multiples of the unit (always with
``resolution >= budget`` for integer costs), and otherwise optimal for the
rounded costs.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["solve_mckp", "measure_glut_errors", "allocate_glut"]

log = logging.getLogger(__name__)

#: Measured errors by (SHA-1 of the weight and sensitivity, shape, kmeans, bits,
#: group_size): (error with the compact tables, error with the float k-means
#: tables); a process reuses them across budgets (a few floats per layer).
_MEASURED: Dict[tuple, Tuple[float, float]] = {}


def solve_mckp(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]],
               budget: float, resolution: int = 100_000) -> List[int]:
    """Choose one candidate per layer minimising the summed error with the summed
    cost <= budget.  ``costs``: non-negative integers (bits); ``errors``: finite
    floats; ``resolution``: the number of budget units of the DP (unit =
    max(1, floor(budget / resolution)) bits).  Returns the chosen index per layer.
    Raises ValueError if even the cheapest choices exceed the budget."""
    L = len(costs)
    if L == 0:
        return []
    if len(errors) != L:
        raise ValueError(f"costs has {L} layers but errors has {len(errors)}")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    if int(resolution) < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    cs, es = [], []
    for l, (c, e) in enumerate(zip(costs, errors)):
        c = np.asarray(c)
        e = np.asarray(e, dtype=np.float64)
        if c.ndim != 1 or c.size == 0 or c.shape != e.shape:
            raise ValueError(f"layer {l}: costs and errors must be equal-length non-empty lists")
        if not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
            raise ValueError(f"layer {l}: costs must be non-negative integers, got {c.tolist()}")
        if not np.isfinite(e).all():
            raise ValueError(f"layer {l}: errors must be finite, got {e.tolist()}")
        cs.append(c.astype(np.int64))
        es.append(e)
    cheapest = sum(int(c.min()) for c in cs)
    if cheapest > budget:
        raise ValueError(f"the budget of {budget:.6g} bits is below the cheapest choice of every "
                         f"layer ({cheapest} bits)")
    unit = max(1, int(budget // int(resolution)))
    cap = int(budget // unit)
    cu = [-(-c // unit) for c in cs]  # ceil
    inf = np.inf
    dp = np.zeros(cap + 1)  # best error with total units <= c
    choice = np.zeros((L, cap + 1), dtype=np.int16)
    for l in range(L):
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for k in range(cu[l].size):
            u = int(cu[l][k])
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = dp[:cap + 1 - u] + es[l][k]
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp = new
        choice[l] = arg
    if not np.isfinite(dp[cap]):
        raise ValueError(f"the budget of {budget:.6g} bits cannot be met once costs are rounded "
                         f"up to units of {unit} bits; raise resolution")
    picks = [0] * L
    c = cap
    for l in range(L - 1, -1, -1):
        k = int(choice[l, c])
        picks[l] = k
        c -= int(cu[l][k])
    return picks


def measure_glut_errors(weights: Dict[str, np.ndarray], fisher: Dict[str, np.ndarray],
                        candidates: Sequence[Tuple[int, int]], kmeans: str = "exact",
                        progress: bool = False,
                        max_rows: int = 0) -> Dict[str, Tuple[List[int], List[float]]]:
    """name -> (costs, errors) over ``candidates`` ((bits, group_size) pairs): the
    stored bits of the layer in the glut format and the Fisher-weighted squared
    error Σ F (W - Ŵ)² of the layer quantized by the grouped k-means.

    ``max_rows > 0``: the error is measured on every s-th row (s = ceil(out /
    max_rows); tables are per row, so a row's error does not depend on the
    others) and scaled by out / rows measured -- an estimate; costs are exact."""
    from tqdm.auto import tqdm

    from . import _C
    from .nn_glut import glut_storage_bits

    out: Dict[str, Tuple[List[int], List[float]]] = {}
    for name in tqdm(list(weights), desc="glut sensitivity", unit="layer", disable=not progress):
        w_full = np.asarray(weights[name], dtype=np.float32)
        f = fisher.get(name)
        stride = max(1, -(-w_full.shape[0] // max_rows)) if max_rows > 0 else 1
        w = np.ascontiguousarray(w_full[::stride])
        f = None if f is None else np.ascontiguousarray(np.asarray(f, dtype=np.float32)[::stride])
        scale = w_full.shape[0] / w.shape[0]
        digest = hashlib.sha1(w.tobytes())
        digest.update(b"-" if f is None else f.tobytes())
        key0 = (digest.hexdigest(), w.shape, kmeans)
        costs, errs = [], []
        for bits, g in candidates:
            key = key0 + (int(bits), int(g))
            if key not in _MEASURED:
                r = _C.glut_quantize(w, f, int(bits), int(g), kmeans)
                _MEASURED[key] = (float(np.sum(r["sse"])), float(np.sum(r["sse_float"])))
            costs.append(glut_storage_bits(w_full.shape[0], w_full.shape[1], bits, g))
            errs.append(_MEASURED[key][0] * scale)
        out[name] = (costs, errs)
    return out


def allocate_glut(weights: Dict[str, np.ndarray], fisher: Dict[str, np.ndarray],
                  budget_bits_per_weight: float, candidates: Sequence[Tuple[int, int]],
                  kmeans: str = "exact", resolution: int = 100_000,
                  progress: bool = False, max_rows: int = 0) -> Dict[str, Tuple[int, int]]:
    """The per-layer (bits, group_size) minimising the summed Fisher-weighted error with
    the stored bits of all layers <= budget_bits_per_weight x their number of weights."""
    names = list(weights)
    n = sum(int(np.asarray(weights[k]).size) for k in names)
    meas = measure_glut_errors(weights, fisher, candidates, kmeans, progress, max_rows)
    picks = solve_mckp([meas[k][0] for k in names], [meas[k][1] for k in names],
                       float(budget_bits_per_weight) * n, resolution)
    plan = {k: tuple(int(v) for v in candidates[p]) for k, p in zip(names, picks)}
    used = sum(meas[k][0][p] for k, p in zip(names, picks))
    log.info("glut allocation: %.4f bits/weight used of a %.4f budget over %d layers",
             used / n, budget_bits_per_weight, len(names))
    return plan  # type: ignore[return-value]
