#!/usr/bin/env python3
"""Benchmark the CUDA glut kernels (sqllm.kernels_cuda_glut) against fp16 cuBLAS.

For each weight shape (out x in), glut setting (bits/group_size) and batch, the
script times, side by side in one process,

* gemv    -- the fused GEMV (``kernels_cuda_glut.glut_matmul``, fp16 activations),
* deq+mm  -- ``glut_dequantize`` to fp16 + ``F.linear`` (cuBLAS): the layer's path
  above ``GEMV_MAX_BATCH`` rows,
* cuBLAS  -- ``F.linear`` with a dense fp16 weight of the same shape (the peer),

and prints the ratio cuBLAS time / gemv time and the bandwidth each achieves
(GB/s: bytes of the stored weight -- codes, uint8 tables, fp16 scales and
offsets; fp16 for cuBLAS -- plus x and y, over the time).  Timing as
bench_cuda.py: CUDA graphs of ``--iters`` calls, median of ``--repeats`` replays
(min and max printed too); the calls cycle through enough copies of the layer
that their bytes exceed 3x the L2 cache, so weights come from DRAM as in
decoding.  A correctness check (GEMV vs the fp32 dequantized weight) runs
first.  Default shapes: 4096x4096 and SmolLM2-135M's 576-wide projections.

Usage (needs a CUDA device and sqllm built with CUDA; bash cuda/gpu_check.sh glut):
    python tests/bench/bench_glut_cuda.py
    python tests/bench/bench_glut_cuda.py --shapes 4096x4096 --configs 3/128 --batch 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cuda import parse_shape  # noqa: E402

DEFAULT_SHAPES = ["4096x4096", "576x576", "1536x576", "576x1536"]
DEFAULT_CONFIGS = ["4/128", "3/128", "3/288"]


def time_graph(fn, iters: int, repeats: int, warmup: int, use_graph: bool) -> Tuple[float, float, float]:
    """(min, median, max) seconds per call of fn(k) over `repeats` replays of a
    CUDA graph of `iters` calls (k = call index, for buffer rotation)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for k in range(warmup):
            fn(k)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = None
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for k in range(iters):
                fn(k)
        graph.replay()
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: List[float] = []
    for _ in range(repeats):
        start.record()
        if graph is not None:
            graph.replay()
        else:
            for k in range(iters):
                fn(k)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return min(times), statistics.median(times), max(times)


def make_layer(out_f: int, in_f: int, bits: int, g: int, gen: torch.Generator):
    from sqllm.nn_glut import GlutQuantLinear

    layer = GlutQuantLinear(in_f, out_f, bits, g, bias=False)
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, layer.qweight.shape, generator=gen, dtype=torch.int64)
    if (in_f * bits) % 32:  # unused tail bits must be zero
        qw[:, -1] &= (1 << ((in_f * bits) % 32)) - 1
    layer.qweight.copy_(qw.to(torch.int32))
    layer.tables.copy_(torch.randint(0, 256, layer.tables.shape, generator=gen, dtype=torch.uint8))
    layer.scales.copy_((torch.rand(layer.scales.shape, generator=gen) * 1e-4).half())
    layer.offsets.copy_((torch.randn(layer.offsets.shape, generator=gen) * 0.01).half())
    layer.validate()
    return layer.cuda()


def layer_bytes(layer) -> int:
    return sum(getattr(layer, n).numel() * getattr(layer, n).element_size()
               for n in ("qweight", "tables", "scales", "offsets"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="out x in")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="bits/group_size")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-graph", action="store_true")
    args = ap.parse_args(argv)

    from sqllm import kernels_cuda_glut as kg

    if not kg.available():
        print("the CUDA glut kernels are not available (no CUDA build or no device)", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2 ** 20))
    print(f"device: {props.name}; fp16 activations; CUDA graph of {args.iters} calls, median "
          f"[min-max] of {args.repeats} replays; GEMV_MAX_BATCH = {kg.GEMV_MAX_BATCH}\n")
    print("| out x in | bits/g | batch | gemv (us) | gemv GB/s | deq+mm (us) | cuBLAS fp16 (us) | "
          "cuBLAS GB/s | cuBLAS/gemv | rel err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    bad: List[str] = []
    for shape in args.shapes:
        out_f, in_f = parse_shape(shape)
        n_dense = max(1, -(-3 * l2 // (out_f * in_f * 2)))
        dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) * 0.02
                 for _ in range(n_dense)]
        for cfg in args.configs:
            bits, g = (int(s) for s in cfg.split("/"))
            one = make_layer(out_f, in_f, bits, g, gen)
            n_copies = max(1, -(-3 * l2 // layer_bytes(one)))
            layers = [one] + [make_layer(out_f, in_f, bits, g, gen) for _ in range(n_copies - 1)]
            w32 = kg.glut_dequantize(one, torch.float32)
            for batch in args.batch:
                x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
                ref = x.float() @ w32.t()
                y = kg.glut_matmul(x, one).float()
                err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                if err > 1e-2:
                    bad.append(f"{shape} {cfg} batch {batch}: rel err {err:.3g}")
                io = 2 * batch * (in_f + out_f)
                t_g = time_graph(lambda i: kg.glut_matmul(x, layers[i % n_copies]), args.iters,
                                 args.repeats, args.warmup, not args.no_graph)
                t_d = time_graph(lambda i: F.linear(x, kg.glut_dequantize(layers[i % n_copies],
                                                                          torch.float16)),
                                 max(10, args.iters // 10), args.repeats, 2, not args.no_graph)
                t_r = time_graph(lambda i: F.linear(x, dense[i % n_dense]), args.iters,
                                 args.repeats, args.warmup, not args.no_graph)
                gbs = (layer_bytes(one) + io) / t_g[1] / 1e9
                gbs_r = (2 * out_f * in_f + io) / t_r[1] / 1e9
                print(f"| {shape} | {cfg} | {batch} | {t_g[1] * 1e6:.1f} [{t_g[0] * 1e6:.1f}-"
                      f"{t_g[2] * 1e6:.1f}] | {gbs:.0f} | {t_d[1] * 1e6:.1f} | {t_r[1] * 1e6:.1f} "
                      f"[{t_r[0] * 1e6:.1f}-{t_r[2] * 1e6:.1f}] | {gbs_r:.0f} | "
                      f"{t_r[1] / t_g[1]:.2f}x | {err:.2e} |", flush=True)
            del layers, one, w32
        del dense
        torch.cuda.empty_cache()
    if bad:
        print("\nWRONG RESULTS:\n  " + "\n  ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
