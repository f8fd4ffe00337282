#!/usr/bin/env python3
"""Benchmark the CUDA LUT GEMV (sqllm.kernels_cuda) against fp16 cuBLAS.

For each weight shape (out x in), bit width and batch, the script times

* ours   -- ``lut_matmul_cuda`` (fast kernel, float16 activations),
* cuBLAS -- ``torch.nn.functional.linear`` with the float16 weight,

and reports the speed-up and our achieved bandwidth (bytes of codes + tables
+ x + y per call over the time) as a fraction of the device-to-device copy
bandwidth measured in the same run ((read + write bytes) / time of a large
``Tensor.copy_``).

Method: every measurement replays a CUDA graph holding ``--iters`` back-to-back
calls (so Python and launch overheads are excluded and the GPU never idles),
timed with CUDA events; the reported time is the median over ``--repeats``
replays divided by ``--iters``.  The calls cycle through enough copies of the
weights that their total size exceeds 3x the L2 cache, so weights come from
DRAM as in real decoding.  A correctness check (vs. dequantize + float32
matmul) runs before timing each configuration.

Targets (batch 1): 3-bit >= 3.5x cuBLAS and >= 70 % of copy bandwidth; 4-bit >=
3x.  ``--check`` exits with status 1 when a target is missed.

Usage (needs a CUDA device and sqllm built with CUDA):
    python tests/bench/bench_cuda.py                      # the default table
    python tests/bench/bench_cuda.py --shapes 4096x4096 --bits 3 --batch 1 --iters 500
    python tests/bench/bench_cuda.py --vq             # the VQ kernels (bench_vq_cuda.py)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

DEFAULT_SHAPES = ["4096x4096", "11008x4096", "4096x11008"]


def parse_shape(s: str) -> Tuple[int, int]:
    out_f, in_f = s.lower().split("x")
    return int(out_f), int(in_f)


def time_graph(fn: Callable[[int], None], iters: int, repeats: int, warmup: int,
               use_graph: bool) -> float:
    """Median seconds per call of fn(k) (k = call index, for buffer rotation)."""
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
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
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
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = time_graph(lambda k: dst.copy_(src), iters=10, repeats=repeats, warmup=3, use_graph=True)
    return 2 * nbytes / t


def make_layer(out_f: int, in_f: int, bits: int, axis: str, gen: torch.Generator):
    words = (in_f * bits + 31) // 32
    codes = torch.randint(-2 ** 31, 2 ** 31 - 1, (out_f, words), dtype=torch.int32,
                          device="cuda", generator=gen)
    if (in_f * bits) % 32:  # unused tail bits must be zero
        codes[:, -1] &= (1 << ((in_f * bits) % 32)) - 1
    groups = out_f if axis == "row" else in_f
    tables = torch.randn(groups, 2 ** bits, device="cuda", generator=gen) * 0.02
    return codes, tables


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--vq" in argv:  # the VQ (VPTQ) kernels: tests/bench/bench_vq_cuda.py
        from bench_vq_cuda import main as vq_main

        return vq_main([a for a in argv if a != "--vq"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="--vq: benchmark the VQ kernels instead "
                                        "(bench_vq_cuda.py; its options follow)")
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="out x in, e.g. 4096x11008")
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--axis", choices=["row", "column"], default="row")
    ap.add_argument("--sparsity", type=float, default=0.0,
                    help="fraction of weights in the CSR part (e.g. 0.0045)")
    ap.add_argument("--iters", type=int, default=200, help="calls per timed graph replay")
    ap.add_argument("--repeats", type=int, default=25, help="replays; the median is reported")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-graph", action="store_true", help="time eager calls instead of a graph")
    ap.add_argument("--check", action="store_true", help="exit 1 if a batch-1 target is missed")
    ap.add_argument("--kernels", nargs="+", default=["auto"], choices=["auto", "tiled", "warp"],
                    help="fast kernels to time side by side (targets are checked for the first)")
    ap.add_argument("--dequant", action="store_true",
                    help="also time dequantize + cuBLAS (the path auto takes above 16 rows)")
    args = ap.parse_args(argv)

    from sqllm import _C
    from sqllm.kernels_cuda import dequantize_cuda, lut_matmul_cuda

    if not _C.cuda_compiled():
        print("sqllm was built without CUDA kernels", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2

    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2 ** 20))
    copy_bw = copy_bandwidth(1 << 30, args.repeats)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB; "
          f"device-to-device copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    print(f"dtype {args.dtype}, {args.axis} grouping, sparsity {args.sparsity}, "
          f"{'eager' if args.no_graph else 'CUDA graph'} of {args.iters} calls, median of "
          f"{args.repeats}\n")
    print("| out x in | bits | batch | kernel | ours (us) | cuBLAS fp16 (us) | speed-up | ours GB/s | "
          "% of copy BW |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")

    gen = torch.Generator(device="cuda").manual_seed(0)
    missed: List[str] = []
    for shape in args.shapes:
        out_f, in_f = parse_shape(shape)
        fp16_bytes = out_f * in_f * 2
        n_dense = max(1, -(-3 * l2 // fp16_bytes))
        dense = [torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen) * 0.02
                 for _ in range(n_dense)]
        for batch in args.batch:
            x = torch.randn(batch, in_f, device="cuda", dtype=dtype, generator=gen)
            t_ref = time_graph(lambda k: F.linear(x, dense[k % n_dense]), args.iters,
                               args.repeats, args.warmup, not args.no_graph)
            for bits in args.bits:
                one = make_layer(out_f, in_f, bits, args.axis, gen)
                layer_bytes = one[0].numel() * 4 + one[1].numel() * 4
                n_copies = max(1, -(-3 * l2 // layer_bytes))
                layers = [one] + [make_layer(out_f, in_f, bits, args.axis, gen)
                                  for _ in range(n_copies - 1)]
                csr = None
                nnz = 0
                if args.sparsity > 0:
                    per_row = max(1, int(round(args.sparsity * in_f)))
                    nnz = per_row * out_f
                    row_ptr = torch.arange(0, nnz + 1, per_row, dtype=torch.int32, device="cuda")
                    # distinct, spread-out columns per row (canonical CSR)
                    k = torch.arange(per_row, device="cuda")
                    o = torch.arange(out_f, device="cuda")[:, None]
                    col_idx = ((o * 7 + k * (in_f // per_row)) % in_f).sort(dim=1).values
                    col_idx = col_idx.reshape(-1).to(torch.int32)
                    values = (torch.randn(nnz, device="cuda", generator=gen) * 0.1).half()
                    csr = (row_ptr, col_idx, values)

                codes, tables = layers[0]
                w = dequantize_cuda(codes, tables, bits, in_f, out_f, args.axis, csr=csr,
                                    dtype=torch.float32)
                ref = x.float() @ w.t()
                del w
                moved = layer_bytes + x.numel() * x.element_size() + batch * out_f * 2
                moved += nnz * (4 + 2) + (out_f + 1) * 4 if csr is not None else 0
                for ki, kernel in enumerate(args.kernels):
                    # correctness first
                    try:
                        y = lut_matmul_cuda(x, codes, tables, bits, in_f, out_f, args.axis, csr=csr,
                                            kernel=kernel)
                    except ValueError as e:  # a forced kernel that does not apply
                        print(f"| {shape} | {bits} | {batch} | {kernel} | n/a ({e}) |")
                        continue
                    err = (y.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                    if err > 2e-2:
                        print(f"| {shape} | {bits} | {batch} | {kernel} | WRONG RESULT "
                              f"(rel err {err:.3g}) |")
                        missed.append(f"{shape} b{bits} batch{batch} {kernel}: wrong result")
                        continue

                    def ours(k: int, kernel=kernel) -> None:
                        c, t = layers[k % n_copies]
                        lut_matmul_cuda(x, c, t, bits, in_f, out_f, args.axis, csr=csr,
                                        kernel=kernel)

                    t_ours = time_graph(ours, args.iters, args.repeats, args.warmup,
                                        not args.no_graph)
                    bw = moved / t_ours
                    speed = t_ref / t_ours
                    print(f"| {shape} | {bits} | {batch} | {kernel} | {t_ours * 1e6:.1f} | "
                          f"{t_ref * 1e6:.1f} | {speed:.2f}x | {bw / 1e9:.0f} | "
                          f"{100 * bw / copy_bw:.0f} % |", flush=True)
                    if ki > 0:
                        continue
                    if batch == 1 and bits == 3 and (speed < 3.5 or bw < 0.7 * copy_bw):
                        missed.append(f"{shape} 3-bit batch 1: {speed:.2f}x, "
                                      f"{100 * bw / copy_bw:.0f} % of copy BW (target 3.5x, 70 %)")
                    if batch == 1 and bits == 4 and speed < 3.0:
                        missed.append(f"{shape} 4-bit batch 1: {speed:.2f}x (target 3x)")
                if args.dequant:
                    def deq(k: int) -> None:
                        c, t = layers[k % n_copies]
                        w16 = dequantize_cuda(c, t, bits, in_f, out_f, args.axis, csr=csr,
                                              dtype=dtype)
                        F.linear(x, w16)

                    t_deq = time_graph(deq, max(10, args.iters // 10), args.repeats, 2,
                                       not args.no_graph)
                    print(f"| {shape} | {bits} | {batch} | dequant+cuBLAS | {t_deq * 1e6:.1f} | "
                          f"{t_ref * 1e6:.1f} | {t_ref / t_deq:.2f}x | | |", flush=True)
                del layers, ref
            del x
        del dense
        torch.cuda.empty_cache()

    if missed:
        print("\nTargets missed:\n  " + "\n  ".join(missed))
    else:
        print("\nAll batch-1 targets met.")
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
