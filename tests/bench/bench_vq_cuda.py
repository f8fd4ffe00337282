#!/usr/bin/env python3
"""Benchmark the CUDA VQ kernels (sqllm.kernels_cuda_vq) against fp16 cuBLAS.

For each weight shape (out x in), VQ setting (v/k/k_res) and batch, the script times

* gemv    -- the fused gather GEMV (``kernels_cuda_vq.vq_matmul``, fp16 activations),
* deq+mm  -- ``vq_dequantize`` to fp16 + ``F.linear`` (cuBLAS), the path above
  ``GEMV_MAX_BATCH`` rows,
* cuBLAS  -- ``F.linear`` with a dense fp16 weight of the same shape,

with the speed-up of the GEMV over cuBLAS.  Every setting uses perm + norm (as
VPTQ's published models).  Timing as bench_cuda.py: CUDA graphs of ``--iters``
calls, median of ``--repeats`` replays; the calls cycle through enough copies of
the layer that their bytes exceed 3x the L2 cache.  A correctness check (GEMV vs
dequantize + fp32 matmul, relative error) runs first.

Usage (needs a CUDA device and sqllm built with CUDA):
    python tests/bench/bench_cuda.py --vq
    python tests/bench/bench_vq_cuda.py --shapes 4096x4096 --configs 8/65536/256 --batch 1
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cuda import parse_shape, time_graph  # noqa: E402

DEFAULT_SHAPES = ["4096x4096", "11008x4096", "4096x11008"]
DEFAULT_CONFIGS = ["8/65536/256", "6/4096/0", "4/2048/0"]


def make_layer(out_f: int, in_f: int, v: int, k: int, kr: int, gen: torch.Generator):
    from sqllm.nn_vq import VQQuantLinear

    layer = VQQuantLinear(in_f, out_f, v, k, kr, enable_perm=True, enable_norm=True, bias=False)
    layer.indices.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, layer.indices.shape, generator=gen,
                                      dtype=torch.int64).to(torch.int32))
    if layer.index_bits * layer.group_size % 32:
        layer.indices[..., -1] &= (1 << (layer.index_bits * layer.group_size % 32)) - 1
    layer.centroids.weight.copy_(torch.randn(layer.centroids.weight.shape, generator=gen) * 0.02)
    if layer.res_centroids is not None:
        layer.res_centroids.weight.copy_(torch.randn(layer.res_centroids.weight.shape,
                                                     generator=gen) * 0.005)
    layer.perm.copy_(torch.randperm(in_f, generator=gen).to(torch.int16))
    layer.weight_scale.copy_(1.0 + 0.1 * torch.rand(in_f, generator=gen))
    layer.weight_bias.copy_(0.001 * torch.randn(in_f, generator=gen))
    return layer.cuda()


def layer_bytes(layer) -> int:
    from sqllm.kernels_cuda_vq import _operands

    ops = _operands(layer, torch.device("cuda"))
    return sum(t.numel() * t.element_size() for t in ops.values() if t is not None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="out x in")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="v/k/k_res")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-graph", action="store_true")
    args = ap.parse_args(argv)

    from sqllm import kernels_cuda_vq as kv

    if not kv.available():
        print("the CUDA VQ kernels are not available (no CUDA build or no device)", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2 ** 20))
    print(f"device: {props.name}; fp16 activations; CUDA graph of {args.iters} calls, median of "
          f"{args.repeats}\n")
    print("| out x in | v/k/k_res | batch | gemv (us) | deq+mm (us) | cuBLAS fp16 (us) | "
          "cuBLAS/gemv | rel err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    bad: List[str] = []
    for shape in args.shapes:
        out_f, in_f = parse_shape(shape)
        n_dense = max(1, -(-3 * l2 // (out_f * in_f * 2)))
        dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) * 0.02
                 for _ in range(n_dense)]
        for cfg in args.configs:
            v, k, kr = (int(s) for s in cfg.split("/"))
            one = make_layer(out_f, in_f, v, k, kr, gen)
            n_copies = max(1, -(-3 * l2 // layer_bytes(one)))
            layers = [one] + [make_layer(out_f, in_f, v, k, kr, gen) for _ in range(n_copies - 1)]
            for lay in layers:
                layer_bytes(lay)  # convert the buffers outside the timed graphs
            w32 = kv.vq_dequantize(one, torch.float32, "cuda")
            for batch in args.batch:
                x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
                ref = x.float() @ w32.t()
                y = kv.vq_matmul(x, one).float()
                err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                if err > 1e-2:
                    bad.append(f"{shape} {cfg} batch {batch}: rel err {err:.3g}")
                t_g = time_graph(lambda i: kv.vq_matmul(x, layers[i % n_copies]), args.iters,
                                 args.repeats, args.warmup, not args.no_graph)
                t_d = time_graph(lambda i: F.linear(x, kv.vq_dequantize(layers[i % n_copies],
                                                                        torch.float16, "cuda")),
                                 max(10, args.iters // 10), args.repeats, 2, not args.no_graph)
                t_r = time_graph(lambda i: F.linear(x, dense[i % n_dense]), args.iters,
                                 args.repeats, args.warmup, not args.no_graph)
                print(f"| {shape} | {cfg} | {batch} | {t_g * 1e6:.1f} | {t_d * 1e6:.1f} | "
                      f"{t_r * 1e6:.1f} | {t_r / t_g:.2f}x | {err:.2e} |", flush=True)
            del layers, one, w32
        del dense
        torch.cuda.empty_cache()
    if bad:
        print("\nWRONG RESULTS:\n  " + "\n  ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
