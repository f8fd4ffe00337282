#!/usr/bin/env python3
"""PTQ1.61 on the embedded real model, and its packed layer against fp32 F.linear.

``--kernel``: the packed layer (``PTQ161QuantLinear``) and its kernel alone
(``_C.Ptq161Handle.matmul``, include/sqllm/binary_matmul.hpp, the path
``_C.cpu_kernel()`` picks) against ``torch.nn.functional.linear`` on the fp32
weight it represents, in the same process, timed in turn within each repeat, at
batch 1 and 8, on the SmolLM2-135M widths (576x576, 1536x576, 576x1536) and
4096x4096; min and median over repeats.

``--quality``: perplexity of SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF) on
the first ``--eval-tokens`` tokens of *Persuasion* (windows of 512), calibrated
on *Emma* (``--nsamples`` x ``--seqlen``, seed 0): PTQ1.61 with no training
(closed-form α, r = 1), trained block by block, trained + restorative LoRA + the
second PTQ (``--configs``), beside 2-bit RTN and GPTQ (g128).  Each model is
saved, bits/weight counted from the saved files, reloaded, then evaluated.

Usage:
    nice python tests/bench/bench_ptq161.py --kernel
    nice python tests/bench/bench_ptq161.py --quality --configs bin ptq rtn2 gptq2
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import saved_bits_per_weight  # noqa: E402


def bench_kernel_cold(repeats: int, threads: int, shapes, mib: int) -> None:
    """As bench_kernel, but each call uses the next of K distinct layers, K such that
    the fp32 weights take ``mib`` MiB (past the last-level cache): the weights come from
    memory, as in a model's forward, rather than staying cached between calls."""
    from sqllm.ptq161 import ptq161_linear, salient_mask

    torch.set_num_threads(threads)
    print(f"\ncold weights: calls cycle through K distinct layers of {mib} MiB of fp32 weights in all; "
          f"threads {threads}; µs per call, min / median of {repeats} repeats")
    print("| shape (out×in) | K | batch | fp32 F.linear | packed layer | F.linear / layer (min) |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    for out, inn in shapes:
        k = max(2, mib * 2 ** 20 // (out * inn * 4))
        ws, layers = [], []
        for _ in range(k):
            w = torch.randn(out, inn, generator=g) * 0.02
            lay = ptq161_linear(w, salient_mask(torch.rand(inn, generator=g), 0.2))
            ws.append(lay.dequantize())
            layers.append(lay)
        for batch in (1, 8):
            x = torch.randn(batch, inn, generator=g)
            with torch.no_grad():
                for lay in layers:
                    lay(x)  # builds each layer's handle once
                fns = {"flin": lambda: [torch.nn.functional.linear(x, w) for w in ws],
                       "layer": lambda: [lay(x) for lay in layers]}
                ts: Dict[str, List[float]] = {key: [] for key in fns}
                for _ in range(repeats):
                    for key, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        ts[key].append((time.perf_counter() - t0) / k * 1e6)
            f = {key: (min(v), statistics.median(v)) for key, v in ts.items()}
            print(f"| {out}×{inn} | {k} | {batch} | {f['flin'][0]:.1f} / {f['flin'][1]:.1f} | "
                  f"{f['layer'][0]:.1f} / {f['layer'][1]:.1f} | {f['flin'][0] / f['layer'][0]:.2f}× |",
                  flush=True)
        del ws, layers


def bench_kernel(repeats: int, threads: int, shapes) -> None:
    import sqllm  # noqa: F401
    from sqllm import _C
    from sqllm.ptq161 import ptq161_linear, salient_mask

    torch.set_num_threads(threads)
    print(f"threads {threads}, kernel path {_C.cpu_kernel()} (supported: {', '.join(_C.cpu_kernels())}); "
          f"time per call in µs, min / median of {repeats} repeats, the three timed in turn "
          f"within each repeat (shared box: medians are noisy)")
    print("| shape (out×in) | batch | fp32 F.linear | packed layer | packed kernel | "
          "F.linear / layer (min) | F.linear / kernel (min) | bits/weight |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for out, inn in shapes:
        w = torch.randn(out, inn, generator=g) * 0.02
        layer = ptq161_linear(w, salient_mask(torch.rand(inn, generator=g), 0.2))
        wd = layer.dequantize()
        handle = _C.Ptq161Handle(*layer._operands(), layer.wbits, layer.group_size, inn)
        for batch in (1, 8):
            x = torch.randn(batch, inn, generator=g)
            xn = x.numpy()
            with torch.no_grad():
                torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, wd),
                                           rtol=1e-4, atol=1e-4)
                fns = {"flin": lambda: torch.nn.functional.linear(x, wd),
                       "layer": lambda: layer(x),
                       "kernel": lambda: handle.matmul(xn, threads)}
                n = max(3, min(200, int(2e5 / (out * inn * batch / 1e3))))  # ~0.2 s of F.linear
                for fn in fns.values():
                    for _ in range(3):
                        fn()
                ts: Dict[str, List[float]] = {k: [] for k in fns}
                for _ in range(repeats):
                    for k, fn in fns.items():
                        t0 = time.perf_counter()
                        for _ in range(n):
                            fn()
                        ts[k].append((time.perf_counter() - t0) / n * 1e6)
            f = {k: (min(v), statistics.median(v)) for k, v in ts.items()}
            print(f"| {out}×{inn} | {batch} | {f['flin'][0]:.1f} / {f['flin'][1]:.1f} | "
                  f"{f['layer'][0]:.1f} / {f['layer'][1]:.1f} | {f['kernel'][0]:.1f} / {f['kernel'][1]:.1f} | "
                  f"{f['flin'][0] / f['layer'][0]:.2f}× | {f['flin'][0] / f['kernel'][0]:.2f}× | "
                  f"{layer.bits_per_weight():.3f} |", flush=True)


CONFIGS: Dict[str, tuple] = {
    "bin": ("PTQ1.61 layout, no training (closed-form α, r1=r2=1)", "ptq161", dict(epochs=0)),
    "bin0": ("plain binarisation, no mask, no training", "ptq161", dict(epochs=0, salient_ratio=0.0)),
    "ptq": ("PTQ1.61 trained (LWC)", "ptq161", dict(lwc=True)),
    # also reports the first pass alone (the "ptq" row) before the LoRA step
    "ptqlora": ("PTQ1.61 trained (LWC) + LoRA + second PTQ", "ptq161+lora", dict(lwc=True)),
    "rtn2": ("RTN 2-bit g128", "rtn", dict(bits=2, group_size=128)),
    "gptq2": ("GPTQ 2-bit g128", "gptq", dict(bits=2, group_size=128)),
}


def save_and_eval(q, tok, label: str, dt: float, note: str, ppl) -> tuple:
    import sqllm

    with tempfile.TemporaryDirectory() as tmp:
        folder = sqllm.save_quantized(q, Path(tmp) / "m", tokenizer=tok)
        bpw = saved_bits_per_weight(folder)
        del q
        t1 = time.perf_counter()
        p = ppl(sqllm.load_quantized(folder))
        te = time.perf_counter() - t1
    print(f"{label}: {bpw:.3f} bits/weight, perplexity {p:.3f}, quantized in {dt:.0f} s "
          f"({note}); eval {te:.0f} s", flush=True)
    return (label, bpw, p, dt, note)


def run_with_lora(model, tok, calib, opts, args, ppl) -> list:
    """The first PTQ (its own row), the restorative LoRA, the second PTQ with the first masks."""
    import sqllm
    from sqllm.ptq161_lora import restorative_lora, save_masks

    progress = not args.quiet
    rows = []
    q1 = copy.deepcopy(model)
    t0 = time.perf_counter()
    sqllm.quantize(q1, method="ptq161", calibration=calib, progress=progress, **opts)
    t_ptq1 = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        masks = save_masks(q1, Path(tmp) / "masks.safetensors")
        fp = copy.deepcopy(model)
        t0 = time.perf_counter()
        restorative_lora(fp, q1, calib[:, :args.lora_seqlen], steps=args.lora_steps,
                         batch_size=args.lora_batch, progress=progress)
        t_lora = time.perf_counter() - t0
        rows.append(save_and_eval(q1, tok, f"PTQ1.61 trained ({args.epochs} epochs"
                                  f"{', LWC' if opts.get('lwc') else ''})", t_ptq1, "first pass", ppl))
        del q1
        t0 = time.perf_counter()
        sqllm.quantize(fp, method="ptq161", calibration=calib, progress=progress,
                       **{**opts, "masks": str(masks)})
        t_ptq2 = time.perf_counter() - t0
    rows.append(save_and_eval(fp, tok, "PTQ1.61 + restorative LoRA + second PTQ",
                              t_ptq1 + t_lora + t_ptq2,
                              f"first PTQ {t_ptq1:.0f} s, LoRA {t_lora:.0f} s "
                              f"({args.lora_steps} steps), second PTQ {t_ptq2:.0f} s", ppl))
    return rows


def bench_quality(args: argparse.Namespace) -> None:
    import sqllm
    from sqllm.data import calibration_batches, load_text, tokenize_text
    from sqllm.evaluate import perplexity
    from sqllm.models import load_model

    progress = not args.quiet
    model, tok = load_model(None)
    eval_ids = tokenize_text(tok, load_text("austen:persuasion"))
    calib = calibration_batches(tok, load_text("austen:emma"), args.nsamples, args.seqlen, seed=0)

    def ppl(m) -> float:
        return perplexity(m, eval_ids, seqlen=512, max_tokens=args.eval_tokens,
                          progress=progress).ppl

    rows = []
    if args.fp:
        rows.append(("fp32 (from Q4_1 GGUF)", 32.0, ppl(model), 0.0, ""))
        print(f"fp32: perplexity {rows[0][2]:.3f}", flush=True)
    for key in args.configs:
        label, method, opts = CONFIGS[key]
        opts = dict(opts)
        if method.startswith("ptq161") and "epochs" not in opts:
            opts["epochs"] = args.epochs
        if method.startswith("ptq161"):
            opts["train_samples"] = args.train_samples
        if method == "ptq161+lora":
            rows.extend(run_with_lora(model, tok, calib, opts, args, ppl))
            continue
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        sqllm.quantize(q, method=method, calibration=calib, progress=progress, **opts)
        dt = time.perf_counter() - t0
        rows.append(save_and_eval(q, tok, label, dt, method, ppl))
    print("\n| method | bits/weight (saved files) | perplexity | quantize s | steps |")
    print("|---|---|---|---|---|")
    for label, bpw, p, dt, note in rows:
        print(f"| {label} | {bpw:.3f} | {p:.2f} | {dt:.0f} | {note} |")
    print(f"\nPersuasion, first {args.eval_tokens} tokens, windows of 512; calibration "
          f"{args.nsamples} x {args.seqlen} tokens of Emma (seed 0); PTQ1.61 epochs {args.epochs}, "
          f"train samples {args.train_samples or args.nsamples}; LoRA {args.lora_steps} steps of "
          f"{args.lora_batch} x {args.lora_seqlen} tokens.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["576x576", "1536x576", "576x1536", "4096x4096"],
                    help="out x in of the --kernel layers")
    ap.add_argument("--cold-mib", type=int, default=256,
                    help="--kernel also with the weights cycled through this many MiB of fp32 "
                         "layers (0: skip)")
    ap.add_argument("--configs", nargs="+", default=["bin", "ptq", "rtn2", "gptq2"],
                    choices=list(CONFIGS))
    ap.add_argument("--fp", action="store_true", help="also evaluate the fp32 model")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-samples", type=int, default=0)
    ap.add_argument("--lora-steps", type=int, default=100)
    ap.add_argument("--lora-batch", type=int, default=1)
    ap.add_argument("--lora-seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not (args.kernel or args.quality):
        ap.error("give --kernel and/or --quality")
    if args.kernel:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes]
        bench_kernel(args.repeats, args.threads, shapes)
        if args.cold_mib:
            bench_kernel_cold(args.repeats, args.threads, shapes, args.cold_mib)
    if args.quality:
        bench_quality(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
