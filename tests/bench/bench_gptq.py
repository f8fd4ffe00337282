"""C++ GPTQ (sqllm.gptq_quantize) vs the same algorithm written in torch.

Both run in float64 on the same weight and Hessian with the same number of
threads (torch.set_num_threads = the OpenMP threads given to the C++ engine),
so the codes should be equal (up to rounding ties); prints both times, the
ratio and whether the codes agree.

    python tests/bench/bench_gptq.py [--rows 4096] [--cols 4096] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import sqllm
from sqllm import _C


def torch_grid(x: torch.Tensor, bits: int, sym: bool):
    maxq = 2 ** bits - 1
    lo = torch.clamp(x.min(dim=1).values, max=0.0)
    hi = torch.clamp(x.max(dim=1).values, min=0.0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / maxq).float().half().double()  # the stored fp16 grid
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else \
        torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def torch_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, act_order: bool,
               blocksize: int = 128, percdamp: float = 0.01, sym: bool = False) -> torch.Tensor:
    """Upstream GPTQ's structure (blocks, lazy batch updates, chol/inverse/chol),
    float64, groups fitted from the updated columns (sqllm's rule).  Returns codes."""
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    maxq = 2 ** bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else \
        torch.arange(cols)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.int64)
    gs = group_size if group_size > 0 else cols
    bs = -(-blocksize // gs) * gs if group_size > 0 else blocksize
    scale = zero = None
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if j % gs == 0:
                scale, zero = torch_grid(W1[:, i:i + gs] if group_size > 0 else W, bits, sym)
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            codes[:, j] = q.long()
            err = (w - scale * (q - zero)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(args.rows, args.cols, generator=g)
    # Correlated inputs: an AR(1) mix of white noise along the features.
    n = 2 * args.cols
    Z = torch.randn(n, args.cols, generator=g, dtype=torch.float64)
    X = torch.empty_like(Z)
    X[:, 0] = Z[:, 0]
    for c in range(1, args.cols):
        X[:, c] = 0.8 * X[:, c - 1] + Z[:, c]
    H = 2.0 * X.T @ X / n

    print(f"GPTQ {args.rows}x{args.cols}, {args.bits}-bit, group {args.group_size}, "
          f"act_order={args.act_order}, float64, {args.threads} threads")
    t0 = time.perf_counter()
    res = sqllm.gptq_quantize(W, H, bits=args.bits, group_size=args.group_size,
                              act_order=args.act_order, return_result=True,
                              num_threads=args.threads)
    t_cpp = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes_t = torch_gptq(W, H, args.bits, args.group_size, args.act_order)
    t_torch = time.perf_counter() - t0
    codes_c = torch.from_numpy(_C.unpack_codes(res.qweight, args.cols, args.bits).astype(np.int64))
    diff = int((codes_c != codes_t).sum())
    print(f"  sqllm C++ : {t_cpp:8.2f} s")
    print(f"  torch     : {t_torch:8.2f} s")
    print(f"  ratio     : {t_torch / t_cpp:8.2f}x (target >= 2x)")
    print(f"  codes equal: {diff == 0} ({diff} of {codes_c.numel()} differ)")


if __name__ == "__main__":
    main()
