"""Compensated (double-double) float64 sums whose result does not depend on the order of terms.

Calibration statistics are sums over calibration samples: the Hessian XᵀX,
the activation sums and the Fisher diagonal.  A plain float64 running sum
depends on the order of its terms, so a data-parallel run (each rank sums its
shard, the shards' sums are added) would differ from the single-process run in
the last bits, and a quantizer fed those statistics (GPTQ's rounding, k-means
weights) could flip a code.  :class:`CompensatedSum` keeps every sum as an
unevaluated pair ``hi + lo``: each addition is Knuth's error-free TwoSum (``hi``
takes the rounded sum, the exact rounding error goes into ``lo``); pairs from
several ranks are merged the same way; the result is ``hi + lo`` rounded once.

Bound: with ``n`` terms ``x_i`` (per-sample contributions) and ``u = 2^-53``,
``hi + lo`` differs from the exact sum by at most about ``n·u²·Σ|x_i|`` (only the
accumulation of ``lo`` rounds), so the rounded result is the correctly rounded
exact sum (hence independent of the order and of the way the terms are split
over ranks) unless the exact sum lies within ``n·u²·Σ|x_i|`` of a midpoint
between two float64 numbers; otherwise any two orders differ by at most one
unit in the last place.  For a Hessian entry of 32 samples that window is
~2^-101 relative to Σ|x_i|: a mismatch is a ~2^-48 event per entry.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["CompensatedSum", "two_sum", "merge_pairs"]


def two_sum(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def merge_pairs(pairs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge ``(hi, lo)`` pairs (e.g. one per rank, in rank order) into one pair."""
    it = iter(pairs)
    hi, lo = next(it)
    hi, lo = hi.clone(), lo.clone()
    for h, l in it:
        hi, e = two_sum(hi, h)
        lo += l
        lo += e
    return hi, lo


class CompensatedSum:
    """A float64 running sum kept as ``hi + lo`` (see the module docstring).

    ``add(x)`` adds a tensor (converted to float64); :meth:`value` is the sum
    rounded once; :meth:`pair` the unevaluated pair, for merging partial sums.
    """

    def __init__(self, shape, device: Optional[torch.device] = None) -> None:
        self.hi = torch.zeros(shape, dtype=torch.float64, device=device)
        self.lo = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.to(self.hi.device, torch.float64)
        s = self.hi + x
        bb = s - self.hi
        # e = (hi - (s - bb)) + (x - bb), in place to limit temporaries
        self.hi -= s - bb
        self.hi += x - bb
        self.lo += self.hi
        self.hi = s

    def add_square(self, g: torch.Tensor) -> None:
        """Add ``g²`` elementwise (exact in float64 for a float32 ``g``)."""
        g = g.to(self.hi.device, torch.float64)
        self.add(g * g)

    def pair(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.hi, self.lo

    def value(self) -> torch.Tensor:
        return self.hi + self.lo

    @staticmethod
    def finish(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        return hi + lo
