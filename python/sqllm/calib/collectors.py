"""Statistics collectors: one protocol for Hessian, activation statistics and Fisher.

A collector gathers one kind of statistic for a set of ``nn.Linear`` layers.
Block-scoped collectors (``scope = "block"``) attach forward hooks to the
Linears of one decoder block and accumulate over every forward call until
:meth:`Collector.detach`; the model-scoped Fisher collector (``scope =
"model"``) needs gradients of the whole model and runs as a pre-pass.

Every collector reduces its result to a dict of tensors per layer
(:meth:`Collector.layer_state`), which is what a stats directory stores, and
turns such dicts back into the entries methods read
(:meth:`Collector.publish`): ``stats[name][layer]`` and, where a count goes
with it, ``stats[name + "_count"][layer]``.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Dict, List, Optional, Type

import torch
from torch import nn

from .compensated import CompensatedSum, SymmetricCompensatedSum

__all__ = ["Collector", "HessianCollector", "ActStatsCollector", "FisherCollector",
           "COLLECTORS", "get_collector"]

log = logging.getLogger(__name__)

COLLECTORS: Dict[str, Type["Collector"]] = {}


def _register(cls: Type["Collector"]) -> Type["Collector"]:
    COLLECTORS[cls.name] = cls
    return cls


def get_collector(name: str) -> Type["Collector"]:
    if name not in COLLECTORS:
        raise ValueError(f"unknown statistics collector {name!r}; available: {sorted(COLLECTORS)}")
    return COLLECTORS[name]


def _rows(x: torch.Tensor, in_features: int, layer: str) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"layer {layer!r}: input's last dimension is {x.shape[-1]}, "
                         f"expected in_features={in_features}")
    return x.detach().reshape(-1, in_features)


class Collector:
    """Base class.  Subclasses set ``name``/``scope`` and implement the hooks' update.

    Use::

        c = HessianCollector()
        c.attach(layers)          # name -> nn.Linear
        ...run forwards...
        c.detach()
        states = {n: c.layer_state(n) for n in layers}   # tensors, for a stats dir
        stats.update(c.publish(states))                  # entries methods read
    """

    name: ClassVar[str] = ""
    scope: ClassVar[str] = "block"

    def __init__(self) -> None:
        self._hooks: List[torch.utils.hooks.RemovableHandle] = []
        self.layers: Dict[str, nn.Linear] = {}

    def attach(self, layers: Dict[str, nn.Linear]) -> None:
        """Start accumulating on ``layers`` (forward hooks on each Linear)."""
        if self._hooks:
            raise RuntimeError(f"{self.name} collector is already attached")
        self.layers = dict(layers)
        for lname, lin in self.layers.items():
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"layer {lname!r} is a {type(lin).__name__}, not an nn.Linear")
            self._init_layer(lname, lin)

            def hook(mod: nn.Module, inputs: Any, output: Any, lname: str = lname) -> None:
                self._update(lname, mod, inputs[0])

            self._hooks.append(lin.register_forward_hook(hook))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _init_layer(self, name: str, linear: nn.Linear) -> None:
        raise NotImplementedError

    def _update(self, name: str, linear: nn.Linear, x: torch.Tensor) -> None:
        raise NotImplementedError

    def layer_state(self, name: str) -> Dict[str, torch.Tensor]:
        """The statistic of one layer as CPU tensors (what a stats dir stores)."""
        return self.finish_partial(self.partial_state(name))

    def partial_state(self, name: str) -> Dict[str, Any]:
        """The unreduced statistic of one layer, for merging partials of several processes
        (:mod:`sqllm.distributed`): key -> ``("sum", hi, lo)`` (a compensated float64 sum),
        ``("max", tensor)`` or ``("count", int)``."""
        raise NotImplementedError

    def finish_partial(self, partial: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """A (merged) :meth:`partial_state` -> the :meth:`layer_state` dict."""
        out: Dict[str, torch.Tensor] = {}
        for k, v in partial.items():
            if v[0] == "sum":
                out[k] = CompensatedSum.finish(v[1], v[2]).cpu()
            elif v[0] == "max":
                out[k] = v[1].cpu()
            else:
                out[k] = torch.tensor(int(v[1]), dtype=torch.int64)
        return out

    def publish(self, states: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, Any]]:
        """Per-layer states -> the ``stats`` entries a method reads."""
        raise NotImplementedError


@_register
class HessianCollector(Collector):
    """H = XᵀX of each Linear's input, X the (tokens, in_features) rows of every call.

    Products and sums are float64, the sum over calibration batches compensated
    (:mod:`.compensated`: the rounded result does not depend on the order of the
    batches, so data-parallel runs reproduce it bit for bit).  Only the upper
    triangle is accumulated, in row blocks, and XᵀX is added block by block
    (:class:`~.compensated.SymmetricCompensatedSum`): while collecting, a layer
    costs about in² float64 (the pair), not the three to six full matrices of a
    dense product and a dense pair; the result is exactly symmetric.
    ``stats["hessian"][layer]`` is the float64 (in, in) sum, not divided by the
    count; ``stats["hessian_count"][layer]`` is the number of rows (an int);
    ``stats["hessian_owned"][layer]`` marks the matrix as this run's own, which a
    method may overwrite once it has used it (:func:`sqllm.gptq.take_hessian`).
    """

    name = "hessian"

    def __init__(self) -> None:
        super().__init__()
        self._h: Dict[str, SymmetricCompensatedSum] = {}
        self._n: Dict[str, int] = {}
        # Linears fed the same tensor (q/k/v, gate/up) share one product per call;
        # it is kept only when another attached layer has the same width.
        self._last_x: Optional[torch.Tensor] = None
        self._last_version = -1
        self._last_blocks: Optional[List[torch.Tensor]] = None
        self._width_count: Dict[int, int] = {}

    def _init_layer(self, name: str, linear: nn.Linear) -> None:
        dev = linear.weight.device
        self._h[name] = SymmetricCompensatedSum(
            linear.in_features, device=dev if dev.type != "meta" else torch.device("cpu"))
        self._n[name] = 0
        self._width_count[linear.in_features] = self._width_count.get(linear.in_features, 0) + 1

    def _update(self, name: str, linear: nn.Linear, x: torch.Tensor) -> None:
        acc = self._h[name]
        if x is self._last_x and x._version == self._last_version and self._last_blocks is not None:
            acc.add_blocks(self._last_blocks)
        else:
            rows = _rows(x, linear.in_features, name).to(acc.hi[0].device, torch.float64)
            if self._width_count.get(linear.in_features, 0) > 1:
                blocks = list(acc.gram_blocks(rows))
                acc.add_blocks(blocks)
                self._last_x, self._last_version, self._last_blocks = x, x._version, blocks
            else:
                acc.add_gram(rows)
                self._last_x = self._last_blocks = None
        self._n[name] += x.numel() // linear.in_features

    def detach(self) -> None:
        super().detach()
        self._last_x = self._last_blocks = None

    def partial_state(self, name: str) -> Dict[str, Any]:
        return {"hessian": ("sum",) + self._h[name].pair(), "count": ("count", self._n[name])}

    def finish_partial(self, partial: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        v = partial["hessian"]
        return {"hessian": SymmetricCompensatedSum.finish_packed(v[1], v[2]).cpu(),
                "count": torch.tensor(int(partial["count"][1]), dtype=torch.int64)}

    def layer_state(self, name: str) -> Dict[str, torch.Tensor]:
        """The layer's Hessian; its sums are freed while the full matrix is filled (call once)."""
        acc = self._h.pop(name)
        return {"hessian": acc.take().cpu(),
                "count": torch.tensor(int(self._n[name]), dtype=torch.int64)}

    def drop(self, name: str) -> None:
        self._h.pop(name, None)

    def publish(self, states: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, Any]]:
        return {"hessian": {n: s["hessian"] for n, s in states.items()},
                "hessian_count": {n: int(s["count"]) for n, s in states.items()},
                "hessian_owned": {n: True for n in states}}


