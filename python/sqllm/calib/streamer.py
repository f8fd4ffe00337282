"""The block streamer: quantize a model one decoder block at a time.

Order of work (docs/design.md, "The block streamer"):

1. model-scoped statistics (the Fisher diagonal) in a pre-pass, when the method
   asks for them;
2. capture the inputs of every decoder block on the calibration batches: each
   block's ``forward`` is replaced by a stub that records its positional and
   keyword arguments (attention mask, position ids / embeddings, ...) and passes
   the hidden states on, the last one stops the forward; only the modules before
   the blocks (embeddings, rotary) run, materialised on demand;
3. for each block: materialise its weights (from the checkpoint when the model
   is on the meta device), collect the block statistics the method asks for by
   running the block on its inputs, quantize (``method.quantize_block``),
   run the quantized block to produce the next block's inputs ("true
   sequential"; ``fp_inputs=True`` propagates the full-precision outputs), hand
   the finished block's tensors to the writer and free it;
4. the tensors outside the blocks (embeddings, final norm, lm_head) last, one at
   a time.

Peak memory is about one block, its statistics and the activations of the
calibration set.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import find_linear_layers
from .._memory import return_freed_memory as _return_freed_memory
from ..nn import QuantLinearBase
from .blocks import block_linears, find_decoder_blocks, materialize, release, tensor_names
from .checkpoint import is_meta_model
from .collectors import Collector, get_collector
from .stats_dir import StatsDir, calibration_identity, model_identity

__all__ = ["BlockInputs", "capture_block_inputs", "stream_quantize"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BlockInputs:
    """The inputs of one decoder block on the calibration data, one entry per batch.

    ``hidden[b]`` is the hidden-state tensor (the block's first argument),
    ``args[b]`` the further positional arguments and ``kwargs[b]`` the keyword
    arguments (attention mask, position ids / embeddings, cache off) the model
    passes this block.  Tensors equal across batches are stored once.
    """

    hidden: List[torch.Tensor]
    args: List[tuple]
    kwargs: List[dict]

    def __len__(self) -> int:
        return len(self.hidden)

    def with_hidden(self, hidden: List[torch.Tensor]) -> "BlockInputs":
        return BlockInputs(hidden, self.args, self.kwargs)

    @torch.no_grad()
    def run(self, block: nn.Module) -> List[torch.Tensor]:
        """The block's output hidden states, one tensor per batch."""
        outs = []
        for h, a, kw in zip(self.hidden, self.args, self.kwargs):
            o = block(h, *a, **kw)
            outs.append(o[0] if isinstance(o, (tuple, list)) else o)
        return outs


class _StopCapture(Exception):
    pass


class _Dedupe:
    """Keeps one copy of equal tensors recorded for different batches."""

    def __init__(self) -> None:
        self.pool: List[torch.Tensor] = []

    def __call__(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            v = v.detach()
            for t in self.pool:
                if t is v or (t.shape == v.shape and t.dtype == v.dtype and t.device == v.device
                              and torch.equal(t, v)):
                    return t
            self.pool.append(v)
            return v
        if isinstance(v, tuple):
            return tuple(self(x) for x in v)
        if isinstance(v, list):
            return [self(x) for x in v]
        if isinstance(v, dict):
            return {k: self(x) for k, x in v.items()}
        return v


def _own_tensors(mod: nn.Module, name: str) -> Dict[str, Tuple[nn.Module, str, bool]]:
    out = {}
    for pname, p in mod._parameters.items():
        if p is not None:
            out[f"{name}.{pname}" if name else pname] = (mod, pname, True)
    for bname, b in mod._buffers.items():
        if b is not None:
            out[f"{name}.{bname}" if name else bname] = (mod, bname, False)
    return out


def _outside(name: str, blocks_name: str) -> bool:
    return not (name == blocks_name or name.startswith(blocks_name + "."))


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks_name: str, blocks: nn.ModuleList,
                         batches: torch.Tensor, checkpoint: Any = None, batch_size: int = 1,
                         device: Optional[torch.device] = None) -> Tuple[List[torch.Tensor], List[List[tuple]], List[List[dict]]]:
    """Run the model on ``batches`` up to the first block and record every block's arguments.

    Returns ``(hidden, args, kwargs)``: the block-0 hidden states per batch, and
    per block, per batch, the positional (after the hidden states) and keyword
    arguments the model passes it.  Modules outside the blocks are made ready
    when first called: meta tensors are loaded from ``checkpoint``, tensors on
    another device than ``device`` are moved there; all is put back afterwards.
    """
    if batches.dim() != 2:
        raise ValueError(f"calibration batches must be [nsamples, seqlen], got {tuple(batches.shape)}")
    n = len(blocks)
    hidden: List[torch.Tensor] = []
    args: List[List[tuple]] = [[] for _ in range(n)]
    kwargs: List[List[dict]] = [[] for _ in range(n)]
    dedupe = _Dedupe()
    device = torch.device(device) if device is not None else None
    restore: List[Tuple[nn.Module, str, bool, Any]] = []  # tensors to put back afterwards
    hooks = []

    for mname, mod in model.named_modules():
        if not _outside(mname, blocks_name):
            continue
        own = _own_tensors(mod, mname)
        if not any(getattr(m, a).is_meta or (device is not None and getattr(m, a).device != device)
                   for m, a, _ in own.values()):
            continue

        def pre(m: nn.Module, _inp: Any, own: Dict = own) -> None:
            for n, (mm, attr, is_param) in own.items():
                t = getattr(mm, attr)
                if t.is_meta:
                    restore.append((mm, attr, is_param, None))
                    materialize(mm, "", checkpoint, device or torch.device("cpu"),
                                names={n: (mm, attr, is_param)})
                elif device is not None and t.device != device:
                    restore.append((mm, attr, is_param, t))
                    moved = t.detach().to(device)
                    if is_param:
                        mm._parameters[attr] = nn.Parameter(moved, requires_grad=t.requires_grad)
                    else:
                        mm._buffers[attr] = moved

        hooks.append(mod.register_forward_pre_hook(pre))

    def make_stub(i: int):
        def stub(*a: Any, **kw: Any) -> Any:
            if a:
                h, rest = a[0], a[1:]
            else:
                h, rest = kw.pop("hidden_states"), ()
            if i == 0:
                hidden.append(h.detach())
            args[i].append(dedupe(rest))
            kwargs[i].append(dedupe(kw))
            if i == n - 1:
                raise _StopCapture
            return h
        return stub

    for i, b in enumerate(blocks):
        b.forward = make_stub(i)
    try:
        for start in range(0, batches.shape[0], batch_size):
            ids = batches[start:start + batch_size].to(device or _device_of(model))
            try:
                model(input_ids=ids, use_cache=False)
            except _StopCapture:
                pass
            else:
                raise RuntimeError("the model's forward did not call its last decoder block")
    finally:
        for b in blocks:
            del b.forward
        for h in hooks:
            h.remove()
        for mm, attr, is_param, orig in reversed(restore):
            if orig is None:  # loaded from the checkpoint: back to meta
                t = getattr(mm, attr)
                if is_param:
                    mm._parameters[attr] = nn.Parameter(t.detach().to("meta"), requires_grad=False)
                else:
                    mm._buffers[attr] = t.to("meta")
            elif is_param:
                mm._parameters[attr] = orig
            else:
                mm._buffers[attr] = orig
    if any(len(a) != len(hidden) for a in args):
        raise RuntimeError("not every decoder block was called once per calibration batch")
    return hidden, args, kwargs


def _canonical_names(model: nn.Module) -> Dict[str, str]:
    """Tensor name -> the first name of the same tensor (tied weights share one)."""
    first: Dict[int, str] = {}
    out: Dict[str, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out[n] = first.setdefault(id(p), n)
    return out


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


@torch.no_grad()
def _input_groups(block: nn.Module, layers: Dict[str, nn.Linear],
                  inputs: BlockInputs) -> List[Dict[str, nn.Linear]]:
    """The block's Linears in call order, grouped by shared input (one run on batch 0)."""
    calls: List[Tuple[str, Any]] = []
    hooks = [lin.register_forward_pre_hook(
        lambda mod, inp, name=name: calls.append((name, inp[0]))) for name, lin in layers.items()]
    try:
        inputs.with_hidden(inputs.hidden[:1]).run(block)
    finally:
        for h in hooks:
            h.remove()
    groups: List[Dict[str, nn.Linear]] = []
    seen = set()
    last_x = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and x is last_x:
            groups[-1][name] = layers[name]
        else:
            groups.append({name: layers[name]})
        last_x = x
    rest = {n: lin for n, lin in layers.items() if n not in seen}
    if rest:
        groups.append(rest)
    return groups




def _rss() -> str:
    """This process's resident set, for debug logs ('?' where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return f"{pages * os.sysconf('SC_PAGE_SIZE') / 2**30:.2f} GiB"
    except (OSError, ValueError, IndexError):
        return "?"


def _overrides_block(qm: Any) -> bool:
    from ..methods import QuantMethod

    return type(qm).quantize_block is not QuantMethod.quantize_block


def stream_quantize(model: nn.Module, qm: Any, batches: Optional[torch.Tensor], *,
                    exclude=("lm_head",), checkpoint: Any = None, writer: Any = None,
                    fp_inputs: bool = False, stats_dir: Any = None, progress: bool = True,
                    batch_size: int = 1, device: Any = None, sequential_groups: bool = False,
                    precomputed: Optional[Dict[str, Dict[str, Any]]] = None,
                    dist: Any = "auto", progress_checkpoint: Any = None,
                    discard_blocks: bool = False) -> Dict[str, Dict[str, Any]]:
    """Quantize ``model`` block by block with method instance ``qm``; return the layer table.

    Parameters
    ----------
    model : nn.Module
        In memory, or with parameters on the meta device (then ``checkpoint``,
        or the model's ``sqllm_checkpoint`` set by :func:`sqllm.open_on_meta`,
        supplies the weights).
    qm : QuantMethod
    batches : LongTensor [nsamples, seqlen] or None
        Calibration token ids; needed when the method asks for statistics.
    exclude : names of Linears to leave alone.
    checkpoint : SafetensorsCheckpoint, optional
    writer : sqllm.io.ShardWriter, optional
        Receives each finished block's tensors (then freed to meta) and the
        tensors outside the blocks; without it the quantized model stays in memory.
    fp_inputs : bool
        Feed each block the full-precision outputs of the previous block instead
        of the quantized block's ("true sequential", the default).
    stats_dir : path, optional
        Statistics are loaded from here when present and saved here when collected.
    batch_size : int
        Calibration rows per forward call.
    device : torch.device or str, optional
        Where each block is worked on (e.g. ``"cuda"`` for a model kept on the
        CPU or on meta); finished blocks go back to the model's own device.
        Default: the model's device.
    sequential_groups : bool
        Quantize a block's Linears group by group in the order the block calls
        them — Linears fed the same input form a group (q/k/v, o, gate/up, down) —
        collecting each group's statistics with the earlier groups already
        quantized (GPTQ's "true sequential" inside a block); only one group's
        statistics are held at a time.  For methods that quantize layer by layer.
    precomputed : dict, optional
        Statistics entries already known (e.g. ``{"fisher": {...}}``).
    dist : sqllm.distributed.DistContext, None or "auto"
        Several processes (:mod:`sqllm.distributed`): calibration batches sharded,
        statistics reduced to the rank quantizing each layer, layers spread over
        the ranks and gathered.  "auto": the initialized process group, if any.
    progress_checkpoint : sqllm.distributed.ProgressCheckpoint, optional
        Finished blocks are recorded there; blocks it already holds are restored
        instead of quantized.
    discard_blocks : bool
        Free each finished block (to meta) even without a writer (ranks other
        than the writing one).
    """
    t0 = time.perf_counter()
    blocks_name, blocks = find_decoder_blocks(model)
    meta = is_meta_model(model)
    if meta and checkpoint is None:
        checkpoint = getattr(model, "sqllm_checkpoint", None)
    if meta and checkpoint is None:
        raise ValueError("the model is on the meta device and has no checkpoint to read weights "
                         "from: open it with sqllm.open_on_meta(folder) or pass checkpoint=folder")
    home = _device_of(model)
    device = torch.device(device) if device is not None else home
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    canonical = _canonical_names(model)
    all_layers = find_linear_layers(model, exclude=exclude)
    if not all_layers:
        raise ValueError("the model has no Linear layers to quantize")

    if dist == "auto":
        from ..distributed import current

        dist = current()
    owner: Dict[str, int] = {}
    split_rows: Dict[str, Any] = {}
    local_batches = batches
    if dist is not None:
        from ..distributed import assign_owners, shard_batches

        if stats_dir is not None:
            raise ValueError("stats_dir is not supported in a distributed run (yet)")
        if _overrides_block(qm):
            raise ValueError(f"method {qm.name!r} quantizes whole blocks (quantize_block), which "
                             "a distributed run does not split; run it in one process")
        if batches is not None:
            local_batches = shard_batches(batches, batch_size, dist.rank, dist.world)
        groups: Dict[str, List[str]] = {}
        for n in all_layers:
            key = n[len(blocks_name) + 1:].split(".", 1)[0] if not _outside(n, blocks_name) else ""
            groups.setdefault(key, []).append(n)
        shapes = {n: (int(m.out_features), int(m.in_features)) for n, m in all_layers.items()}
        owner = assign_owners(shapes, list(groups.values()), dist.world,
                              "hessian" in qm.required_stats())
        if set(qm.required_stats()) <= {"fisher"}:  # per-row methods: row ranges per rank
            from ..distributed import row_split_layers

            split_rows = row_split_layers(qm, all_layers, dist.world)
        progress = progress and dist.rank == 0

    def reduce_states(coll: Collector, names: Any) -> Dict[str, Dict[str, torch.Tensor]]:
        """The finished statistics of ``names`` (in a distributed run: those this rank owns)."""
        if dist is None:
            return {n: coll.layer_state(n) for n in names}
        out = {}
        for n in names:
            if n in split_rows:
                merged = dist.reduce_rows(coll.partial_state(n), split_rows[n],
                                          f"reducing the {coll.name} statistics of {n}")
            else:
                merged = dist.reduce_partial(coll.partial_state(n), owner[n],
                                             f"reducing the {coll.name} statistics of {n}")
            if hasattr(coll, "drop"):
                coll.drop(n)
            if merged is not None:
                out[n] = coll.finish_partial(merged)
        return out

    def quantize_group(group: Dict[str, nn.Linear]) -> Dict[str, QuantLinearBase]:
        if dist is None:
            return {n: qm.quantize_layer(n, lin, stats) for n, lin in group.items()}
        from ..distributed import quantize_layers

        return quantize_layers(dist, qm, group, stats, owner, split_rows)

    required = tuple(qm.required_stats())
    collectors = {name: get_collector(name) for name in required}
    model_scoped = [n for n, c in collectors.items() if c.scope == "model"]
    block_scoped = [n for n, c in collectors.items() if c.scope == "block"]
    if required and batches is None and not (precomputed and set(required) <= set(precomputed)):
        raise ValueError(f"method {qm.name!r} needs calibration data for its statistics "
                         f"{list(required)} (pass calibration=...)")

    sdir: Optional[StatsDir] = None
    if stats_dir is not None and required:
        sdir = StatsDir(stats_dir, model_identity(model, all_layers), calibration_identity(batches))
        grouped = sequential_groups and not _overrides_block(qm)
        for name in required:
            if collectors[name].scope == "model" or (fp_inputs and not grouped):
                sdir.use_collector(name, {"inputs": "full-precision model"})
            elif grouped:
                sdir.use_collector(name, {"inputs": "full-precision" if fp_inputs else
                                          "quantized previous blocks",
                                          "sequential_groups": True, "method": qm.config()})
            else:
                sdir.use_collector(name, {"inputs": "quantized previous blocks",
                                          "method": qm.config()})

    stats: Dict[str, Any] = {k: dict(v) for k, v in (precomputed or {}).items()}

    # 1. model-scoped statistics (Fisher): the whole model, once.
    for cname in model_scoped:
        if cname in stats:
            continue
        if sdir is not None and all(sdir.has(cname, n) for n in all_layers):
            log.info("loading %s statistics from %s", cname, sdir.path)
            stats.update(collectors[cname]().publish({n: sdir.load(cname, n) for n in all_layers}))
            continue
        if batches is None:
            raise ValueError(f"method {qm.name!r} needs calibration data for {cname!r}")
        coll = collectors[cname]()
        if meta:
            log.warning("%s needs gradients of the whole model: loading all of it into memory", cname)
            materialize(model, "", checkpoint, home,
                        names={n: v for n, v in tensor_names(model, "", persistent_only=False).items()
                               if canonical.get(n, n) == n})
            model.tie_weights()
            try:
                coll.collect_model(model, all_layers, local_batches, progress)
            finally:
                release(model)
                model.tie_weights()
        else:
            coll.collect_model(model, all_layers, local_batches, progress)
        states = reduce_states(coll, all_layers)
        if sdir is not None:
            for n, s in states.items():
                sdir.save(cname, n, s)
        stats.update(coll.publish(states))

    # 2. block inputs
    per_block_stats_cached = sdir is not None and bool(block_scoped) and all(
        sdir.has(c, n) for c in block_scoped for n in all_layers if not _outside(n, blocks_name))
    overrides = _overrides_block(qm)
    need_inputs = batches is not None and (overrides or (bool(block_scoped) and not per_block_stats_cached))
    inputs: Optional[BlockInputs] = None
    block_args: List[List[tuple]] = []
    block_kwargs: List[List[dict]] = []
    if need_inputs:
        hidden, block_args, block_kwargs = capture_block_inputs(
            model, blocks_name, blocks, local_batches, checkpoint if meta else None, batch_size,
            device)
        inputs = BlockInputs(hidden, block_args[0], block_kwargs[0])
        log.info("captured the inputs of %d blocks on %d batches", len(blocks), len(hidden))

    # 3. the blocks
    layer_cfgs: Dict[str, Dict[str, Any]] = {}
    from ..api import set_module

    bar = tqdm(range(len(blocks)), desc=f"{qm.name} {qm.bits}-bit", unit="block",
               disable=not progress)
    for i in bar:
        block = blocks[i]
        prefix = f"{blocks_name}.{i}"
        resumed = progress_checkpoint is not None and i < progress_checkpoint.done
        # a finished block is restored from the progress checkpoint; its full-precision
        # weights are only read when they give the next block's inputs (fp_inputs)
        load_fp = not resumed or (fp_inputs and inputs is not None)
        if meta and load_fp:
            materialize(block, prefix, checkpoint, device)
        if device != home and load_fp:
            block.to(device)
        layers = block_linears(block, prefix, exclude)
        layers = {n: m for n, m in layers.items() if n in all_layers}
        if inputs is not None:
            inputs = BlockInputs(inputs.hidden, block_args[i], block_kwargs[i])
        fp_out: Optional[List[torch.Tensor]] = None

        def gather(group: Dict[str, nn.Linear]) -> Optional[List[torch.Tensor]]:
            """Load or collect the block statistics of ``group``; the block's outputs if run."""
            todo = [c for c in block_scoped
                    if sdir is None or not all(sdir.has(c, n) for n in group)]
            for c in block_scoped:
                if c not in todo:
                    part = collectors[c]().publish({n: sdir.load(c, n) for n in group})
                    for k, v in part.items():
                        stats.setdefault(k, {}).update(v)
            if not todo:
                return None
            if inputs is None:
                raise RuntimeError("block statistics are needed but no inputs were captured")
            colls: List[Collector] = [collectors[c]() for c in todo]
            for c in colls:
                c.attach(group)
            try:
                out = inputs.run(block)
            finally:
                for c in colls:
                    c.detach()
            for c in colls:
                states = reduce_states(c, group)
                if sdir is not None:
                    for n, st in states.items():
                        sdir.save(c.name, n, st)
                for k, v in c.publish(states).items():
                    stats.setdefault(k, {}).update(v)
            return out

        def install(quantized: Dict[str, QuantLinearBase], group: Dict[str, nn.Linear]) -> None:
            extra = set(quantized) - set(group)
            if extra:
                raise ValueError(f"{qm.name}.quantize_block returned layers not in the block: "
                                 f"{sorted(extra)[:3]}")
            for name, q in quantized.items():
                if not isinstance(q, QuantLinearBase):
                    raise TypeError(f"{qm.name} returned a {type(q).__name__} for {name!r}, "
                                    "not a QuantLinearBase")
                set_module(model, name, q.to(device))
                layer_cfgs[name] = q.layer_config()
            for key in list(stats):
                for name in group:
                    stats[key].pop(name, None)
            # The replaced Linears are still referenced (by ``layers`` here and the
            # caller's layer table): on a meta model drop their weights now, not at
            # the end (they can be read again).  An in-memory model keeps them until
            # quantize() returns, so that a failure can put the original layers back.
            if meta:
                for name, lin in group.items():
                    if name in quantized:
                        release(lin)

        if resumed:
            from ..distributed import restore_block

            if inputs is not None and fp_inputs:
                fp_out = inputs.run(block)
            restore_block(progress_checkpoint, i, model, block, prefix, layers, layer_cfgs, device)
            for key in list(stats):
                for name in layers:
                    stats[key].pop(name, None)
        elif sequential_groups and block_scoped and layers and not overrides and inputs is not None:
            if fp_inputs:
                fp_out = inputs.run(block)
            for group in _input_groups(block, layers, inputs):
                gather(group)
                log.debug("block %d, %s: statistics collected, resident %s", i, list(group), _rss())
                install(quantize_group(group), group)
                _return_freed_memory()  # this group's statistics, before the next group's
                log.debug("block %d, %s: quantized, resident %s", i, list(group), _rss())
        else:
            if block_scoped and layers:
                fp_out = gather(layers)
            if inputs is not None and fp_out is None and (overrides or fp_inputs):
                fp_out = inputs.run(block)
            install(qm.quantize_block(block, inputs, fp_out, stats, layers=layers) if dist is None
                    else quantize_group(layers), layers)

        if inputs is not None and i + 1 < len(blocks):
            nxt = fp_out if fp_inputs else inputs.run(block)
            inputs = BlockInputs(nxt, block_args[i + 1], block_kwargs[i + 1])
        del fp_out
        if progress_checkpoint is not None and not resumed:
            progress_checkpoint.block_done(i, block.state_dict(prefix=prefix + "."),
                                           {n: layer_cfgs[n] for n in layers if n in layer_cfgs})
        if writer is not None or discard_blocks:
            if writer is not None:
                writer.add_many(block.state_dict(prefix=prefix + "."))
                writer.flush()
            release(block)
            _return_freed_memory()
            log.debug("block %d written, resident %s", i, _rss())
        elif device != home:
            block.to(home)
    bar.close()
    del inputs

    # 4. Linears outside the blocks, then the remaining tensors
    outside = {n: m for n, m in all_layers.items() if _outside(n, blocks_name)}
    for name, lin in outside.items():
        if block_scoped or overrides:
            log.warning("layer %s is outside the decoder blocks: left in full precision "
                        "(%s needs block statistics)", name, qm.name)
            continue
        if meta:
            materialize(lin, name, checkpoint, home)
        q = quantize_group({name: lin})[name]
        set_module(model, name, q.to(home))
        layer_cfgs[name] = q.layer_config()
        if meta:
            release(lin)

    rest = {n: v for n, v in tensor_names(model, "").items()
            if _outside(n, blocks_name) and canonical.get(n, n) == n}
    if writer is not None:
        for n, (mod, attr, _) in rest.items():
            t = getattr(mod, attr)
            writer.reserve(t.numel() * t.element_size())  # write out before loading more
            if t.is_meta:
                t = checkpoint.load([n])[n].to(t.dtype)
            writer.add(n, t)
            del t
        writer.flush()
        release(model)
    elif discard_blocks:
        release(model)
    elif meta:
        materialize(model, "", checkpoint, home,
                    names={n: v for n, v in tensor_names(model, "", persistent_only=False).items()
                           if canonical.get(n, n) == n})
        model.tie_weights()
    log.info("streamed %d blocks of %s (%d layers quantized) in %.1f s", len(blocks), blocks_name,
             len(layer_cfgs), time.perf_counter() - t0)
    return layer_cfgs
