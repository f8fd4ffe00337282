"""Peak memory of block-streamed quantization against the size of the checkpoint.

Writes a random LLaMA with 7B layer widths (hidden 4096, intermediate 11008,
32 heads) and 6 decoder blocks as fp16 safetensors (~3 GB, one shard per block
plus one for the embeddings / lm_head) to a temporary folder, then, in a fresh
subprocess, opens it on the meta device and quantizes it block by block
(``sqllm.quantize(open_on_meta(folder), ..., out=...)``, what ``sqllm quantize
--model`` does) and prints the subprocess's peak resident memory
(``ru_maxrss``) against the checkpoint's size.  Target: peak < checkpoint.

    python tests/bench/bench_stream_memory.py                  # RTN 4-bit
    python tests/bench/bench_stream_memory.py --method gptq --dtype float16 --sequential-groups

Methods that need calibration get random token windows (``--nsamples``,
``--seqlen``); their activations add nsamples * seqlen * 4096 * 4 bytes per copy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, HEADS, VOCAB = 4096, 11008, 32, 32000


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, max_position_embeddings=4096,
                      tie_word_embeddings=False, torch_dtype="float16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    def block(i):
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": rand(HIDDEN, HIDDEN),
                p + "self_attn.v_proj.weight": rand(HIDDEN, HIDDEN),
                p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": rand(INTER, HIDDEN),
                p + "mlp.up_proj.weight": rand(INTER, HIDDEN),
                p + "mlp.down_proj.weight": rand(HIDDEN, INTER),
                p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.float16),
                p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.float16)}

    def outside():
        return {"model.embed_tokens.weight": rand(VOCAB, HIDDEN),
                "model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16),
                "lm_head.weight": rand(VOCAB, HIDDEN)}

    n = layers + 1
    weight_map = {}
    total = 0
    for k in range(n):  # one shard in memory at a time
        t = block(k) if k < layers else outside()
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        for key, v in t.items():
            weight_map[key] = name
            total += v.numel() * v.element_size()
        del t
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def quantize_child(args: argparse.Namespace) -> None:
    """Runs in the fresh subprocess: stream-quantize and report peak RSS as JSON."""
    import torch

    import sqllm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.log_memory:  # the streamer's resident-set lines (stderr), per group and block
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("sqllm.calib.streamer").setLevel(logging.DEBUG)
    t0 = time.perf_counter()
    model = sqllm.open_on_meta(args.model, dtype=getattr(torch, args.dtype))
    calib = None
    if args.method not in ("rtn",):
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, VOCAB, (args.nsamples, args.seqlen), generator=g)
    sqllm.quantize(model, method=args.method, bits=args.bits, calibration=calib,
                   out=args.out, progress=False, sequential_groups=args.sequential_groups)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_rss": peak, "seconds": dt}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="dtype blocks are materialised in (the CLI uses float32)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--sequential-groups", action="store_true",
                    help="collect and quantize one input group of a block at a time (at most one "
                         "group's Hessians held)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--log-memory", action="store_true",
                    help="print the resident set after each group / block (streamer debug log)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        quantize_child(args)
        return 0

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        t0 = time.perf_counter()
        # written in a subprocess too, so that its memory is not the parent's
        subprocess.run([sys.executable, "-c",
                        "import sys; from pathlib import Path; sys.path.insert(0, %r); "
                        "import bench_stream_memory as b; b.write_checkpoint(Path(%r), %d)"
                        % (str(Path(__file__).parent), str(src), args.layers)], check=True)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"checkpoint: {args.layers} blocks of LLaMA-7B widths, fp16, {size / 2**30:.2f} GiB "
              f"({time.perf_counter() - t0:.0f} s to write)")
        cmd = [sys.executable, __file__, "--child", "--model", str(src), "--out", str(out),
               "--method", args.method, "--bits", str(args.bits), "--dtype", args.dtype,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--threads", str(args.threads)] + (["--sequential-groups"] if args.sequential_groups else []) \
            + (["--log-memory"] if args.log_memory else [])
        r = subprocess.run(cmd, check=True, capture_output=True, text=True,
                           env={**os.environ, "TQDM_DISABLE": "1"})
        for line in r.stderr.splitlines():
            if "resident" in line:
                print("  " + line)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out_size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        peak = res["peak_rss"]
        print(f"{args.method} {args.bits}-bit, streamed from the meta device ({args.dtype} blocks): "
              f"{res['seconds']:.0f} s, output {out_size / 2**30:.2f} GiB")
        print(f"peak RSS {peak / 2**30:.2f} GiB vs checkpoint {size / 2**30:.2f} GiB: "
              f"ratio {peak / size:.2f} ({'below' if peak < size else 'NOT below'} the checkpoint)")
        return 0 if peak < size else 1


if __name__ == "__main__":
    sys.exit(main())