@_register
class ActStatsCollector(Collector):
    """Per input channel of each Linear: max |x|, mean |x| and mean x over all rows.

    ``stats["act_stats"][layer]`` is a dict with ``max_abs`` (float32),
    ``mean_abs`` and ``mean`` (float64, sums divided by the count) and
    ``count`` (int, the number of rows); ``stats["act_stats_count"][layer]`` is
    the count again.
    """

    name = "act_stats"

    def __init__(self) -> None:
        super().__init__()
        self._max: Dict[str, torch.Tensor] = {}
        self._sum_abs: Dict[str, CompensatedSum] = {}
        self._sum: Dict[str, CompensatedSum] = {}
        self._n: Dict[str, int] = {}

    def _init_layer(self, name: str, linear: nn.Linear) -> None:
        dev = linear.weight.device
        dev = dev if dev.type != "meta" else torch.device("cpu")
        k = linear.in_features
        self._max[name] = torch.zeros(k, dtype=torch.float32, device=dev)
        self._sum_abs[name] = CompensatedSum((k,), device=dev)
        self._sum[name] = CompensatedSum((k,), device=dev)
        self._n[name] = 0

    def _update(self, name: str, linear: nn.Linear, x: torch.Tensor) -> None:
        rows = _rows(x, linear.in_features, name).to(self._sum[name].hi.device, torch.float64)
        if rows.shape[0] == 0:
            return
        a = rows.abs()
        torch.maximum(self._max[name], a.amax(dim=0).float(), out=self._max[name])
        self._sum_abs[name].add(a.sum(dim=0))
        self._sum[name].add(rows.sum(dim=0))
        self._n[name] += rows.shape[0]

    def partial_state(self, name: str) -> Dict[str, Any]:
        return {"max_abs": ("max", self._max[name]), "sum_abs": ("sum",) + self._sum_abs[name].pair(),
                "sum": ("sum",) + self._sum[name].pair(), "count": ("count", self._n[name])}

    def publish(self, states: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Any] = {}
        for n, s in states.items():
            cnt = int(s["count"])
            d = max(cnt, 1)
            out[n] = {"max_abs": s["max_abs"], "mean_abs": s["sum_abs"] / d,
                      "mean": s["sum"] / d, "count": cnt}
        return {"act_stats": out, "act_stats_count": {n: v["count"] for n, v in out.items()}}


