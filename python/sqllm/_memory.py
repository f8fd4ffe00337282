"""Giving freed heap memory back to the operating system (glibc's ``malloc_trim``)."""
from __future__ import annotations

from typing import Any

__all__ = ["return_freed_memory"]

_MALLOC_TRIM: Any = None


def return_freed_memory() -> None:
    """Give the allocator's freed heap pages back to the OS (glibc ``malloc_trim``).

    Tensors of a few MB to 32 MB come from glibc's heap (its mmap threshold rises
    to the size of the largest freed mapping, up to 32 MB), which keeps freed
    pages: without this the resident set keeps what a block's temporaries, or
    the blocks of a Hessian sum being turned into one matrix, once occupied.
    A no-op where glibc is not the allocator.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)
