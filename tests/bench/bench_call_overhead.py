#!/usr/bin/env python3
"""Per-call cost of a SmolLM2-sized quantized layer on the CPU, one process.

For a 4-bit row-grouped ``QuantLinear`` of each ``--shapes`` entry at batch 1
(x of shape (1, 1, in), ``torch.inference_mode()``, weights in cache) prints
the minimum over ``--calls`` single calls of:

* ``QuantLinear(x)`` (the whole forward);
* the same forward with ``_C.lut_matmul`` replaced by a function returning a
  preallocated result (the Python part alone);
* ``_C.lut_matmul`` called directly on the cached operands (the C++ part);
* torch's fp32 ``F.linear`` on the same shape (the peer, same process).

Usage: OMP_NUM_THREADS=1 python tests/bench/bench_call_overhead.py [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import sqllm.nn as snn
from sqllm import _C
from sqllm.nn import QuantLinear


def min_call_us(fn, calls: int) -> float:
    pc = time.perf_counter
    best = float("inf")
    for _ in range(calls):
        t = pc()
        fn()
        best = min(best, pc() - t)
    return best * 1e6


class _NoKernel:
    """Stands in for sqllm._C with a lut_matmul that does no work."""

    def __init__(self, y: np.ndarray) -> None:
        self._y = y

    def __getattr__(self, name):
        return getattr(_C, name)

    def lut_matmul(self, *args, **kwargs):
        return self._y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="576x576,1536x576,576x1536", help="out x in, comma-separated")
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"kernel {_C.cpu_kernel()}; torch threads {torch.get_num_threads()}; "
          f"min over {args.calls} calls (us)\n")
    print("| out x in | QuantLinear | Python part | _C.lut_matmul | torch fp32 F.linear |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        out, inn = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(out, inn) * 0.02
        q = QuantLinear.from_weight(w, bits=4, kmeans="lloyd")
        x = torch.randn(1, 1, inn)
        x2 = x.view(1, inn)
        with torch.inference_mode():
            full = min_call_us(lambda: q(x), args.calls)
            snn._C = _NoKernel(np.zeros((1, out), np.float32))
            try:
                py = min_call_us(lambda: q(x), args.calls)
            finally:
                snn._C = _C
            codes, tables, _ = q._cpu_state()
            xn = x2.numpy()
            c = min_call_us(lambda: _C.lut_matmul(xn, codes, tables, 4, inn, "row", None, 0, True),
                            args.calls)
            fl = min_call_us(lambda: torch.nn.functional.linear(x2, w), args.calls)
        print(f"| {out}x{inn} | {full:.1f} | {py:.1f} | {c:.1f} | {fl:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