@_register
class FisherCollector(Collector):
    """The Fisher diagonal (squared LM-loss gradients), :func:`sqllm.fisher_diagonal`.

    Model-scoped: it needs a backward pass through the whole model, so the
    streamer runs it once before the blocks (on the full model in memory)
    through :meth:`collect_model`.  ``stats["fisher"][layer]`` is float32 shaped
    like the weight.
    """

    name = "fisher"
    scope = "model"

    def __init__(self) -> None:
        super().__init__()
        self._f: Dict[str, torch.Tensor] = {}

    def attach(self, layers: Dict[str, nn.Linear]) -> None:
        raise RuntimeError("the Fisher collector needs gradients of the whole model; "
                           "use collect_model()")

    def collect_model(self, model: nn.Module, layers: Dict[str, nn.Linear],
                      batches: torch.Tensor, progress: bool = True) -> None:
        from ..calibration import fisher_partials

        self.layers = dict(layers)
        self._f = fisher_partials(model, batches, self.layers, progress=progress)

    def partial_state(self, name: str) -> Dict[str, Any]:
        return {"fisher": ("sum",) + self._f[name].pair()}

    def finish_partial(self, partial: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        _, hi, lo = partial["fisher"]
        return {"fisher": CompensatedSum.finish(hi, lo).float().cpu()}

    def drop(self, name: str) -> None:
        """Free the partial sums of one layer (after they were reduced)."""
        self._f.pop(name, None)

    def publish(self, states: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, Any]]:
        return {"fisher": {n: s["fisher"] for n, s in states.items()}}
