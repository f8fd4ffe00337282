"""CPU LUT matmul vs torch fp32 F.linear, side by side in one process.

Prints, per shape (out x in), bit width and batch: our time, torch's, the
ratio (torch / ours: > 1 means we are faster), and the bytes/s each achieves
(weight bytes read + x + y), next to this machine's measured copy bandwidth.
Also the cost of a Dense-and-Sparse part (0.05% and 0.45% of the weights) in
the same forward, as a ratio to dense-only.

    python tests/bench/bench_cpu_kernel.py [--shapes 4096x4096,11008x4096] [--reps 20]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from sqllm import _C


def timeit(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def copy_bandwidth(nbytes=512 * 2**20):
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    t = timeit(lambda: np.copyto(b, a), 5)
    return 2 * nbytes / t  # read + write


def random_csr(out_f, in_f, frac, rng):
    nnz_row = max(1, int(round(frac * in_f)))
    cols = np.sort(np.stack([rng.choice(in_f, nnz_row, replace=False) for _ in range(out_f)]), 1)
    row_ptr = (np.arange(out_f + 1) * nnz_row).astype(np.int32)
    vals = rng.normal(0, 0.01, out_f * nnz_row).astype(np.float16).view(np.uint16)
    return row_ptr, cols.reshape(-1).astype(np.int32), vals


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch and ours (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    rng = np.random.default_rng(0)
    bw = copy_bandwidth()
    print(f"threads: {threads}; memory copy bandwidth (numpy, read+write): {bw / 1e9:.1f} GB/s\n")
    print("| out x in | bits | batch | ours ms | torch fp32 ms | speed-up | ours GB/s | torch GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    sparse_rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        w = torch.randn(out_f, in_f) * 0.02
        for bits in map(int, args.bits.split(",")):
            codes = rng.integers(0, 2 ** bits, (out_f, in_f), dtype=np.uint8)
            packed = _C.pack_codes(codes, bits)
            tables = rng.normal(0, 0.02, (out_f, 2 ** bits)).astype(np.float32)
            for batch in map(int, args.batches.split(",")):
                x = torch.randn(batch, in_f)
                xn = x.numpy()
                t_ours = timeit(lambda: _C.lut_matmul(xn, packed, tables, bits, in_f, "row", None,
                                                      threads), args.reps)
                t_torch = timeit(lambda: F.linear(x, w), args.reps)
                io = (batch * in_f + batch * out_f) * 4
                ours_bytes = packed.nbytes + tables.nbytes + io
                torch_bytes = w.numel() * 4 + io
                print(f"| {out_f}x{in_f} | {bits} | {batch} | {t_ours * 1e3:.2f} | "
                      f"{t_torch * 1e3:.2f} | {t_torch / t_ours:.2f}x | "
                      f"{ours_bytes / t_ours / 1e9:.1f} | {torch_bytes / t_torch / 1e9:.1f} |")
                if bits == 3:
                    for frac in (0.0005, 0.0045):
                        csr = random_csr(out_f, in_f, frac, rng)
                        t_sp = timeit(lambda: _C.lut_matmul(xn, packed, tables, bits, in_f, "row",
                                                            csr, threads, True), args.reps)
                        sparse_rows.append((out_f, in_f, batch, frac, t_ours, t_sp))
    print("\nDense-and-Sparse: cost of the sparse part in the same forward (3-bit)\n")
    print("| out x in | batch | sparse | dense-only ms | with sparse ms | ratio |")
    print("|---|---|---|---|---|---|")
    for out_f, in_f, batch, frac, t0, t1 in sparse_rows:
        print(f"| {out_f}x{in_f} | {batch} | {frac * 100:.2f}% | {t0 * 1e3:.2f} | {t1 * 1e3:.2f} | "
              f"{t1 / t0:.2f}x |")


if __name__ == "__main__":
    main()
