"""PTQ1.61's restorative LoRA and second PTQ (seed 003, steps 3-6).

After a first PTQ1.61 pass, LoRA adapters (rank 64, alpha 16, dropout 0.1 on
q/k/v/gate/up/down, not o_proj: upstream's settings, through ``peft``) are
trained on the *quantized* model -- each quantized layer taken as its
dequantized weight, frozen -- against the language-model loss on calibration
text.  The adapters' products ``B·A·scaling`` are then added to the
full-precision weights, and a second PTQ1.61 pass quantizes the merged model
reusing the first pass's salient masks.

Steps (each resumable from a state folder, ``sqllm ptq161-lora``):

1. :func:`restorative_lora` -- fp model + quantized model -> merged fp model;
2. ``sqllm.quantize(merged, method="ptq161", masks=<first pass>)``.

:func:`ptq161_with_lora` runs first PTQ, LoRA, merge and second PTQ in one call.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .nn import QuantLinearBase

__all__ = ["restorative_lora", "ptq161_with_lora", "save_masks", "LORA_TARGETS"]

log = logging.getLogger(__name__)

#: Upstream's LoRA targets (o_proj excluded).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the restorative LoRA step needs peft: pip install 'sqllm[lora]' "
                          f"(or pip install peft) ({e})") from None
    return peft


def save_masks(quantized: nn.Module, path: os.PathLike) -> Path:
    """Write the salient masks of a quantized model's ptq161 layers to a safetensors file
    (``{layer name: bool [in]}``; the ``masks`` option of the second PTQ reads it)."""
    from safetensors.torch import save_file

    from .nn_ptq161 import PTQ161QuantLinear

    masks = {n: m.salient_mask().contiguous() for n, m in quantized.named_modules()
             if isinstance(m, PTQ161QuantLinear)}
    if not masks:
        raise ValueError("the model has no ptq161 layers to take masks from")
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(masks, str(tmp))
    os.replace(tmp, path)
    return path


def _dense_copy(quantized: nn.Module) -> nn.Module:
    """A copy of ``quantized`` with every quantized layer replaced by an nn.Linear holding
    its dequantized weight (what the LoRA adapters are trained on)."""
    from .api import set_module

    dense = copy.deepcopy(quantized)
    for name, m in list(dense.named_modules()):
        if isinstance(m, QuantLinearBase):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize())
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
            set_module(dense, name, lin)
    if hasattr(dense, "config") and hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    return dense


def restorative_lora(fp_model: nn.Module, quantized: nn.Module, batches: torch.Tensor, *,
                     r: int = 64, alpha: int = 16, dropout: float = 0.1,
                     targets: Sequence[str] = LORA_TARGETS, lr: float = 1e-4, steps: int = 200,
                     batch_size: int = 1, seed: int = 0, state_dir: Optional[os.PathLike] = None,
                     save_every: int = 50, progress: bool = True) -> nn.Module:
    """Train LoRA on ``quantized`` (dequantized, frozen) against the LM loss on ``batches``
    ([n, seqlen] token ids), add the adapters' products to ``fp_model``'s weights (in place)
    and return ``fp_model``.  AdamW with a cosine schedule, ``steps`` steps of ``batch_size``
    windows (cycling through ``batches`` in a seeded order).  With ``state_dir`` the adapter
    and optimizer state are saved every ``save_every`` steps and a run resumes from them."""
    peft = _require_peft()
    if batches.dim() != 2 or batches.numel() == 0:
        raise ValueError(f"batches must be [n, seqlen] token ids, got {tuple(batches.shape)}")
    if r < 1 or steps < 0 or batch_size < 1:
        raise ValueError("r, batch_size must be >= 1 and steps >= 0")
    qcfg = getattr(getattr(quantized, "config", None), "quantization_config", None) or {}
    opts = qcfg.get("options", {}) if isinstance(qcfg, dict) else {}
    if opts.get("let"):
        raise ValueError("the restorative LoRA step needs a first pass without LET (LET folds "
                         "scales into the norms, so the quantized and full-precision weights "
                         "are no longer in the same basis); run the first PTQ with let=False")
    fp_lin = {n: m for n, m in fp_model.named_modules() if isinstance(m, nn.Linear)}
    q_layers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantLinearBase)}
    chosen = [n for n in q_layers if n.rsplit(".", 1)[-1] in targets]
    if not chosen:
        raise ValueError(f"no quantized layer matches the LoRA targets {list(targets)}")
    missing = [n for n in chosen if n not in fp_lin]
    if missing:
        raise ValueError(f"the full-precision model lacks Linears {missing[:3]}")

    dense = _dense_copy(quantized)
    for p in dense.parameters():
        p.requires_grad_(False)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                          target_modules=chosen)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft reads a property transformers has deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        pm = peft.get_peft_model(dense, cfg)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    start = 0
    state_file = Path(state_dir) / "lora_state.pt" if state_dir is not None else None
    if state_file is not None and state_file.is_file():
        st = torch.load(state_file, map_location="cpu", weights_only=False)
        if st.get("config") != {"r": r, "alpha": alpha, "targets": chosen, "steps": steps,
                                "lr": lr, "seed": seed, "batch_size": batch_size}:
            raise ValueError(f"{state_file} was written with other LoRA settings; remove it "
                             "or use the same settings")
        peft.set_peft_model_state_dict(pm, st["adapter"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start = int(st["step"])
        log.info("resuming the restorative LoRA at step %d of %d", start, steps)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(batches.shape[0], generator=g)
                       for _ in range(-(-steps * batch_size // batches.shape[0]) + 1)])

    def save(step: int) -> None:
        if state_file is None:
            return
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_suffix(".tmp")
        torch.save({"config": {"r": r, "alpha": alpha, "targets": chosen, "steps": steps,
                               "lr": lr, "seed": seed, "batch_size": batch_size},
                    "adapter": peft.get_peft_model_state_dict(pm), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "step": step}, tmp)
        os.replace(tmp, state_file)

    bar = tqdm(range(start, steps), desc="restorative LoRA", unit="step", disable=not progress,
               initial=start, total=steps)
    t0 = time.perf_counter()
    with torch.enable_grad():
        for step in bar:
            ids = batches[order[step * batch_size:(step + 1) * batch_size]]
            loss = pm(input_ids=ids, labels=ids).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"restorative LoRA: the loss became {float(loss)} at "
                                         f"step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if save_every and (step + 1) % save_every == 0:
                save(step + 1)
    bar.close()
    save(steps)
    log.info("restorative LoRA: %d steps in %.0f s", steps - start, time.perf_counter() - t0)
    # merge: the adapters' products go into the full-precision weights
    pm.eval()
    with torch.no_grad():
        for name in chosen:
            mod = pm.base_model.model.get_submodule(name)
            delta = mod.get_delta_weight("default")
            w = fp_lin[name].weight
            w.add_(delta.to(w.dtype))
    return fp_model


def ptq161_with_lora(model: nn.Module, tokenizer: Any, calibration: Any, *,
                     ptq_options: Optional[Dict[str, Any]] = None, lora_steps: int = 200,
                     lora_batch: int = 1, lora_seqlen: Optional[int] = None, lora_r: int = 64,
                     lora_alpha: int = 16, lora_lr: float = 1e-4, seed: int = 0,
                     state_dir: Optional[os.PathLike] = None,
                     progress: bool = True) -> Tuple[nn.Module, Dict[str, float]]:
    """First PTQ1.61 pass, restorative LoRA, merge, second PTQ with the first pass's masks.

    ``model`` (full precision) is left as it was; returns ``(quantized model, seconds per
    step)``.  ``calibration``: [n, seqlen] token ids (used for both PTQ passes and the LoRA
    step; ``lora_seqlen`` cuts the LoRA windows shorter).  With ``state_dir`` each finished
    step is kept there (first-pass masks, LoRA state, merged weights) and reused on a rerun.
    """
    import sqllm

    opts = dict(ptq_options or {})
    if opts.get("let"):
        raise ValueError("ptq161 with the restorative LoRA: the first pass must not use LET "
                         "(see restorative_lora)")
    if not isinstance(calibration, torch.Tensor):
        raise TypeError("calibration must be a [n, seqlen] LongTensor of token ids")
    times: Dict[str, float] = {}
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory()
        state_dir = tmp.name
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    try:
        masks_file = state / "masks_pass1.safetensors"
        merged_file = state / "merged_linears.pt"
        fp = copy.deepcopy(model)
        if not merged_file.is_file():
            q1 = copy.deepcopy(model)
            t0 = time.perf_counter()
            sqllm.quantize(q1, method="ptq161", calibration=calibration, progress=progress, **opts)
            times["first PTQ"] = time.perf_counter() - t0
            save_masks(q1, masks_file)
            lb = calibration if lora_seqlen is None else calibration[:, :lora_seqlen]
            t0 = time.perf_counter()
            restorative_lora(fp, q1, lb, r=lora_r, alpha=lora_alpha, lr=lora_lr, steps=lora_steps,
                             batch_size=lora_batch, seed=seed, state_dir=state, progress=progress)
            times["LoRA"] = time.perf_counter() - t0
            del q1
            merged = {n: m.weight.detach().clone() for n, m in fp.named_modules()
                      if isinstance(m, nn.Linear)}
            torch.save(merged, merged_file.with_suffix(".tmp"))
            os.replace(merged_file.with_suffix(".tmp"), merged_file)
        else:
            log.info("reusing the merged weights in %s", merged_file)
            merged = torch.load(merged_file, map_location="cpu")
            with torch.no_grad():
                for n, m in fp.named_modules():
                    if isinstance(m, nn.Linear) and n in merged:
                        m.weight.copy_(merged[n])
        t0 = time.perf_counter()
        sqllm.quantize(fp, method="ptq161", calibration=calibration, progress=progress,
                       **{**opts, "masks": str(masks_file)})
        times["second PTQ"] = time.perf_counter() - t0
        return fp, times
    finally:
        if tmp is not None:
            tmp.cleanup()


# -- the command line: ``sqllm ptq161-lora`` ------------------------------------------

def add_parser(sub: Any, add_method_options: Any, add_common: Any) -> None:
    """Register ``sqllm ptq161-lora`` (called by :mod:`sqllm.cli`)."""
    p = sub.add_parser(
        "ptq161-lora", help="PTQ1.61's restorative LoRA (+ the second PTQ), one command or steps",
        description="One command: first PTQ1.61 pass, restorative LoRA on the quantized model, "
                    "merge into the full-precision weights, second PTQ reusing the masks -> --out. "
                    "With --quantized FIRST_PASS_FOLDER the first pass is read instead of run; "
                    "with --merge-only the merged full-precision model is saved to --out (then "
                    "`sqllm quantize --model OUT --method ptq161 --masks FIRST_PASS_FOLDER`).")
    p.add_argument("--model", default=None,
                   help="full-precision model: HF folder, .gguf, or omit for the embedded SmolLM2-135M")
    p.add_argument("--quantized", default=None, help="a saved first-pass ptq161 folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merge-only", action="store_true",
                   help="stop after the merge: save the merged full-precision model")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--calib-text", default="austen:emma", help="calibration text (PTQ and LoRA)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=1e-4)
    p.add_argument("--lora-steps", type=int, default=200)
    p.add_argument("--lora-batch", type=int, default=1)
    p.add_argument("--lora-seqlen", type=int, default=None,
                   help="LoRA window length (default: --seqlen)")
    p.add_argument("--state-dir", default=None,
                   help="keep each finished step here (masks, LoRA state, merged weights) and "
                        "resume from it")
    add_common(p)
    add_method_options(p, "ptq161")


def cmd(args: Any, method_args: Dict[str, Any]) -> int:
    import sqllm
    from .cli import _load_any
    from .data import calibration_batches, load_text
    from .io import check_output_folder

    check_output_folder(args.out, overwrite=args.overwrite, source=args.model)
    model, tok = _load_any(args.model)
    if tok is None:
        raise ValueError("the LoRA step needs a tokenizer for the calibration text")
    ids = calibration_batches(tok, load_text(args.calib_text), args.nsamples, args.seqlen,
                              seed=args.seed)
    lb = ids if args.lora_seqlen is None else ids[:, :args.lora_seqlen]
    progress = not args.quiet
    if args.quantized is None:
        if args.merge_only:
            raise ValueError("--merge-only needs --quantized (the first pass to train LoRA on)")
        q, times = ptq161_with_lora(model, tok, ids, ptq_options=method_args,
                                    lora_steps=args.lora_steps, lora_batch=args.lora_batch,
                                    lora_seqlen=args.lora_seqlen, lora_r=args.lora_r,
                                    lora_alpha=args.lora_alpha, lora_lr=args.lora_lr,
                                    seed=args.seed, state_dir=args.state_dir, progress=progress)
    else:
        q1 = sqllm.load_quantized(args.quantized)
        t0 = time.perf_counter()
        restorative_lora(model, q1, lb, r=args.lora_r, alpha=args.lora_alpha, lr=args.lora_lr,
                         steps=args.lora_steps, batch_size=args.lora_batch, seed=args.seed,
                         state_dir=args.state_dir, progress=progress)
        times = {"LoRA": time.perf_counter() - t0}
        del q1
        if args.merge_only:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out)
            tok.save_pretrained(out)
            print(f"LoRA {times['LoRA']:.0f} s; merged full-precision model saved to {out}; next: "
                  f"sqllm quantize --model {out} --method ptq161 --masks {args.quantized} --out ...")
            return 0
        q = model
        t0 = time.perf_counter()
        sqllm.quantize(q, method="ptq161", calibration=ids, progress=progress,
                       **{**method_args, "masks": str(args.quantized)})
        times["second PTQ"] = time.perf_counter() - t0
    out = sqllm.save_quantized(q, args.out, tokenizer=tok, overwrite=args.overwrite)
    print("; ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; saved to {out}")
    return 0
