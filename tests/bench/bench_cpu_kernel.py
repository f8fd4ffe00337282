"""CPU LUT matmul vs torch's int4 weight-only kernel and fp32 F.linear, one process.

    python tests/bench/bench_cpu_kernel.py [--shapes 4096x4096,11008x4096]
        [--batches 1,4,8,64] [--threads 0] [--reps 21] [--stat median|min]
        [--no-sparse] [--no-overhead]

Every variant runs round-robin (one call of each per round, `--reps` rounds)
so that load from other processes hits all of them alike; each cell is the
median over rounds, and the spread (min-max over rounds of the ratio) is
printed beside the ratios.  Each side cycles through enough copies of its
weights to exceed `--cycle-mb` (default 192 MB, several times the L3 cache), so
the weights come from DRAM as in a real decode step, not from cache.

- sqllm 4-bit and 3-bit: `_C.lut_matmul`, row grouping, random codes and
  tables, fp32 x, the kernel `auto` picks (printed);
- torch int4: `torch._weight_int4pack_mm_for_cpu` on weights packed by
  `torch._convert_weight_to_int4pack_for_cpu`, group 128, bf16 x (torch's
  uniform 4-bit weight-only kernel, asymmetric per-group scales and zeros);
- torch fp32: `F.linear`.
- sqllm 4-bit and 3-bit with bf16 x (second table, when the CPU has
  AVX512-BF16): `_C.lut_matmul_bf16`, the same x in bf16 as torch's int4
  kernel gets, bf16 x bf16 products accumulated in fp32 like torch's kernel.

GB/s = weight bytes read (packed codes + tables, int4 + scales, fp32) / time;
"% copy" relates it to the numpy copy bandwidth measured in the same run
(bytes read + written by `np.copyto` / time).  Also printed: the cost of each
kernel path (scalar / avx2 / avx512) at batch 1, the Dense-and-Sparse part,
and the per-call cost of a 576x576 layer through `QuantLinear`.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from sqllm import _C


def copy_bandwidth(nbytes=512 * 2**20, reps=7):
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / float(np.median(ts)), 2 * nbytes / min(ts)


def round_robin(fns, reps):
    """{name: per-round times}; each fn cycles through its weight copies."""
    for f in fns.values():
        f()
        f()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: np.asarray(v) for k, v in ts.items()}


class Cycler:
    """Calls fn(copy) with the next of `copies` weight copies each time."""

    def __init__(self, copies, fn):
        self.copies, self.fn, self.i = copies, fn, 0

    def __call__(self):
        c = self.copies[self.i]
        self.i = (self.i + 1) % len(self.copies)
        return self.fn(c)


def n_copies(nbytes, cycle_bytes):
    return max(1, int(np.ceil(cycle_bytes / nbytes)))


def random_csr(out_f, in_f, frac, rng):
    nnz_row = max(1, int(round(frac * in_f)))
    cols = np.sort(np.stack([rng.choice(in_f, nnz_row, replace=False) for _ in range(out_f)]), 1)
    row_ptr = (np.arange(out_f + 1) * nnz_row).astype(np.int32)
    vals = rng.normal(0, 0.01, out_f * nnz_row).astype(np.float16).view(np.uint16)
    return row_ptr, cols.reshape(-1).astype(np.int32), vals


def lut_weights(out_f, in_f, bits, rng):
    codes = rng.integers(0, 2 ** bits, (out_f, in_f), dtype=np.uint8)
    return _C.pack_codes(codes, bits), rng.normal(0, 0.02, (out_f, 2 ** bits)).astype(np.float32)


def int4_weights(out_f, in_f, group=128):
    q = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.empty(in_f // group, out_f, 2, dtype=torch.bfloat16)
    sz[..., 0] = 0.01
    sz[..., 1] = 0.0
    return packed, sz


def spread(r):
    return f"{np.min(r):.2f}-{np.max(r):.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--batches", default="1,4,8,64")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--threads", type=int, default=0, help="torch and sqllm threads (0: torch's default)")
    ap.add_argument("--cycle-mb", type=float, default=192.0,
                    help="weights cycled per variant (> L3 so they come from DRAM)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="per-cell statistic over rounds (min: least disturbed by other load)")
    ap.add_argument("--no-sparse", action="store_true")
    ap.add_argument("--no-overhead", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cyc = args.cycle_mb * 2**20
    stat = np.min if args.stat == "min" else np.median
    rng = np.random.default_rng(0)
    bw_med, bw_max = copy_bandwidth()
    print(f"threads: {threads} (torch and sqllm); sqllm kernel: {_C.cpu_kernel()} "
          f"(supported: {', '.join(_C.cpu_kernels())}); torch {torch.__version__}")
    print(f"numpy copy bandwidth (read + write): {bw_med / 1e9:.1f} GB/s median, "
          f"{bw_max / 1e9:.1f} GB/s best; weights cycled through >= {args.cycle_mb:.0f} MB per variant; "
          f"{args.reps} round-robin rounds, {args.stat}s\n")
    print("| out x in | batch | sqllm 4b ms | sqllm 3b ms | torch int4 ms | torch fp32 ms "
          "| 4b vs int4 (spread) | 3b vs int4 (spread) | 4b vs fp32 | 4b GB/s | 4b % copy | 3b GB/s | int4 GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    paths, sparse_rows, bf16_rows = [], [], []
    has_bf16 = _C.has_bf16_matmul()
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        lut = {}
        for bits in (4, 3):
            p, t = lut_weights(out_f, in_f, bits, rng)
            nb = p.nbytes + t.nbytes
            lut[bits] = ([(p.copy(), t.copy()) for _ in range(n_copies(nb, cyc))], nb)
        i4p, i4sz = int4_weights(out_f, in_f)
        i4_bytes = i4p.numel() * i4p.element_size() + i4sz.numel() * 2
        i4 = [(i4p.clone(), i4sz.clone()) for _ in range(n_copies(i4_bytes, cyc))]
        w32 = [torch.randn(out_f, in_f) * 0.02 for _ in range(n_copies(out_f * in_f * 4, cyc))]
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, in_f)
            xn, xb = x.numpy(), x.to(torch.bfloat16)
            xbn = xb.view(torch.int16).numpy().view(np.uint16)

            def ours(bits, kernel="auto"):
                return Cycler(lut[bits][0], lambda c: _C.lut_matmul(
                    xn, c[0], c[1], bits, in_f, "row", None, threads, False, kernel))

            fns = {"4": ours(4), "3": ours(3),
                   "int4": Cycler(i4, lambda c: torch._weight_int4pack_mm_for_cpu(xb, c[0], 128, c[1])),
                   "fp32": Cycler(w32, lambda w: F.linear(x, w))}
            if has_bf16:
                for bits in (4, 3):
                    fns[f"{bits}bf16"] = Cycler(lut[bits][0], lambda c, bits=bits: _C.lut_matmul_bf16(
                        xbn, c[0], c[1], bits, in_f, None, threads, False))
            r = round_robin(fns, args.reps)
            m = {k: float(stat(v)) for k, v in r.items()}
            gb4, gb3 = lut[4][1] / m["4"] / 1e9, lut[3][1] / m["3"] / 1e9
            print(f"| {out_f}x{in_f} | {batch} | {m['4'] * 1e3:.3f} | {m['3'] * 1e3:.3f} | "
                  f"{m['int4'] * 1e3:.3f} | {m['fp32'] * 1e3:.3f} | "
                  f"{m['int4'] / m['4']:.2f}x ({spread(r['int4'] / r['4'])}) | "
                  f"{m['int4'] / m['3']:.2f}x ({spread(r['int4'] / r['3'])}) | "
                  f"{m['fp32'] / m['4']:.2f}x | {gb4:.1f} | {100 * gb4 * 1e9 / bw_med:.0f}% | "
                  f"{gb3:.1f} | {i4_bytes / m['int4'] / 1e9:.1f} |", flush=True)
            if has_bf16:
                bf16_rows.append(
                    f"| {out_f}x{in_f} | {batch} | {m['4bf16'] * 1e3:.3f} | {m['3bf16'] * 1e3:.3f} | "
                    f"{m['int4'] * 1e3:.3f} | {m['int4'] / m['4bf16']:.2f}x "
                    f"({spread(r['int4'] / r['4bf16'])}) | {m['int4'] / m['3bf16']:.2f}x "
                    f"({spread(r['int4'] / r['3bf16'])}) | {m['4'] / m['4bf16']:.2f}x | "
                    f"{lut[4][1] / m['4bf16'] / 1e9:.1f} |")
            if batch == 1:
                pf = {f"{bits}b {k}": ours(bits, k) for bits in (4, 3) for k in _C.cpu_kernels()}
                pr = round_robin(pf, max(5, args.reps // 3))
                paths.append((shape, {k: float(stat(v)) for k, v in pr.items()}))
            if batch in (1, 8) and not args.no_sparse:
                for frac in (0.0005, 0.0045):
                    csr = random_csr(out_f, in_f, frac, rng)
                    sp = Cycler(lut[3][0], lambda c: _C.lut_matmul(
                        xn, c[0], c[1], 3, in_f, "row", csr, threads, True))
                    rs = round_robin({"dense": ours(3), "sparse": sp}, args.reps)
                    sparse_rows.append((shape, batch, frac, float(stat(rs["dense"])),
                                        float(stat(rs["sparse"]))))
    if bf16_rows:
        print("\nbf16 activations (the x torch's int4 kernel gets; `_C.lut_matmul_bf16`, AVX512-BF16):\n")
        print("| out x in | batch | sqllm 4b bf16 ms | sqllm 3b bf16 ms | torch int4 ms "
              "| 4b bf16 vs int4 (spread) | 3b bf16 vs int4 (spread) | 4b bf16 vs 4b fp32 | 4b bf16 GB/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in bf16_rows:
            print(row)
    print(f"\nKernel paths at batch 1 (ms, {args.stat}; forced with kernel=...):\n")
    for shape, d in paths:
        print(f"- {shape}: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in d.items()))
    if sparse_rows:
        print("\nDense-and-Sparse: cost of the sparse part in the same forward (3-bit)\n")
        print("| out x in | batch | sparse | dense-only ms | with sparse ms | ratio |")
        print("|---|---|---|---|---|---|")
        for shape, batch, frac, t0, t1 in sparse_rows:
            print(f"| {shape} | {batch} | {frac * 100:.2f}% | {t0 * 1e3:.3f} | {t1 * 1e3:.3f} | "
                  f"{t1 / t0:.2f}x |")
    if not args.no_overhead:
        overhead(threads)


def overhead(threads):
    """Per-call cost of a small layer: QuantLinear vs the C++ call vs F.linear."""
    from sqllm.nn import QuantLinear

    lin = torch.nn.Linear(576, 576, bias=False)
    q = QuantLinear.from_linear(lin, bits=4)
    x = torch.randn(1, 1, 576)
    codes, tables, _ = q._cpu_operands()
    xn = x.reshape(1, 576).numpy()
    w = lin.weight.detach()
    fns = {"QuantLinear": lambda: q(x),
           "_C.lut_matmul": lambda: _C.lut_matmul(xn, codes, tables, 4, 576, "row", None, threads, True),
           "F.linear fp32": lambda: F.linear(x, w)}
    n = 200
    with torch.inference_mode():
        r = round_robin({k: (lambda f=f: [f() for _ in range(n)]) for k, f in fns.items()}, 15)
    print("\n576x576 4-bit layer at batch 1, per call (µs, median of 15 rounds of 200 calls):\n")
    for k, v in r.items():
        print(f"- {k}: {np.median(v) / n * 1e6:.1f} (min {np.min(v) / n * 1e6:.1f})")


if __name__ == "__main__":
    main()
