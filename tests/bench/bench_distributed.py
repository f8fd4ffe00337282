"""Scale-out (issue #11): one process against two on the embedded real model, and an estimate
for a 70B model on 8 and 64 GPUs from measured per-layer costs.

1. Saves SmolLM2-135M-Instruct (``sqllm.models.load_model()``, fp32) as a safetensors
   folder and draws the calibration windows from Emma (``austen:emma``).
2. Quantizes it (``--method gptq --bits 4`` by default) block by block from that folder on
   the meta device (what ``sqllm quantize --model FOLDER`` does), ``--repeats`` times with
   one process and with ``torchrun --nproc-per-node 2`` (one thread per process), and
   prints the wall time of the ``sqllm.quantize`` call (rank 0), the ratio, the bytes
   each rank sent per decoder block (statistics reduced to the layer's owner, quantized
   layers all-gathered), and checks the two outputs are identical bit for bit.
3. Fits ``t = a·out·in² + b·in³ + c·out·in`` (the method's arithmetic: error feedback,
   Cholesky, rounding) to the per-layer quantization CPU times of the one-process run plus
   ``--square`` random square layers, and predicts the per-layer times of a LLaMA-70B
   block (hidden 8192, intermediate 28672, 8 KV heads of 128, 80 blocks); the block time
   on P ranks is the longest-job-first makespan of its 7 layers (layer-level work split,
   what sqllm does), plus statistics and forward time measured per token here and
   scaled by the FLOP ratio.

    python tests/bench/bench_distributed.py                       # gptq 4-bit, 16 x 512
    python tests/bench/bench_distributed.py --method squeezellm --nsamples 8

The box may be shared: the min and median of the repeats are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

L70 = dict(hidden=8192, inter=28672, kv=1024, blocks=80)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> int:
    """One rank: quantize the folder, record wall time, per-layer times and bytes sent."""
    import torch

    torch.set_num_threads(1)
    import sqllm
    from sqllm.distributed import current, init_from_env
    from sqllm.methods import METHODS

    init_from_env()
    ctx = current()
    rank = ctx.rank if ctx is not None else 0
    layer_s = {}
    cls = METHODS[args.method]
    orig = cls.quantize_layer

    def timed(self, name, linear, stats):
        t0 = time.process_time()  # CPU seconds (one thread): not inflated by a shared box
        q = orig(self, name, linear, stats)
        layer_s[name] = [time.process_time() - t0, int(linear.out_features),
                         int(linear.in_features)]
        return q

    cls.quantize_layer = timed
    model = sqllm.open_on_meta(args.model_dir)
    calib = torch.load(args.calib)
    t0, c0 = time.perf_counter(), time.process_time()
    sqllm.quantize(model, method=args.method, bits=args.bits, calibration=calib,
                   out=args.out, progress=False, overwrite=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    json.dump({"wall": wall, "cpu": cpu, "layers": layer_s, "comm": ctx.comm_bytes if ctx else {},
               "world": ctx.world if ctx else 1},
              open(f"{args.out}.rank{rank}.json", "w"))
    return 0


def run(world: int, args: argparse.Namespace, model_dir: Path, calib: Path, out: Path) -> list:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [__file__, "--worker", "--model-dir", str(model_dir), "--calib", str(calib),
           "--out", str(out), "--method", args.method, "--bits", str(args.bits)]
    if world == 1:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        full = [sys.executable] + cmd
    else:
        full = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())] + cmd
    subprocess.run(full, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL if not args.verbose else None)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


def same_model(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and \
        json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def square_times(method: str, bits: int, sizes) -> list:
    """Quantize random square layers with a random SPD Hessian; (seconds, out, in) each."""
    import torch

    torch.set_num_threads(1)
    from sqllm.methods import METHODS

    out = []
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        lin = torch.nn.Linear(n, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, n, generator=g) * 0.02)
        x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
        stats = {"hessian": {"l": x.T @ x}, "hessian_count": {"l": 4 * n},
                 "fisher": {"l": torch.rand(n, n, generator=g)}}
        qm = METHODS[method](bits=bits)
        t0 = time.process_time()
        qm.quantize_layer("l", lin, stats)
        out.append([time.process_time() - t0, n, n])
    return out


def fit(points: list):
    """Least squares of t = a·out·in² + b·in³ + c·out·in, relative error weighting."""
    import numpy as np

    A = np.array([[o * i * i, i ** 3, o * i] for _, o, i in points], dtype=float)
    t = np.array([p[0] for p in points])
    w = 1.0 / t
    coef, *_ = np.linalg.lstsq(A * w[:, None], t * w, rcond=None)
    return np.maximum(coef, 0.0)


def makespan(costs: list, ranks: int) -> float:
    load = [0.0] * ranks
    for c in sorted(costs, reverse=True):
        i = min(range(ranks), key=lambda r: load[r])
        load[i] += c
    return max(load)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--square", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--cores", type=int, default=16, help="70B estimate: CPU cores per rank")
    ap.add_argument("--fp64-tflops", type=float, default=50.0)
    ap.add_argument("--bf16-tflops", type=float, default=400.0)
    ap.add_argument("--link-gbs", type=float, default=25.0, help="GB/s between ranks")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--fit", type=float, nargs=3, metavar=("A", "B", "C"),
                    help="only print the 70B GPU estimate from these per-layer cost coefficients")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.fit:
        gpu_estimate(*layer_costs_70b(*args.fit), args)
        return 0

    import torch

    from sqllm.data import calibration_batches, load_text
    from sqllm.models import load_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    model, tok = load_model()
    model_dir = tmp / "smollm2"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ids = calibration_batches(tok, load_text("austen:emma"), args.nsamples, args.seqlen, seed=0)
    calib = tmp / "calib.pt"
    torch.save(ids, calib)
    n_blocks = model.config.num_hidden_layers
    del model
    print(f"SmolLM2-135M, {args.method} {args.bits}-bit, {args.nsamples} x {args.seqlen} "
          f"calibration tokens, one thread per process, {os.cpu_count()} cores (shared box)")

    res = {1: [], 2: []}
    for rep in range(args.repeats):
        for world in (1, 2):
            res[world].append(run(world, args, model_dir, calib, tmp / f"out{world}"))
            print(f"  repeat {rep}: {world} process(es): {res[world][-1][0]['wall']:.1f} s",
                  flush=True)
    walls = {w: [r[0]["wall"] for r in res[w]] for w in res}
    for w in (1, 2):
        print(f"{w} process(es): min {min(walls[w]):.1f} s, median "
              f"{statistics.median(walls[w]):.1f} s over {len(walls[w])} runs")
    print(f"speed-up 2 vs 1 process: {min(walls[1]) / min(walls[2]):.2f}x (min), "
          f"{statistics.median(walls[1]) / statistics.median(walls[2]):.2f}x (median)")
    # CPU seconds do not depend on how much of the shared box a process got
    cpu1 = [r[0]["cpu"] for r in res[1]]
    cpu2 = [[d["cpu"] for d in r] for r in res[2]]
    print(f"CPU seconds: 1 process {min(cpu1):.1f} (min); 2 processes: per rank "
          + "; ".join("/".join(f"{c:.1f}" for c in cc) for cc in cpu2)
          + f" -> critical path speed-up {min(cpu1) / min(max(cc) for cc in cpu2):.2f}x, "
          f"total CPU {min(sum(cc) for cc in cpu2) / min(cpu1):.2f}x of one process")
    identical = same_model(tmp / "out1", tmp / "out2")
    print(f"2-process output identical bit for bit to the 1-process output: {identical}")
    last = res[2][-1]
    for r, d in enumerate(last):
        per = {k: v / n_blocks / 2**20 for k, v in sorted(d["comm"].items())}
        print(f"rank {r} sent per block: " + ", ".join(f"{k} {v:.2f} MiB" for k, v in per.items())
              + f" (total {sum(per.values()):.2f} MiB)")
    work = [sum(v[0] for v in d["layers"].values()) for d in last]
    print("quantization CPU seconds per rank (2 processes): " + ", ".join(f"{w:.1f}" for w in work))

    # -- the 70B estimate ---------------------------------------------------------------
    pts = [v for v in res[1][-1][0]["layers"].values()]
    pts += square_times(args.method, args.bits, args.square)
    a, b, c = fit(pts)
    print(f"per-layer cost fit (1 thread): t = {a:.3g}·out·in² + {b:.3g}·in³ + {c:.3g}·out·in s")
    for t, o, i in pts[-len(args.square):]:
        print(f"  measured {o}x{i}: {t:.2f} s, fit {a * o * i * i + b * i ** 3 + c * o * i:.2f} s")
    costs, shapes = layer_costs_70b(a, b, c)
    one = sum(costs)
    H, I, KV = L70["hidden"], L70["inter"], L70["kv"]
    # statistics + forward: the one-process wall time not spent in quantize_layer, scaled by
    # the per-token FLOPs of a block (12·h² + 6·h·inter vs SmolLM2's) and the block count
    small = sum(v[0] for v in res[1][-1][0]["layers"].values())
    other = min(r[0]["cpu"] for r in res[1]) - small  # CPU s of statistics + forward passes
    hs, is_ = 576, 1536
    flops_ratio = (4 * H * H + 2 * KV * H * 2 + 3 * I * H) / (4 * hs * hs + 2 * 192 * hs * 2 + 3 * is_ * hs)
    print(f"LLaMA-70B block, 1 thread: layer costs {', '.join(f'{x / 60:.0f}' for x in costs)} "
          f"min (q,k,v,o,gate,up,down); {one / 3600:.1f} h per block")
    print("all on CPU cores (statistics and forward passes measured here, scaled by FLOPs):")
    for cores in (1, 16):
        for P in (1, 8, 64):
            per_block = makespan(costs, P) / cores
            other70 = other / n_blocks * flops_ratio * 128 * 2048 / (args.nsamples * args.seqlen) / P / cores
            total = L70["blocks"] * (per_block + other70)
            print(f"  {P:2d} rank(s) x {cores:2d} core(s) each: {total / 3600:.1f} h "
                  f"(quantization {L70['blocks'] * per_block / 3600:.1f} h + statistics/forward "
                  f"{L70['blocks'] * other70 / 3600:.2f} h, 128 x 2048 calibration tokens)")
    gpu_estimate(costs, shapes, args)
    return 0


def layer_costs_70b(a: float, b: float, c: float):
    H, I, KV = L70["hidden"], L70["inter"], L70["kv"]
    shapes = [(H, H), (KV, H), (KV, H), (H, H), (I, H), (I, H), (H, I)]
    return [a * o * i * i + b * i ** 3 + c * o * i for o, i in shapes], shapes


def gpu_estimate(costs, shapes, args) -> None:
    H, I = L70["hidden"], L70["inter"]
    # On GPUs: statistics and forward passes by FLOP count at assumed throughputs (not
    # measured: no GPU here); the quantizer (sqllm's C++ engine) runs on each rank's cores.
    import math

    tokens = 128 * 2048
    xtx = 2 * (3 * H * H + I * I)  # fp64 XᵀX per token (q/k/v and gate/up share an input)
    fwd = 2 * 2 * sum(o * i for o, i in shapes)  # two block forwards per token
    gpu_stats = tokens * (xtx / (args.fp64_tflops * 1e12) + fwd / (args.bf16_tflops * 1e12))
    hbytes = 16 * (6 * H * H + I * I)  # compensated Hessian pairs each rank sends per block
    print(f"on GPUs ({args.fp64_tflops:g} TFLOP/s fp64 XᵀX, {args.bf16_tflops:g} TFLOP/s bf16 "
          f"forwards, {args.link_gbs:g} GB/s links, quantizer on {args.cores} ideal cores per "
          f"rank): statistics+forward {gpu_stats:.1f} s per block on one GPU, "
          f"{hbytes / 1e9:.1f} GB of Hessian partials sent per rank per block")
    for P in (1, 8, 64):
        comm = math.ceil(math.log2(P)) * hbytes / (args.link_gbs * 1e9) if P > 1 else 0.0
        quant = makespan(costs, P) / args.cores
        total = L70["blocks"] * (quant + gpu_stats / P + comm)
        print(f"  {P:2d} GPU(s): {total / 3600:.2f} h = 80 x ({quant:.0f} s quantization + "
              f"{gpu_stats / P:.1f} s statistics/forward + {comm:.1f} s reduction)")


if __name__ == "__main__":
    sys.exit(main())
