"""One process of the distributed tests (tests/python/test_distributed.py).

Run as ``python dist_worker.py JOBS.json``; with ``WORLD_SIZE > 1`` in the
environment (and RANK, MASTER_ADDR, MASTER_PORT) it joins a gloo group first,
otherwise it is the single-process reference.  Every job quantizes the tiny
model folder ``model`` on the meta device into ``out`` with the calibration
token ids of ``calib`` (a .pt file); the ``probe`` method records the
statistics it is handed to ``stats_out``.  ``SQLLM_TEST_DIE`` = "RANK:LAYER"
makes that rank kill itself (SIGKILL) when it starts quantizing LAYER, or raise a
ValueError there with ``SQLLM_TEST_DIE_HOW=raise``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from typing import Dict

import torch

torch.set_num_threads(1)

import sqllm  # noqa: E402
from sqllm.distributed import current, init_from_env  # noqa: E402
from sqllm.methods import METHODS, RTN  # noqa: E402


@dataclasses.dataclass
class Probe(RTN):
    """RTN that records every statistic it is handed (Fisher, Hessian, activation stats)."""

    name = "probe"
    needs_calibration = True
    stats = ("fisher", "hessian", "act_stats")

    def quantize_layer(self, name, linear, stats):
        SEEN[name] = {"fisher": stats["fisher"][name].clone(),
                           "hessian": stats["hessian"][name].clone(),
                           "hessian_count": torch.tensor(stats["hessian_count"][name]),
                           **{f"act_{k}": (v.clone() if isinstance(v, torch.Tensor)
                                           else torch.tensor(v))
                              for k, v in stats["act_stats"][name].items()}}
        return super().quantize_layer(name, linear, stats)



SEEN: Dict[str, Dict[str, torch.Tensor]] = {}


def _install_killer() -> None:
    spec = os.environ.get("SQLLM_TEST_DIE")
    if not spec:
        return
    rank_s, layer = spec.split(":", 1)
    if int(os.environ.get("RANK", "0")) != int(rank_s):
        return
    how = os.environ.get("SQLLM_TEST_DIE_HOW", "kill")
    for cls in list(METHODS.values()):
        orig = cls.quantize_layer

        def wrapped(self, name, linear, stats, orig=orig):
            if name == layer:
                if how == "raise":
                    raise ValueError(f"layer {name!r}: simulated bad weights")
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, name, linear, stats)

        cls.quantize_layer = wrapped


def main() -> int:
    jobs = json.loads(open(sys.argv[1]).read())
    init_from_env()
    sqllm.register_method(Probe)
    _install_killer()
    ctx = current()
    rank = ctx.rank if ctx is not None else 0
    for job in jobs:
        if job.get("kind") == "eval":  # perplexity, windows sharded over the ranks
            from transformers import AutoModelForCausalLM

            from sqllm.evaluate import perplexity

            m = AutoModelForCausalLM.from_pretrained(job["model"])
            ids = torch.randint(0, 256, (1, 16 * 33 + 5), generator=torch.Generator().manual_seed(7))
            r = perplexity(m, ids, seqlen=16, batch_size=2, progress=False)
            json.dump([r.nll, r.n_windows], open(f"{job['out']}.rank{rank}.json", "w"))
            continue
        model = sqllm.open_on_meta(job["model"])
        calib = torch.load(job["calib"])
        opts = dict(job.get("options", {}))
        method = job["method"]
        SEEN.clear()
        sqllm.quantize(model, method=method, bits=job.get("bits", 4), calibration=calib,
                       out=job["out"], progress=False, method_options=opts,
                       sequential_groups=job.get("sequential_groups", False))
        if method == "probe":
            flat = {f"{n}|{k}": v for n, d in SEEN.items() for k, v in d.items()}
            torch.save(flat, f"{job['stats_out']}.rank{rank}.pt")
        if ctx is not None:
            json.dump(ctx.comm_bytes, open(f"{job['out']}.comm.rank{rank}.json", "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
