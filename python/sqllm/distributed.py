"""Scale-out with ``torch.distributed``: data-parallel statistics, work-parallel quantization,
per-block progress checkpoints, fault reporting and sharded perplexity.

When ``torch.distributed`` is initialized with more than one process (as under
``torchrun``; :func:`init_from_env` does it for the CLI), :func:`sqllm.quantize`
streams the model block by block on every rank (:mod:`sqllm.calib.streamer`) and:

* **shards the calibration batches** over the ranks (contiguous runs of whole
  batches, so every batch is computed exactly as in one process); every rank
  runs the blocks on its own shard only;
* **reduces the statistics** to the rank that quantizes the layer: Hessians,
  activation sums and the Fisher diagonal are compensated float64 sums
  (:mod:`sqllm.calib.compensated`) merged pair by pair with TwoSum and rounded
  once, counts are added as integers and ``max |x|`` is a max; the result equals
  the single-process statistics bit for bit unless an exact sum falls within
  ~``n·2^-106·Σ|terms|`` of a float64 rounding midpoint (then one ulp apart);
* **spreads the Linears** of each block over the ranks (longest job first by a
  cost model: ``out·in² + in³/3`` for Hessian methods, ``out·in`` otherwise); each
  rank quantizes its layers and the quantized layers are all-gathered, so every
  rank can run the quantized block on its shard.  Per-row methods (RTN; SqueezeLLM
  with row tables, dense, without GPTQ) split every Linear into one row range per
  rank instead and concatenate the ranges' buffers (each row is quantized on its
  own).  Every layer (or row) is quantized from the same weights and statistics as
  in one process, so the saved model is identical bit for bit (same library build,
  thread count and device type);
* **rank 0 writes** the output shard by shard; the others free each block when
  it is done (no rank holds the whole model when it is opened on the meta device);
* **checkpoints progress** after every finished block (``<out>.progress/``,
  written by rank 0, read back by rank 0 and broadcast on a resume); the same
  command resumes from the last finished block, with any number of ranks;
* **reports failures**: every collective runs on sqllm's own gloo group with a
  timeout (``SQLLM_DIST_TIMEOUT`` seconds, default 1800) and each rank keeps a
  heartbeat in the rendezvous store; when a collective fails (a peer's
  connection closes at once when its process dies; a lost node runs into the
  timeout), the rank names the ranks whose heartbeat stopped (or that reported an
  error) in a :class:`DistributedError` and stops.

Tensors on CUDA are reduced on the default group (NCCL when it was initialized
with it, e.g. ``backend="cpu:gloo,cuda:nccl"``); objects (quantized layers,
progress) always travel on the gloo group.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["DistributedError", "DistContext", "current", "init_from_env", "is_main",
           "shard_batches", "ProgressCheckpoint"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5


class DistributedError(RuntimeError):
    """A distributed run stopped because another rank failed or vanished."""


def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def init_from_env(device: Optional[str] = None) -> bool:
    """Initialize ``torch.distributed`` from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) when it names more than one
    process and nothing initialized it yet.  gloo for CPU tensors, plus NCCL for
    CUDA tensors when CUDA is usable.  Returns True when a group of several
    processes is initialized afterwards."""
    dist = _dist()
    if is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=_timeout())
    log.info("torch.distributed initialized: rank %d of %d (%s)", dist.get_rank(),
             dist.get_world_size(), backend)
    return dist.get_world_size() > 1


def _timeout() -> datetime.timedelta:
    try:
        s = float(os.environ.get("SQLLM_DIST_TIMEOUT", "1800"))
    except ValueError:
        raise ValueError("SQLLM_DIST_TIMEOUT must be a number of seconds, got "
                         f"{os.environ['SQLLM_DIST_TIMEOUT']!r}") from None
    if s <= 0:
        raise ValueError(f"SQLLM_DIST_TIMEOUT must be > 0, got {s}")
    return datetime.timedelta(seconds=s)


def is_main() -> bool:
    """True outside a distributed run and on rank 0 of one."""
    return not is_initialized() or _dist().get_rank() == 0


_CONTEXT: Optional["DistContext"] = None


def current() -> Optional["DistContext"]:
    """The context of the initialized process group, or None (not initialized, or one process)."""
    global _CONTEXT
    if not is_initialized():
        return None
    dist = _dist()
    if dist.get_world_size() <= 1:
        return None
    world = dist.group.WORLD
    if _CONTEXT is None or _CONTEXT.world_group is not world:
        _CONTEXT = DistContext()
    return _CONTEXT


def shard_batches(batches: torch.Tensor, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """The calibration rows of ``rank``: a contiguous run of whole batches of ``batch_size``."""
    n = batches.shape[0]
    nb = (n + batch_size - 1) // batch_size
    if nb < world:
        raise ValueError(f"{nb} calibration batch(es) cannot be shared by {world} processes: "
                         f"use at least {world} calibration samples (nsamples) or fewer processes")
    lo = rank * nb // world
    hi = (rank + 1) * nb // world
    return batches[lo * batch_size:min(hi * batch_size, n)]


def assign_owners(shapes: Dict[str, Tuple[int, int]], groups: List[List[str]], world: int,
                  hessian: bool) -> Dict[str, int]:
    """Layer -> rank: in each group (a decoder block), longest job first to the least loaded rank."""
    owner: Dict[str, int] = {}
    for names in groups:
        load = [0.0] * world

        def cost(n: str) -> float:
            o, i = shapes[n]
            return float(o) * i * i + i ** 3 / 3.0 if hessian else float(o) * i

        for n in sorted(names, key=lambda n: (-cost(n), n)):
            r = min(range(world), key=lambda r: (load[r], r))
            owner[n] = r
            load[r] += cost(n)
    return owner


class DistContext:
    """sqllm's view of the initialized process group: its gloo group, heartbeat, counters."""

    def __init__(self) -> None:
        dist = _dist()
        self.world_group = dist.group.WORLD
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.timeout = _timeout()
        # sqllm's own CPU group: objects and CPU tensors, with sqllm's timeout.
        self.group = dist.new_group(backend="gloo", timeout=self.timeout)
        self.resume_hint = ""
        self.comm_bytes: Dict[str, int] = {}
        self._store = None
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            self._store = dist.PrefixStore("sqllm/", _get_default_store())
        except Exception as e:  # noqa: BLE001 - any store problem only weakens the diagnosis
            log.debug("no rendezvous store for the heartbeat: %s", e)
        self._beat = 0
        self._stop = threading.Event()
        if self._store is not None:
            self._store.set(f"hb/{self.rank}", "0")
            t = threading.Thread(target=self._heartbeat, name="sqllm-heartbeat", daemon=True)
            t.start()

    # -- heartbeat and failure diagnosis -------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat += 1
            try:
                self._store.set(f"hb/{self.rank}", str(self._beat))
            except Exception:  # noqa: BLE001 - the store host is gone; the main thread reports
                return

    def close(self) -> None:
        self._stop.set()

    def report_failure(self, exc: BaseException) -> None:
        """Tell the other ranks (through the store) why this rank stops."""
        if self._store is None or isinstance(exc, DistributedError):
            return
        try:
            self._store.set(f"failed/{self.rank}", f"{type(exc).__name__}: {exc}"[:2000])
        except Exception:  # noqa: BLE001
            pass

    def _diagnose(self) -> str:
        if self._store is None:
            return "another rank failed or vanished (no rendezvous store to tell which)"
        try:
            reported = []
            for r in range(self.world):
                if r != self.rank and self._store.check([f"failed/{r}"]):
                    reported.append(f"rank {r} failed: {self._store.get(f'failed/{r}').decode()}")
            if reported:
                return "; ".join(reported)
            before = [self._read_beat(r) for r in range(self.world)]
            wait = 4 * HEARTBEAT_S
            time.sleep(wait)
            after = [self._read_beat(r) for r in range(self.world)]
            dead = [r for r in range(self.world) if r != self.rank and after[r] == before[r]]
            if dead:
                return (f"rank{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} "
                        f"stopped (no heartbeat for {wait:.1f} s)")
            return "the collective failed while every rank's heartbeat is alive (network problem?)"
        except Exception as e:  # noqa: BLE001
            return (f"the rendezvous store is unreachable ({type(e).__name__}), so the rank "
                    "hosting it (rank 0 or the torchrun agent) is gone")

    def _read_beat(self, r: int) -> Optional[str]:
        key = f"hb/{r}"
        return self._store.get(key).decode() if self._store.check([key]) else None

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a collective; on failure raise :class:`DistributedError` naming the culprit."""
        try:
            return fn()
        except DistributedError:
            raise
        except Exception as e:  # gloo/NCCL errors: RuntimeError, DistBackendError, ...
            why = self._diagnose()
            hint = f" {self.resume_hint}" if self.resume_hint else ""
            raise DistributedError(f"rank {self.rank}: {what} failed: {why}.{hint} "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                                   ) from e

    # -- collectives ------------------------------------------------------------------------
    def _count(self, kind: str, nbytes: int) -> None:
        self.comm_bytes[kind] = self.comm_bytes.get(kind, 0) + int(nbytes)

    def barrier(self, what: str) -> None:
        self.call(what, lambda: _dist().barrier(group=self.group))

    def all_gather_object(self, obj: Any, what: str, kind: str = "objects") -> List[Any]:
        out: List[Any] = [None] * self.world
        self._count(kind, len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))
        self.call(what, lambda: _dist().all_gather_object(out, obj, group=self.group))
        return out

    def broadcast_object(self, obj: Any, src: int, what: str, kind: str = "objects") -> Any:
        box = [obj if self.rank == src else None]
        if self.rank == src:
            self._count(kind, len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)) * (self.world - 1))
        self.call(what, lambda: _dist().broadcast_object_list(box, src=src, group=self.group))
        return box[0]

    def _tree_reduce(self, t: torch.Tensor, dst: int, combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     what: str, kind: str) -> Optional[torch.Tensor]:
        """Binary-tree reduction of ``t`` onto ``dst`` with point-to-point messages.

        ⌈log2 P⌉ rounds; in each, half of the remaining ranks send their partial to a
        partner, which merges it with ``combine``: every rank sends at most once and
        holds at most two partials (a gather would put P of them on ``dst``).
        Returns the merged tensor on ``dst``, None elsewhere.
        """
        dist = _dist()
        group = None if t.is_cuda else self.group
        world, rel = self.world, (self.rank - dst) % self.world
        cur = t.contiguous()
        step = 1
        while step < world:
            if rel % (2 * step) == step:  # send to the partner and leave
                peer = (rel - step + dst) % world
                self._count(kind, cur.numel() * cur.element_size())
                self.call(f"{what} (sending to rank {peer})",
                          lambda: dist.send(cur, dst=peer, group=group))
                return None
            if rel % (2 * step) == 0 and rel + step < world:
                peer = (rel + step + dst) % world
                buf = torch.empty_like(cur)
                self.call(f"{what} (receiving from rank {peer})",
                          lambda: dist.recv(buf, src=peer, group=group))
                cur = combine(cur, buf)
            step *= 2
        return cur

    def reduce_rows(self, partial: Dict[str, Any], ranges: List[Tuple[int, int]], what: str,
                    kind: str = "statistics") -> Dict[str, Any]:
        """Merge a partial whose sums are shaped like the weight (the Fisher diagonal) in
        row ranges, range ``r`` onto rank ``r``; returns this rank's rows."""
        mine = None
        for r, (lo, hi) in enumerate(ranges):
            part = {}
            for k, v in partial.items():
                if v[0] != "sum":
                    raise ValueError(f"only sums can be reduced by rows, not {v[0]!r} ({k})")
                part[k] = ("sum", v[1][lo:hi], v[2][lo:hi])
            m = self.reduce_partial(part, r, f"{what} (rows {lo}:{hi})", kind)
            if m is not None:
                mine = m
        return mine

    def reduce_partial(self, partial: Dict[str, Any], dst: int, what: str,
                       kind: str = "statistics") -> Optional[Dict[str, Any]]:
        """Merge one layer's partial statistics (see ``Collector.partial_state``) on ``dst``."""
        from .calib.compensated import two_sum

        def merge_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            hi, e = two_sum(a[0], b[0])
            lo = a[1] + b[1]
            lo += e
            return torch.stack([hi, lo])

        merged: Dict[str, Any] = {}
        for key in sorted(partial):
            v = partial[key]
            if v[0] == "sum":
                r = self._tree_reduce(torch.stack([v[1], v[2]]), dst, merge_sum,
                                      f"{what} ({key})", kind)
                if r is not None:
                    merged[key] = ("sum", r[0], r[1])
            elif v[0] == "max":
                r = self._tree_reduce(v[1], dst, torch.maximum, f"{what} ({key})", kind)
                if r is not None:
                    merged[key] = ("max", r)
            elif v[0] == "count":
                r = self._tree_reduce(torch.tensor([int(v[1])], dtype=torch.int64), dst,
                                      torch.add, f"{what} ({key})", kind)
                if r is not None:
                    merged[key] = ("count", int(r[0]))
            else:
                raise ValueError(f"unknown partial statistic kind {v[0]!r} for {key!r}")
        return merged if self.rank == dst else None

    def all_sum_float(self, values: List[float], what: str) -> List[float]:
        """Concatenate per-rank lists of floats in rank order (on every rank)."""
        parts = self.all_gather_object(list(values), what, kind="evaluation")
        return [x for p in parts for x in p]


