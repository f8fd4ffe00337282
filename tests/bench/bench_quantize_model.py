#!/usr/bin/env python3
"""Whole-model SqueezeLLM time on the embedded SmolLM2-135M, and where it goes.

Times (wall and process CPU time, which a loaded machine inflates less)
``sqllm.quantize(model, bits=B, weighted=False, kmeans=K, progress=False)``
(no calibration: the k-means, the packing and the layer construction are the
whole cost) on a fresh copy of the model per repeat, and prints min/median.
With ``--profile`` one more run goes under cProfile and the functions with the
most own time are listed (C++ calls show as the pybind11 function, e.g.
``nuq_quantize``).  ``--digest`` prints a SHA-256 over every quantized layer's
codes and tables, so two builds can be checked to give identical results.

Usage: OMP_NUM_THREADS=2 python tests/bench/bench_quantize_model.py
           [--bits 4] [--kmeans lloyd] [--repeats 3] [--profile] [--digest]
"""

from __future__ import annotations

import argparse
import cProfile
import copy
import hashlib
import io
import os
import pstats
import statistics
import time

import torch


def digest(model: torch.nn.Module) -> str:
    from sqllm import QuantLinear

    h = hashlib.sha256()
    for name, m in sorted(model.named_modules(), key=lambda t: t[0]):
        if isinstance(m, QuantLinear):
            h.update(name.encode())
            h.update(m.qweight.numpy().tobytes())
            h.update(m.lookup_table.numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--kmeans", default="lloyd", choices=("lloyd", "exact"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--digest", action="store_true")
    args = ap.parse_args()

    import sqllm
    from sqllm.models import load_model

    base, _ = load_model()
    base.eval()
    print(f"sqllm from {sqllm.__file__}; torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load {os.getloadavg()[0]:.1f}")
    times, cpu = [], []
    last = None
    for _ in range(args.repeats):
        model = copy.deepcopy(base)
        c0, t0 = time.process_time(), time.perf_counter()
        sqllm.quantize(model, bits=args.bits, weighted=False, kmeans=args.kmeans, progress=False)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        last = model
    print(f"whole-model squeezellm {args.bits}-bit {args.kmeans}: wall min {min(times):.2f} s, "
          f"median {statistics.median(times):.2f} s, max {max(times):.2f} s; CPU time (all "
          f"threads) min {min(cpu):.2f} s, median {statistics.median(cpu):.2f} s over "
          f"{len(times)} runs; load {os.getloadavg()[0]:.1f}")
    if args.digest and last is not None:
        print("digest", digest(last))
    if args.profile:
        model = copy.deepcopy(base)
        prof = cProfile.Profile()
        prof.enable()
        sqllm.quantize(model, bits=args.bits, weighted=False, kmeans=args.kmeans, progress=False)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        print(s.getvalue())


if __name__ == "__main__":
    main()
