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

from .._memory import return_freed_memory

__all__ = ["CompensatedSum", "SymmetricCompensatedSum", "two_sum", "two_sum_into", "merge_pairs"]


def two_sum(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def two_sum_into(hi: torch.Tensor, lo: torch.Tensor, x: torch.Tensor) -> None:
    """In place: ``hi, lo <- TwoSum(hi, x)`` with the error added to ``lo`` (views allowed).

    The same operations, in the same order, as :meth:`CompensatedSum.add`.
    """
    s = hi + x
    bb = s - hi
    e = hi - (s - bb)
    e += x - bb
    lo += e
    hi.copy_(s)


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


class SymmetricCompensatedSum:
    """A compensated float64 sum of symmetric n x n matrices XᵀX, upper triangle only.

    Rows are kept in blocks of ``ROWS`` (block ``b`` holds rows ``[r0, r1)`` and
    columns ``[r0, n)``: the upper triangle plus the lower half of the diagonal
    block), so the pair ``hi + lo`` costs about n² float64 in all -- as much as
    one full matrix, half of a full pair -- and :meth:`add_gram` adds ``XᵀX``
    block by block, never forming the n x n product (for an 11008-wide
    ``down_proj``: 0.97 GB per full matrix).  :meth:`take` returns the full
    symmetric sum, freeing the blocks as it fills it.
    """

    ROWS = 256

    def __init__(self, n: int, device: Optional[torch.device] = None) -> None:
        self.n = int(n)
        self.bounds = [(r0, min(self.n, r0 + self.ROWS)) for r0 in range(0, self.n, self.ROWS)]
        self.hi = [torch.zeros(r1 - r0, self.n - r0, dtype=torch.float64, device=device)
                   for r0, r1 in self.bounds]
        self.lo = [torch.zeros_like(h) for h in self.hi]

    @staticmethod
    def packed_len(n: int) -> int:
        R = SymmetricCompensatedSum.ROWS
        return sum((min(n, r0 + R) - r0) * (n - r0) for r0 in range(0, n, R))

    def gram_blocks(self, x: torch.Tensor):
        """The blocks of ``XᵀX`` (x: [rows, n] float64), in the layout of the sums."""
        for r0, r1 in self.bounds:
            yield x[:, r0:r1].T @ x[:, r0:]

    def add_blocks(self, blocks) -> None:
        """Add precomputed :meth:`gram_blocks` (e.g. shared by Linears fed one input)."""
        for hi, lo, p in zip(self.hi, self.lo, blocks):
            two_sum_into(hi, lo, p)

    def add_gram(self, x: torch.Tensor) -> None:
        self.add_blocks(self.gram_blocks(x))

    def pair(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The unevaluated pair, packed into two 1-D tensors (for merging partials)."""
        return (torch.cat([h.reshape(-1) for h in self.hi]),
                torch.cat([l.reshape(-1) for l in self.lo]))

    def take(self) -> torch.Tensor:
        """The full symmetric float64 sum ``hi + lo`` (rounded once); the sum is consumed."""
        H = torch.empty(self.n, self.n, dtype=torch.float64, device=self.hi[0].device if self.hi else None)
        freed = 0
        for b, (r0, r1) in enumerate(self.bounds):
            torch.add(self.hi[b], self.lo[b], out=H[r0:r1, r0:])
            freed += 2 * self.hi[b].numel() * 8
            self.hi[b] = self.lo[b] = None  # freed as H fills ...
            if freed >= 64 << 20:  # ... and given back (blocks < 32 MB live in the heap)
                return_freed_memory()
                freed = 0
        self.hi, self.lo = [], []
        return_freed_memory()
        return _mirror_upper(H, self.bounds)

    @classmethod
    def finish_packed(cls, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        """The full symmetric matrix from a (merged) packed :meth:`pair`."""
        L = hi.numel()
        n = _width_of(L, cls.packed_len)
        R = cls.ROWS
        bounds = [(r0, min(n, r0 + R)) for r0 in range(0, n, R)]
        H = torch.empty(n, n, dtype=torch.float64, device=hi.device)
        off = 0
        for r0, r1 in bounds:
            k = (r1 - r0) * (n - r0)
            torch.add(hi[off:off + k].view(r1 - r0, n - r0), lo[off:off + k].view(r1 - r0, n - r0),
                      out=H[r0:r1, r0:])
            off += k
        return _mirror_upper(H, bounds)


def _width_of(length: int, packed_len) -> int:
    """n with ``packed_len(n) == length`` (ValueError if none)."""
    lo, hi = 0, 1
    while packed_len(hi) < length:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if packed_len(mid) < length:
            lo = mid + 1
        else:
            hi = mid
    if packed_len(lo) != length:
        raise ValueError(f"a packed symmetric sum of {length} entries matches no matrix width")
    return lo


def _mirror_upper(H: torch.Tensor, bounds) -> torch.Tensor:
    """In place: the lower triangle of H becomes the transpose of its upper triangle."""
    for r0, r1 in bounds:
        d = H[r0:r1, r0:r1]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)
        H[r1:, r0:r1] = H[r0:r1, r1:].T
    return H