# -- work-parallel quantization ----------------------------------------------------------

def row_split_layers(qm: Any, layers: Dict[str, nn.Linear], world: int) -> Dict[str, List[Tuple[int, int]]]:
    """Layers whose output rows are quantized independently, split into one row range per
    rank: RTN (per-row grids) and SqueezeLLM with row tables and no sparse part or GPTQ
    (one k-means per row, weighted by the row's Fisher).  Other methods: none."""
    from .methods import RTN, SqueezeLLM

    if type(qm) is RTN:
        ok = True
    elif type(qm) is SqueezeLLM:
        ok = qm.group_axis == "row" and not qm.sparsity and not qm.gptq
    else:
        ok = False
    if not ok or world < 2:
        return {}
    out = {}
    for n, lin in layers.items():
        rows = int(lin.out_features)
        if rows >= world:
            out[n] = [(r * rows // world, (r + 1) * rows // world) for r in range(world)]
    return out


def _row_slice(lin: nn.Linear, lo: int, hi: int) -> nn.Linear:
    sub = nn.Linear(lin.in_features, hi - lo, bias=lin.bias is not None, device="meta")
    sub.weight = nn.Parameter(lin.weight.detach()[lo:hi], requires_grad=False)
    if lin.bias is not None:
        sub.bias = nn.Parameter(lin.bias.detach()[lo:hi], requires_grad=False)
    return sub


def _merge_rows(name: str, parts: List[nn.Module], ranges: List[Tuple[int, int]]) -> nn.Module:
    """One layer from the layers of its row ranges: row-indexed buffers concatenated."""
    from .config import LayerFormat

    total = ranges[-1][1]
    cfgs = [dict(p.layer_config()) for p in parts]
    for c, (lo, hi) in zip(cfgs, ranges):
        if int(c.pop("out_features")) != hi - lo:
            raise RuntimeError(f"{name}: a row range came back with the wrong number of rows")
    if any(c != cfgs[0] for c in cfgs[1:]):
        raise RuntimeError(f"{name}: the row ranges were quantized into different formats")
    merged = LayerFormat.from_layer_config({**cfgs[0], "out_features": total}).build()
    full = merged.state_dict()
    states = [p.state_dict() for p in parts]
    sd = {}
    for key, ref in full.items():
        ts = [st[key] for st in states]
        if key == "sparse_row_ptr":  # no sparse part (checked by row_split_layers)
            if any(int(t.abs().sum()) for t in ts):
                raise RuntimeError(f"{name}: row ranges with a sparse part cannot be merged")
            sd[key] = torch.zeros_like(ref)
        elif ref.dim() >= 1 and ref.shape[0] == total and all(
                t.shape[0] == hi - lo for t, (lo, hi) in zip(ts, ranges)):
            sd[key] = torch.cat(ts, 0)
        elif all(t.shape == ts[0].shape and torch.equal(t, ts[0]) for t in ts):
            sd[key] = ts[0]
        else:
            raise RuntimeError(f"{name}: buffer {key} differs between row ranges")
    merged.load_state_dict(sd)
    return merged


def quantize_layers(ctx: DistContext, qm: Any, layers: Dict[str, nn.Linear],
                    stats: Dict[str, Any], owner: Dict[str, int],
                    split: Optional[Dict[str, List[Tuple[int, int]]]] = None) -> Dict[str, nn.Module]:
    """Each rank quantizes the layers it owns, and its row range of the layers in
    ``split``; every rank gets them all (CPU modules).

    An error on one rank is raised on every rank (same type when it is a
    ValueError/TypeError, naming the rank), so all ranks stop together.
    """
    split = split or {}
    mine: Dict[str, Any] = {}
    error: Optional[Tuple[str, str]] = None
    for name, lin in layers.items():
        if name not in split and owner[name] != ctx.rank:
            continue
        try:
            if name in split:
                lo, hi = split[name][ctx.rank]
                mine[name] = qm.quantize_layer(name, _row_slice(lin, lo, hi), stats).cpu()
            else:
                mine[name] = qm.quantize_layer(name, lin, stats).cpu()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = (type(e).__name__, str(e))
            ctx.report_failure(e)
            break
    names = sorted(layers)
    what = (f"sharing the quantized layer {names[0]}" if len(names) == 1 else
            f"sharing {len(names)} quantized layers ({names[0]}, ...)")
    gathered = ctx.all_gather_object({"error": error, "layers": mine}, what, kind="layers")
    for r, g in enumerate(gathered):
        if g["error"] is not None:
            etype, msg = g["error"]
            cls = {"ValueError": ValueError, "TypeError": TypeError}.get(etype, RuntimeError)
            raise cls(f"{msg} (on rank {r})" if etype in ("ValueError", "TypeError")
                      else f"rank {r} failed: {etype}: {msg}")
    out: Dict[str, nn.Module] = {}
    for g in gathered:
        out.update({n: q for n, q in g["layers"].items() if n not in split})
    for n in layers:
        if n in split:
            out[n] = _merge_rows(n, [g["layers"][n] for g in gathered], split[n])
    missing = [n for n in layers if n not in out]
    if missing:
        raise RuntimeError(f"no rank quantized {missing[:3]}")
    return {n: out[n] for n in layers}


# -- progress checkpoints ----------------------------------------------------------------

def progress_dir_for(out: Any) -> Path:
    """Where the progress of a run writing ``out`` is kept: ``<out>.progress`` beside it."""
    p = Path(out)
    return p.parent / (p.name + ".progress")


class ProgressCheckpoint:
    """Per-block progress of a streamed quantization, for resuming the same command.

    ``progress.json`` records the run's identity (model, calibration data, method
    and options) and the finished blocks with their layer configs;
    ``block-NNNNN.safetensors`` the tensors of each finished block.  Rank 0 reads
    and writes; other ranks get what they need by broadcast.
    """

    def __init__(self, path: Any, identity: Dict[str, Any], ctx: Optional[DistContext]) -> None:
        self.path = Path(path)
        self.ctx = ctx
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=repr))
        self.rank = ctx.rank if ctx is not None else 0
        state = None
        if self.rank == 0:
            state = self._open()
        if ctx is not None:
            state = ctx.broadcast_object(state, 0, "reading the progress checkpoint", kind="progress")
        self.done: int = state["done"]
        self.layers: Dict[str, Dict[str, Any]] = state["layers"]
        if self.done:
            log.warning("resuming from %s: %d block(s) already quantized", self.path, self.done)

    def _open(self) -> Dict[str, Any]:
        f = self.path / "progress.json"
        if f.is_file():
            try:
                old = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{f} is corrupt ({e}); delete {self.path} to start over") from None
            if old.get("identity") != self.identity:
                diff = sorted(k for k in set(old.get("identity", {})) | set(self.identity)
                              if old.get("identity", {}).get(k) != self.identity.get(k))
                raise ValueError(f"{self.path} holds the progress of another run (different "
                                 f"{', '.join(diff) or 'identity'}); delete it or write elsewhere")
            done = int(old.get("done", 0))
            for i in range(done):
                if not self._block_file(i).is_file():
                    raise ValueError(f"{self._block_file(i)} is missing; delete {self.path} "
                                     "to start over")
            return {"done": done, "layers": dict(old.get("layers", {}))}
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self._write(0, {})
        return {"done": 0, "layers": {}}

    def _block_file(self, i: int) -> Path:
        return self.path / f"block-{i:05d}.safetensors"

    def _write(self, done: int, layers: Dict[str, Any]) -> None:
        f = self.path / "progress.json"
        tmp = f.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"identity": self.identity, "done": done, "layers": layers},
                                  indent=1, sort_keys=True))
        os.replace(tmp, f)

    def block_done(self, i: int, tensors: Dict[str, torch.Tensor],
                   layer_cfgs: Dict[str, Dict[str, Any]]) -> None:
        """Record block ``i`` as finished (rank 0; blocks finish in order)."""
        if self.rank != 0:
            return
        from safetensors.torch import save_file

        f = self._block_file(i)
        tmp = f.with_name(f.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, f)
        self.layers.update(json.loads(json.dumps(layer_cfgs, default=repr)))
        self.done = i + 1
        self._write(self.done, self.layers)

    def load_block(self, i: int) -> Dict[str, torch.Tensor]:
        """The saved tensors of block ``i`` (read by rank 0, broadcast to the others)."""
        tensors = None
        if self.rank == 0:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(self._block_file(i)))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{self._block_file(i)} is unreadable ({e}); delete "
                                 f"{self.path} to start over") from None
        if self.ctx is not None:
            tensors = self.ctx.broadcast_object(tensors, 0, f"sending finished block {i}",
                                                kind="progress")
        return tensors

    def remove(self) -> None:
        if self.rank == 0:
            shutil.rmtree(self.path, ignore_errors=True)


def restore_block(progress: ProgressCheckpoint, i: int, model: nn.Module, block: nn.Module,
                  prefix: str, layers: Dict[str, nn.Linear], layer_cfgs: Dict[str, Any],
                  device: torch.device) -> None:
    """Put finished block ``i`` back from the progress checkpoint (quantized layers built
    from their configs, then every tensor of the block loaded)."""
    from .api import set_module
    from .config import LayerFormat

    tensors = progress.load_block(i)
    for name in layers:
        cfg = progress.layers.get(name)
        if cfg is None:
            raise ValueError(f"{progress.path} lacks the config of layer {name!r}; delete it "
                             "to start over")
        set_module(model, name, LayerFormat.from_layer_config(cfg).build())
        layer_cfgs[name] = cfg
    local = {k[len(prefix) + 1:]: v for k, v in tensors.items()}
    block.load_state_dict(local, strict=True, assign=True)
    block.to(device)


def run_identity(model: nn.Module, qm: Any, all_layers: Dict[str, Any], batches: Any,
                 **options: Any) -> Dict[str, Any]:
    from .calib.stats_dir import calibration_identity, model_identity

    return {"model": model_identity(model, all_layers), "calibration": calibration_identity(batches),
            "method": qm.config(), "options": options}
