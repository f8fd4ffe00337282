#!/usr/bin/env python3
"""Why GPTQ without act-order loses to RTN at 4 bits on SmolLM2: the Q4_1 grid.

The embedded model's weights come from a Q4_1 GGUF: every block of 32
consecutive weights of a row is ``d * q + m`` with a 4-bit ``q``, i.e. it
already lies on a 16-level grid.  RTN at 4 bits re-rounds onto a nearby grid
and loses little; GPTQ's error feedback moves weights off the grid they sit on.
This script measures

1. how many 32-blocks of every decoder Linear hold at most 16 distinct values
   (on a Q4_1 grid) -- for the model as loaded and after a perturbation;
2. perplexity of fp32, RTN 4-bit g128 and GPTQ 4-bit g128 (no act-order) on
   the model as loaded and on the same model with the grid broken by Gaussian
   noise of ``--sigma`` times each block's Q4_1 step (fixed seed).

If the grid explains the gap, GPTQ beats RTN once the grid is broken.

    python tests/bench/bench_gptq_grid.py --sigma 0.5
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

import torch


def on_grid_fraction(model, block: int = 32) -> float:
    """Fraction of the 32-blocks of the decoder Linears holding <= 16 distinct values."""
    import sqllm

    total = hit = 0
    for name, lin in sqllm.find_linear_layers(model, exclude=("lm_head",)).items():
        w = lin.weight.detach()
        if w.shape[1] % block:
            continue
        b = w.reshape(-1, block)
        s, _ = torch.sort(b, dim=1)
        distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)
        hit += int((distinct <= 16).sum())
        total += b.shape[0]
    return hit / max(total, 1)


@torch.no_grad()
def break_grid(model, sigma: float, seed: int = 0, block: int = 32) -> None:
    """Add N(0, (sigma * step)^2) to every weight, step = (max - min) / 15 of its 32-block."""
    import sqllm

    g = torch.Generator().manual_seed(seed)
    for name, lin in sqllm.find_linear_layers(model, exclude=("lm_head",)).items():
        w = lin.weight
        if w.shape[1] % block:
            continue
        b = w.reshape(-1, block)
        step = (b.amax(1, keepdim=True) - b.amin(1, keepdim=True)) / 15.0
        b += torch.randn(b.shape, generator=g) * step * sigma


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import sqllm
    from sqllm.data import calibration_batches, load_text, tokenize_text
    from sqllm.evaluate import perplexity
    from sqllm.models import load_model

    progress = not args.quiet
    base, tok = load_model(None)
    eval_ids = tokenize_text(tok, load_text("austen:persuasion"))
    calib = calibration_batches(tok, load_text("austen:emma"), args.nsamples, args.seqlen, seed=0)

    def ppl(m) -> float:
        return perplexity(m, eval_ids, seqlen=512, max_tokens=args.eval_tokens,
                          progress=progress).ppl

    broken = copy.deepcopy(base)
    break_grid(broken, args.sigma)
    rows = []
    for label, model in (("as loaded (Q4_1 grid)", base), (f"grid broken (sigma {args.sigma})", broken)):
        frac = on_grid_fraction(model)
        res = {"fp32": ppl(model)}
        for key, method in (("RTN 4-bit g128", "rtn"), ("GPTQ 4-bit g128", "gptq")):
            q = copy.deepcopy(model)
            t0 = time.perf_counter()
            sqllm.quantize(q, method=method, bits=4, group_size=128, calibration=calib,
                           progress=progress)
            res[key] = ppl(q)
            print(f"{label}: {key} perplexity {res[key]:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            del q
        rows.append((label, frac, res))
        print(f"{label}: {100 * frac:.1f} % of 32-blocks on a 16-level grid; fp32 {res['fp32']:.3f}",
              flush=True)

    print("\n| weights | 32-blocks on a 4-bit grid | fp32 | RTN 4-bit g128 | GPTQ 4-bit g128 |")
    print("|---|---|---|---|---|")
    for label, frac, r in rows:
        print(f"| {label} | {100 * frac:.1f} % | {r['fp32']:.2f} | {r['RTN 4-bit g128']:.2f} | "
              f"{r['GPTQ 4-bit g128']:.2f} |")
    print(f"\nPersuasion, first {args.eval_tokens} tokens, windows of 512; calibration "
          f"{args.nsamples} x {args.seqlen} tokens of Emma (seed 0).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
