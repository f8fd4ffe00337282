"""``sqllm.quantize``: quantize every decoder Linear of a model in place."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import find_linear_layers
from .config import FORMAT_VERSION, CalibrationConfig, QuantizationConfig
from .methods import get_method
from .nn import QuantLinearBase

__all__ = ["quantize", "FORMAT_VERSION", "size_report", "set_module"]

log = logging.getLogger(__name__)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _source_folder(model: nn.Module, checkpoint: Any) -> Any:
    """The folder a model's weights are read from (meta models, streaming), if any."""
    ck = checkpoint if checkpoint is not None else getattr(model, "sqllm_checkpoint", None)
    if ck is None:
        return None
    return getattr(ck, "folder", ck)


def _vocab_size(model: nn.Module) -> Optional[int]:
    try:
        emb = model.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


def _calibration_batches(calibration: Any, tokenizer: Any, nsamples: int, seqlen: int,
                         seed: int, model: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
    if calibration is None:
        return None
    if isinstance(calibration, np.ndarray):
        calibration = torch.from_numpy(calibration)
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.numel() == 0:
            raise ValueError("calibration tensor must be [nsamples, seqlen] token ids, got shape "
                             f"{tuple(calibration.shape)}")
        if calibration.is_floating_point() or calibration.is_complex() or \
                calibration.dtype == torch.bool:
            raise TypeError(f"calibration token ids must be an integer tensor, got {calibration.dtype}")
        vocab = _vocab_size(model) if model is not None else None
        lo, hi = int(calibration.min()), int(calibration.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ValueError(f"calibration token ids must be in [0, {vocab if vocab else 'vocab'}), "
                             f"got values in [{lo}, {hi}]")
        return calibration.long()
    if isinstance(calibration, str):
        if tokenizer is None:
            raise ValueError("calibration given as text needs tokenizer=")
        from .data import calibration_batches, load_text

        return calibration_batches(tokenizer, load_text(calibration), nsamples, seqlen, seed=seed)
    raise TypeError("calibration must be a LongTensor [nsamples, seqlen], a text source string "
                    f"or None, got {type(calibration).__name__}")


def quantize(model: nn.Module, method: str = "squeezellm", bits: int = 3,
             calibration: Union[torch.Tensor, str, None] = None, nsamples: int = 32,
             seqlen: int = 512, group_axis: str = "row", sparsity: float = 0.0,
             kmeans: str = "exact", tokenizer: Any = None, seed: int = 0,
             exclude: Iterable[str] = ("lm_head",),
             sensitivity: Optional[Dict[str, torch.Tensor]] = None, progress: bool = True,
             method_options: Optional[Dict[str, Any]] = None,
             stream: Optional[bool] = None, fp_inputs: bool = False,
             stats_dir: Union[str, "os.PathLike[str]", None] = None,
             out: Union[str, "os.PathLike[str]", None] = None,
             checkpoint: Any = None, device: Union[str, torch.device, None] = None,
             sequential_groups: bool = False, overwrite: bool = False,
             quantize_embeddings: Optional[int] = None,
             **options: Any) -> nn.Module:
    """Quantize the Linear layers of ``model`` in place and return it.

    Every ``nn.Linear`` is found generically (no per-architecture lists); the
    output embedding (``lm_head``) and the embeddings stay as they are.

    Parameters
    ----------
    model : nn.Module
        A transformers causal LM (or any module whose Linears should be quantized),
        in memory or opened on the meta device with :func:`sqllm.open_on_meta`.
    method : str
        A registered method (``sqllm.METHODS``): "squeezellm" (default), "rtn" or
        "gptq" (the last two on the ``uniform`` format; options ``group_size``,
        ``sym``, and for gptq ``act_order``, ``blocksize``, ``percdamp``,
        ``static_groups``, passed as keywords).
    bits : int
        Code width.
    calibration : LongTensor [nsamples, seqlen] | str | None
        Token windows, or a text source for :func:`sqllm.data.load_text`
        ("austen:emma", "mobydick", a path, "wikitext2", ...) with ``tokenizer``.
        Only read when the method needs statistics.
    nsamples, seqlen, seed :
        How many windows of how many tokens to draw from a text source.
    group_axis : {"row", "column"}
    sparsity : float
        Dense-and-Sparse fraction (squeezellm).
    kmeans : {"exact", "lloyd"}
    sensitivity : dict name -> Tensor, optional
        Precomputed Fisher diagonals (skips the gradient pass).
    progress : bool
        tqdm bars; ``False`` is quiet.
    method_options : dict, optional
        The method's options as a dict (what the CLI passes; needed for an
        option named like a parameter of this function, e.g. ``seed``).
    stream : bool, optional
        Quantize decoder block by decoder block (:mod:`sqllm.calib.streamer`).
        Default: stream when the model is on the meta device, the method needs
        per-block statistics (Hessian, activation statistics) or ``stats_dir``
        is given.  The result equals the in-memory path's for methods that need
        no per-block statistics.
    fp_inputs : bool
        Streaming: feed each block the full-precision outputs of the previous one
        instead of the quantized block's (default False, "true sequential").
    stats_dir : path, optional
        Streaming: calibration statistics are saved here per layer and reused by
        later runs on the same model and calibration data (a mismatch raises
        ValueError).
    out : path, optional
        Save the quantized model there (as :func:`sqllm.save_quantized`, with
        ``tokenizer``).  For a model on the meta device each block is written as
        soon as it is quantized and freed, and the returned model keeps only its
        skeleton (parameters on meta) and config.
    checkpoint : path or SafetensorsCheckpoint, optional
        Where the weights of a meta-device model are (default: the folder it was
        opened from by :func:`sqllm.open_on_meta`).
    device : str or torch.device, optional
        Streaming: where each block is worked on (e.g. "cuda" for a model on the
        CPU or on meta); finished blocks return to the model's device.
    sequential_groups : bool
        Streaming: quantize each block's Linears group by group (Linears fed the
        same input together: q/k/v, o, gate/up, down), each group's statistics
        taken with the earlier groups already quantized (GPTQ's true sequential
        inside a block); one group's statistics in memory at a time.
    overwrite : bool
        With ``out``: replace a folder there that is not an sqllm model folder
        (refused otherwise, before any work).
    quantize_embeddings : int, optional
        Also quantize the token embedding to this many bits (2..8, e.g. 8 or
        4) in the ``lut`` format (per-row k-means); an ``lm_head`` tied to it
        becomes a quantized layer sharing the same packed storage
        (:mod:`sqllm.nn_embedding`).  In-memory models only (not streaming).
    **options :
        Further fields of the method's dataclass (e.g. ``sensitive_fraction``).

    If quantization fails part-way, the model's original layers are put back
    (and its config left as it was) before the error propagates.

    Under ``torch.distributed`` (initialized with several processes, e.g. by
    ``torchrun``) every rank calls this with the same arguments; the work is
    shared (:mod:`sqllm.distributed`): calibration data sharded, statistics
    reduced, layers spread over the ranks; rank 0 writes ``out``, progress is
    checkpointed per block in ``<out>.progress`` and the same call resumes there.
    The result is identical bit for bit to a single-process run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cls = get_method(method)
    fields = {f.name for f in dataclasses.fields(cls)}
    given = dict(bits=bits, **options)
    for key, val, default in (("group_axis", group_axis, "row"), ("sparsity", sparsity, 0.0),
                              ("kmeans", kmeans, "exact")):
        if key in fields:
            given[key] = val
        elif val != default:
            raise ValueError(f"method {method!r} has no option {key!r}")
    if method_options:
        given.update(method_options)
    unknown = set(given) - fields
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {sorted(unknown)}")
    qm = cls(**given)

    from .calib.checkpoint import SafetensorsCheckpoint, is_meta_model
    from .calib.collectors import get_collector
    from .calib.streamer import _overrides_block

    meta = is_meta_model(model)
    required = tuple(qm.required_stats())
    block_stats = any(get_collector(s).scope == "block" for s in required) or _overrides_block(qm)
    from .distributed import current

    dist_ctx = current()
    if stream is None:
        stream = meta or block_stats or stats_dir is not None or dist_ctx is not None
    if dist_ctx is not None and not stream:
        raise ValueError("a distributed run (torch.distributed is initialized) streams the "
                         "model: stream=False is not supported there")
    if not stream and meta:
        raise ValueError("a model on the meta device can only be quantized with stream=True")
    if not stream and device is not None:
        raise ValueError("device= applies to streaming (stream=True)")
    if not stream and block_stats:
        raise ValueError(f"method {method!r} needs per-block statistics and must stream")
    if checkpoint is not None and not isinstance(checkpoint, SafetensorsCheckpoint):
        checkpoint = SafetensorsCheckpoint(checkpoint, getattr(model, "base_model_prefix", "") or "")

    if out is not None and (dist_ctx is None or dist_ctx.rank == 0):
        from .io import check_output_folder

        # Output problems surface now, not after the whole quantization ran.
        check_output_folder(out, overwrite=overwrite,
                            source=_source_folder(model, checkpoint))
    if isinstance(exclude, str):
        exclude = (exclude,)
    layers = find_linear_layers(model, exclude=exclude)
    if not layers:
        raise ValueError("the model has no Linear layers to quantize")
    if quantize_embeddings is not None:
        from .nn_embedding import _embedding_modules

        if stream:
            raise ValueError("quantize_embeddings applies to in-memory quantization, not "
                             "streaming (stream=True, meta models, per-block statistics)")
        if isinstance(quantize_embeddings, bool) or not isinstance(quantize_embeddings, int) \
                or not 2 <= quantize_embeddings <= 8:
            raise ValueError("quantize_embeddings must be None or an int in 2..8, got "
                             f"{quantize_embeddings!r}")
        _, _, head_name = _embedding_modules(model)
        if head_name is not None:  # tied: quantized once, through the embedding
            layers.pop(head_name, None)
    # Every module the run may replace, to put back if it fails part-way.
    originals = {n: m for n, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Embedding))}
    old_qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    try:
        return _quantize(model, qm, method, bits, layers, calibration, tokenizer, nsamples,
                         seqlen, seed, exclude, sensitivity, progress, stream, meta, block_stats,
                         required, fp_inputs, stats_dir, out, checkpoint, device,
                         sequential_groups, overwrite, dist_ctx, quantize_embeddings)
    except BaseException as exc:
        if dist_ctx is not None:
            dist_ctx.report_failure(exc)
        for name, mod in originals.items():
            try:
                if model.get_submodule(name) is not mod:
                    set_module(model, name, mod)
            except AttributeError:
                set_module(model, name, mod)
        if hasattr(model, "config"):
            if old_qcfg is None:
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
            else:
                model.config.quantization_config = old_qcfg
        raise


def _quantize(model: nn.Module, qm: Any, method: str, bits: Any, layers: Dict[str, nn.Linear],
              calibration: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int,
              exclude: Iterable[str], sensitivity: Optional[Dict[str, torch.Tensor]],
              progress: bool, stream: bool, meta: bool, block_stats: bool, required: Any,
              fp_inputs: bool, stats_dir: Any, out: Any, checkpoint: Any, device: Any,
              sequential_groups: bool, overwrite: bool, dist_ctx: Any = None,
              quantize_embeddings: Optional[int] = None) -> nn.Module:
    from .calib.streamer import _overrides_block, stream_quantize

    t0 = time.perf_counter()
    stats: Dict[str, Any] = {}
    if sensitivity is not None:
        missing = [n for n in layers if n not in sensitivity]
        if missing:
            raise ValueError(f"sensitivity lacks layers {missing[:3]}{'...' if len(missing) > 3 else ''}")
        stats["fisher"] = dict(sensitivity)
    needs_data = (bool(set(required) - set(stats)) or _overrides_block(qm)
                  or (not stream and qm.needs_calibration and not stats))
    batches = (_calibration_batches(calibration, tokenizer, nsamples, seqlen, seed, model)
               if needs_data else None)

    prepare = getattr(qm, "prepare", None)
    if prepare is not None:  # e.g. glut's bit allocation over all layers
        prepare(model, layers, stats, batches, progress)

    writer = None
    main = dist_ctx is None or dist_ctx.rank == 0
    progress_ck = None
    if stream:
        if dist_ctx is not None and out is not None:
            from .distributed import ProgressCheckpoint, progress_dir_for, run_identity

            pdir = progress_dir_for(out)
            dist_ctx.resume_hint = (f"Finished blocks are kept in {pdir}: the same command "
                                    "resumes from there.")
            progress_ck = ProgressCheckpoint(pdir, run_identity(
                model, qm, layers, batches, fp_inputs=fp_inputs,
                sequential_groups=bool(sequential_groups), exclude=sorted(exclude),
                precomputed_sensitivity=sensitivity is not None), dist_ctx)
        if out is not None and meta and main:
            from .io import ShardWriter

            writer = ShardWriter(out, overwrite=overwrite)
        with writer if writer is not None else contextlib.nullcontext():
            layer_cfgs = stream_quantize(model, qm, batches, exclude=exclude,
                                         checkpoint=checkpoint, writer=writer,
                                         fp_inputs=fp_inputs, stats_dir=stats_dir,
                                         progress=progress, device=device,
                                         sequential_groups=sequential_groups,
                                         precomputed=stats or None, dist=dist_ctx,
                                         progress_checkpoint=progress_ck,
                                         discard_blocks=dist_ctx is not None and meta
                                         and out is not None and not main)
        t_stats = 0.0
    else:
        if not stats and qm.needs_calibration:
            stats = qm.collect(model, layers, batches, progress)
        t_stats = time.perf_counter() - t0
        layer_cfgs = {}
        for name, lin in tqdm(list(layers.items()), desc=f"{method} {bits}-bit", unit="layer",
                              disable=not progress):
            q = qm.quantize_layer(name, lin, stats)
            q.to(lin.weight.device)
            set_module(model, name, q)
            layer_cfgs[name] = q.layer_config()
    emb_cfg = None
    if quantize_embeddings is not None:
        from .nn_embedding import quantize_embeddings as _quantize_embeddings

        emb_layers, emb_cfg = _quantize_embeddings(model, quantize_embeddings)
        layer_cfgs.update({n: q.layer_config() for n, q in emb_layers.items()})
    t_total = time.perf_counter() - t0

    used = calibration if (qm.needs_calibration or needs_data) and sensitivity is None else None
    calib = CalibrationConfig.describe(
        used, nsamples, seqlen, seed, stats_dir=stats_dir if stream else None,
        precomputed_sensitivity=sensitivity is not None,
        block_inputs=("full-precision" if fp_inputs else "quantized") if stream and block_stats
        else None,
        sequential_groups=bool(sequential_groups) if stream and block_stats else False)
    qcfg = QuantizationConfig.for_method(qm, calib, modules_to_not_convert=exclude,
                                         layers=layer_cfgs).to_dict()
    if emb_cfg is not None:
        from .nn_embedding import EMBEDDINGS_KEY

        qcfg[EMBEDDINGS_KEY] = emb_cfg
    if hasattr(model, "config"):
        model.config.quantization_config = qcfg
    if writer is not None:
        writer.finish(model, tokenizer)
    elif out is not None and main and not (dist_ctx is not None and meta):
        from .io import save_quantized

        save_quantized(model, out, tokenizer=tokenizer, overwrite=overwrite)
    if dist_ctx is not None:
        if progress_ck is not None:
            progress_ck.remove()
        dist_ctx.barrier("finishing the quantized model")
    log.info("quantized %d layers with %s in %.1f s%s", len(layer_cfgs), method, t_total,
             " (streamed)" if stream else f" (statistics {t_stats:.1f} s)")
    return model


def size_report(model: nn.Module) -> Dict[str, float]:
    """Bytes of the model's parameters and buffers, and bits/weight of its quantized layers.

    Returns a dict: ``total_bytes`` (everything stored, tied weights counted
    once), ``quantized_weights`` (number of weights in quantized layers),
    ``quantized_bits_per_weight`` (codes + tables + sparse part, per weight).
    """
    seen = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.numel() == 0 or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    qbits = 0
    qn = 0
    for m in model.modules():
        if isinstance(m, QuantLinearBase):
            qbits += m.storage_bits()
            qn += m.in_features * m.out_features
    return {"total_bytes": float(total), "quantized_weights": float(qn),
            "quantized_bits_per_weight": qbits / qn if qn else 0.0}
