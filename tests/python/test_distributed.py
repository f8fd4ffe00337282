"""Scale-out with torch.distributed (sqllm.distributed): two gloo processes on localhost
against one process, on a tiny random LLaMA opened on the meta device.

The multi-process runs are subprocesses of tests/python/dist_worker.py (each with one
thread, as the single-process reference), started together on a free port and bounded by
timeouts.  One module fixture runs the reference and the two-rank run of every method
once; the tests compare what they wrote.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

import sqllm
from sqllm.calib.compensated import CompensatedSum, merge_pairs, two_sum
from sqllm.distributed import assign_owners, shard_batches

from conftest import make_tiny_llama

WORKER = Path(__file__).with_name("dist_worker.py")
# The workers import the same sqllm as this process (the installed package in CI, a
# source tree with a built module when PYTHONPATH points at one).
PYPATH = os.pathsep.join([str(Path(sqllm.__file__).resolve().parents[1]),
                          os.environ.get("PYTHONPATH", "")])
VPTQ_OPTS = {"vector_lens": [-1, 4], "num_centroids": [-1, 64], "kiter": 10}
METHOD_JOBS = {"squeezellm": {}, "gptq": {}, "vptq": VPTQ_OPTS, "rtn": {}}
LAUNCH_TIMEOUT = 240  # s; a run takes ~10-30 s on a shared 2-core box


# -- in-process units ---------------------------------------------------------------------

def test_two_sum_is_exact():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1000, generator=g, dtype=torch.float64) * 1e8
    b = torch.randn(1000, generator=g, dtype=torch.float64) * 1e-8
    s, e = two_sum(a, b)
    for i in range(0, 1000, 97):  # exact rational check of s + e == a + b
        from fractions import Fraction

        assert Fraction(s[i].item()) + Fraction(e[i].item()) == Fraction(a[i].item()) + \
            Fraction(b[i].item())


def test_compensated_sum_is_order_and_split_independent():
    """The rounded sum is math.fsum's correctly rounded one, in any order and any split."""
    rng = random.Random(5)
    g = torch.Generator().manual_seed(5)
    # terms of mixed signs and magnitudes (cancellation), 7 x 5 entries, 64 terms each
    terms = [torch.randn(7, 5, generator=g, dtype=torch.float64) *
             10.0 ** rng.randint(-6, 6) for _ in range(64)]
    want = torch.tensor([[math.fsum(float(t[i, j]) for t in terms) for j in range(5)]
                         for i in range(7)], dtype=torch.float64)
    for trial in range(6):
        order = list(range(64))
        rng.shuffle(order)
        cut = sorted(rng.sample(range(1, 64), trial % 4)) if trial else []
        parts, start = [], 0
        for c in cut + [64]:
            acc = CompensatedSum((7, 5))
            for k in order[start:c]:
                acc.add(terms[k])
            parts.append(acc.pair())
            start = c
        hi, lo = merge_pairs(parts)
        assert torch.equal(CompensatedSum.finish(hi, lo), want), trial
    # a plain float64 running sum does depend on the order here (why the pairs are needed)
    plain = [sum(terms[k] for k in rng.sample(range(64), 64)) for _ in range(4)]
    assert any(not torch.equal(p, want) for p in plain)


def test_shard_batches_covers_whole_batches_once():
    ids = torch.arange(23).reshape(23, 1)
    for world in (1, 2, 3, 5):
        for bs in (1, 2, 4):
            parts = [shard_batches(ids, bs, r, world) for r in range(world)]
            assert torch.equal(torch.cat(parts), ids)
            assert all(p.shape[0] % bs == 0 for p in parts[:-1])
            assert all(p.shape[0] > 0 for p in parts)
    with pytest.raises(ValueError, match="3 processes"):
        shard_batches(torch.zeros(2, 4, dtype=torch.long), 1, 0, 3)


def test_assign_owners_balances_each_block():
    shapes = {f"b{b}.{n}": s for b in range(3)
              for n, s in {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64),
                           "gate": (96, 64), "up": (96, 64), "down": (64, 96)}.items()}
    groups = [[n for n in shapes if n.startswith(f"b{b}.")] for b in range(3)]
    for hessian in (False, True):
        owner = assign_owners(shapes, groups, 2, hessian)
        assert set(owner) == set(shapes) and set(owner.values()) == {0, 1}
        for grp in groups:  # both ranks get work in every block
            assert {owner[n] for n in grp} == {0, 1}
        assert owner == assign_owners(shapes, groups, 2, hessian)  # deterministic


# -- multi-process runs -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(jobs: List[dict], world: int, tmp: Path, tag: str,
           env_extra: Optional[Dict[str, str]] = None) -> List[subprocess.Popen]:
    jf = tmp / f"{tag}.jobs.json"
    jf.write_text(json.dumps(jobs))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=PYPATH, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   SQLLM_DIST_TIMEOUT="60", **(env_extra or {}))
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        else:
            for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
                env.pop(k, None)
        with open(tmp / f"{tag}.rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(jf)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT, cwd=tmp))
    return procs


def _watch(procs: List[subprocess.Popen]) -> List[dict]:
    """Record when each process exits (time.monotonic()), in a thread per process."""
    import threading

    rec = [dict() for _ in procs]

    def run(p: subprocess.Popen, r: dict) -> None:
        p.wait()
        r["t"] = time.monotonic()

    for p, r in zip(procs, rec):
        threading.Thread(target=run, args=(p, r), daemon=True).start()
    return rec


def _wait(procs: List[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT) -> List[int]:
    end = time.monotonic() + timeout
    rcs = []
    for p in procs:
        try:
            rcs.append(p.wait(timeout=max(1.0, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a worker did not finish within {timeout} s (hang)")
    return rcs


def _log(tmp: Path, tag: str, rank: int) -> str:
    return (tmp / f"{tag}.rank{rank}.log").read_text()


def _jobs(root: Path, tag: str, model: Path, calib: Path) -> List[dict]:
    jobs = [dict(model=str(model), calib=str(calib), method="probe", out=str(root / f"{tag}-probe"),
                 stats_out=str(root / f"{tag}-stats"))]
    for m, opts in METHOD_JOBS.items():
        jobs.append(dict(model=str(model), calib=str(calib), method=m, options=opts,
                         out=str(root / f"{tag}-{m}")))
    # GPTQ's true-sequential groups inside each block
    jobs.append(dict(model=str(model), calib=str(calib), method="gptq", sequential_groups=True,
                     out=str(root / f"{tag}-gptq-groups")))
    jobs.append(dict(kind="eval", model=str(model), out=str(root / f"{tag}-ppl")))
    return jobs


KILL_LAYERS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64),
               "self_attn.v_proj": (32, 64), "self_attn.o_proj": (64, 64),
               "mlp.gate_proj": (96, 64), "mlp.up_proj": (96, 64), "mlp.down_proj": (64, 96)}


def _victim() -> str:
    """A layer of block 1 that rank 1 quantizes (longest-job-first over 2 ranks)."""
    shapes = {f"model.layers.1.{n}": s for n, s in KILL_LAYERS.items()}
    owner = assign_owners(shapes, [list(shapes)], 2, True)
    return next(n for n, r in sorted(owner.items()) if r == 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process reference and the two-rank run of every job (run concurrently)."""
    root = tmp_path_factory.mktemp("dist")
    model_dir = root / "tiny"
    make_tiny_llama(seed=2).save_pretrained(model_dir)
    calib = root / "calib.pt"
    torch.save(torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(4)), calib)
    ref = _start(_jobs(root, "ref", model_dir, calib), 1, root, "ref")
    two = _start(_jobs(root, "two", model_dir, calib), 2, root, "two")
    # the run whose rank 1 is killed in block 1 (checked by the fault test)
    kill_job = [dict(model=str(model_dir), calib=str(calib), method="gptq",
                     out=str(root / "kill-gptq"))]
    kill = _start(kill_job, 2, root, "kill", {"SQLLM_TEST_DIE": f"1:{_victim()}"})
    kill_exits = _watch(kill)
    # rank 1 raises a ValueError in a layer of block 1: both ranks raise it
    bad = _start([dict(kill_job[0], out=str(root / "bad-gptq"))], 2, root, "bad",
                 {"SQLLM_TEST_DIE": f"1:{_victim()}", "SQLLM_TEST_DIE_HOW": "raise"})
    rcs = _wait(ref + two)
    for (tag, rank), rc in zip([("ref", 0), ("two", 0), ("two", 1)], rcs):
        if rc != 0:  # reap the other runs before failing (no process outlives the fixture)
            for p in kill + bad:
                p.kill()
                p.wait()
        assert rc == 0, f"{tag} rank {rank} failed:\n{_log(root, tag, rank)[-3000:]}"
    kill_rcs = _wait(kill, timeout=120)
    bad_rcs = _wait(bad, timeout=120)
    time.sleep(0.2)  # let the watchers record the exits
    return dict(root=root, model_dir=model_dir, calib=calib, kill_job=kill_job,
                kill_rcs=kill_rcs, kill_exits=kill_exits, bad_rcs=bad_rcs)


def _tensors(folder: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: Dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"{folder} has no safetensors"
    for f in files:
        out.update(load_file(str(f)))
    return out


def _assert_same_model(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), f"{k} differs"
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def test_statistics_equal_one_process(runs):
    root = runs["root"]
    ref = torch.load(root / "ref-stats.rank0.pt")
    per_rank = [torch.load(root / f"two-stats.rank{r}.pt") for r in range(2)]
    assert per_rank[0] and per_rank[1], "each rank quantizes (and receives statistics of) layers"
    layers0 = {k.split("|")[0] for k in per_rank[0]}
    layers1 = {k.split("|")[0] for k in per_rank[1]}
    assert not layers0 & layers1, "a layer's statistics go to one rank only"
    two = {**per_rank[0], **per_rank[1]}
    assert sorted(two) == sorted(ref)
    kinds = {k.split("|")[1] for k in ref}
    assert {"fisher", "hessian", "hessian_count", "act_max_abs", "act_mean_abs", "act_mean",
            "act_count"} <= kinds
    for k in ref:
        assert ref[k].dtype == two[k].dtype, k
        # compensated sums: equal bit for bit (docs/scale-out.md states the bound)
        assert torch.equal(ref[k], two[k]), k
    # the counts are those of the whole calibration set (6 x 32 tokens), not of a shard
    for k in ref:
        if k.endswith("|hessian_count"):
            assert int(two[k]) == 6 * 32


def test_statistics_match_float64_reference(runs):
    """The collected Hessian of the first block's q_proj against XᵀX computed here in float64."""
    root, calib = runs["root"], runs["calib"]
    ref = torch.load(root / "ref-stats.rank0.pt")
    model = make_tiny_llama(seed=2)
    ids = torch.load(calib)
    xs = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, inp: xs.append(inp[0].detach().reshape(-1, inp[0].shape[-1]).double()))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row.unsqueeze(0))
    h.remove()
    x = torch.cat(xs)
    got = ref["model.layers.0.self_attn.q_proj|hessian"]
    # float64 sums of 192 products of float32 values: relative error ~192 * 2^-53
    assert torch.allclose(got, x.T @ x, rtol=1e-12, atol=1e-12)
    assert torch.equal(ref["model.layers.0.self_attn.q_proj|act_max_abs"],
                       x.abs().amax(0).float())


@pytest.mark.parametrize("method", ["squeezellm", "gptq", "vptq", "rtn", "gptq-groups", "probe"])
def test_saved_model_bit_identical(runs, method):
    root = runs["root"]
    _assert_same_model(root / f"ref-{method}", root / f"two-{method}")
    assert not (root / f"two-{method}.progress").exists(), "progress is removed when done"
    comm = [json.loads((root / f"two-{method}.comm.rank{r}.json").read_text()) for r in range(2)]
    assert comm[0]["layers"] > 0 and comm[1]["layers"] > 0, "both ranks quantized layers"


def test_killed_rank_stops_the_other_and_resume_is_identical(runs):
    root = runs["root"]
    rc0, rc1 = runs["kill_rcs"]
    waited = runs["kill_exits"][0]["t"] - runs["kill_exits"][1]["t"]
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0
    log0 = _log(root, "kill", 0)
    assert "DistributedError" in log0 and "rank 1 stopped" in log0, log0[-2000:]
    assert "kill-gptq.progress" in log0 and "resumes" in log0
    assert waited < 30, f"rank 0 took {waited:.1f} s to stop after rank 1 died"
    prog = json.loads((root / "kill-gptq.progress" / "progress.json").read_text())
    assert prog["done"] == 1  # block 0 finished, block 1 was in progress
    assert not (root / "kill-gptq").exists()

    # the same command resumes from block 1 and gives the single-process result
    procs = _start(runs["kill_job"], 2, root, "resume")
    assert _wait(procs) == [0, 0], _log(root, "resume", 0)[-3000:]
    comm = json.loads((root / "kill-gptq.comm.rank0.json").read_text())
    assert comm.get("progress", 0) > 0  # block 0 was sent from the checkpoint
    _assert_same_model(root / "ref-gptq", root / "kill-gptq")
    assert not (root / "kill-gptq.progress").exists()


def test_distributed_perplexity_equals_one_process(runs):
    """Windows sharded over two ranks; every rank gets the single-process perplexity exactly."""
    root = runs["root"]
    ref = json.loads((root / "ref-ppl.rank0.json").read_text())
    two = [json.loads((root / f"two-ppl.rank{r}.json").read_text()) for r in range(2)]
    assert ref[1] == 33
    assert two[0] == two[1] == ref


def test_progress_checkpoint_refuses_another_run(tmp_path):
    """A progress folder of another run (model, data or options) is not reused silently."""
    from sqllm.distributed import ProgressCheckpoint

    ident = {"model": {"class": "X"}, "method": {"method": "gptq", "bits": 4}}
    p = ProgressCheckpoint(tmp_path / "out.progress", ident, None)
    assert p.done == 0
    p.block_done(0, {"model.layers.0.w": torch.arange(6.0)}, {"model.layers.0.q": {"format": "lut"}})
    again = ProgressCheckpoint(tmp_path / "out.progress", ident, None)
    assert again.done == 1 and again.layers == {"model.layers.0.q": {"format": "lut"}}
    assert torch.equal(again.load_block(0)["model.layers.0.w"], torch.arange(6.0))
    with pytest.raises(ValueError, match="another run.*method"):
        ProgressCheckpoint(tmp_path / "out.progress",
                           {**ident, "method": {"method": "gptq", "bits": 3}}, None)
    (tmp_path / "out.progress" / "block-00000.safetensors").unlink()
    with pytest.raises(ValueError, match="block-00000.safetensors is missing"):
        ProgressCheckpoint(tmp_path / "out.progress", ident, None)
    (tmp_path / "out.progress" / "progress.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        ProgressCheckpoint(tmp_path / "out.progress", ident, None)


def test_single_process_needs_no_group(monkeypatch):
    """Without torchrun's variables nothing is initialized and nothing is distributed."""
    import sqllm.distributed as sd

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert sd.init_from_env() is False
    assert sd.current() is None and sd.is_main()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: nothing to share
    assert sd.init_from_env() is False and sd.current() is None


def test_python_m_sqllm_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "sqllm", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=PYPATH), timeout=120)
    assert r.returncode == 0 and "quantize" in r.stdout


@pytest.mark.parametrize("fp_inputs", [False, True])
def test_resume_from_progress_in_one_process(tmp_path, fp_inputs):
    """The streamer's restore path (what a distributed resume runs on every rank): a run that
    fails in block 1 and is resumed equals an uninterrupted run bit for bit."""
    from sqllm.calib import open_on_meta, stream_quantize
    from sqllm.distributed import ProgressCheckpoint
    from sqllm.methods import GPTQ

    folder = tmp_path / "tiny"
    make_tiny_llama(seed=5).save_pretrained(folder)
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(6))

    def run(fail_at=None, pdir=None):
        model = open_on_meta(folder)
        qm = GPTQ(bits=3)
        orig = qm.quantize_layer
        done = []

        def watched(name, lin, stats):
            if name == fail_at:
                raise RuntimeError("simulated failure")
            done.append(name)
            return orig(name, lin, stats)

        qm.quantize_layer = watched
        pc = ProgressCheckpoint(pdir, {"run": "x", "fp": fp_inputs}, None) if pdir else None
        stream_quantize(model, qm, ids, progress=False, fp_inputs=fp_inputs, dist=None,
                        progress_checkpoint=pc)
        return model, done

    want, _ = run()
    want = want.state_dict()
    pdir = tmp_path / "p"
    with pytest.raises(RuntimeError, match="simulated"):
        run("model.layers.1.mlp.up_proj", pdir)
    assert ProgressCheckpoint(pdir, {"run": "x", "fp": fp_inputs}, None).done == 1
    got, done = run(None, pdir)
    assert done and all(n.startswith("model.layers.1.") for n in done)  # block 0 restored
    got = got.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("method,opts", [("rtn", {"group_size": 32}), ("rtn", {"sym": True}),
                                         ("squeezellm", {"weighted": False}),
                                         ("squeezellm", {"weighted": False, "kmeans": "lloyd"})])
def test_row_ranges_merge_to_the_whole_layer(method, opts):
    """Per-row methods: quantizing row ranges and merging them gives the whole layer's bits."""
    from sqllm.distributed import _merge_rows, _row_slice, row_split_layers
    from sqllm.methods import METHODS

    g = torch.Generator().manual_seed(11)
    lin = torch.nn.Linear(64, 37, bias=True)  # odd row count: uneven ranges
    with torch.no_grad():
        lin.weight.copy_(torch.randn(37, 64, generator=g))
        lin.bias.copy_(torch.randn(37, generator=g))
    qm = METHODS[method](bits=3, **opts)
    for world in (2, 3, 5):
        ranges = row_split_layers(qm, {"l": lin}, world)["l"]
        assert ranges[0][0] == 0 and ranges[-1][1] == 37
        parts = [qm.quantize_layer("l", _row_slice(lin, lo, hi), {}) for lo, hi in ranges]
        merged = _merge_rows("l", parts, ranges).state_dict()
        whole = qm.quantize_layer("l", lin, {}).state_dict()
        assert sorted(merged) == sorted(whole)
        for k in whole:
            assert merged[k].dtype == whole[k].dtype and torch.equal(merged[k], whole[k]), (k, world)


def test_row_split_only_for_row_independent_methods():
    from sqllm.distributed import row_split_layers
    from sqllm.methods import GPTQ, RTN, SqueezeLLM

    lin = {"a": torch.nn.Linear(8, 6), "b": torch.nn.Linear(8, 1)}
    assert set(row_split_layers(RTN(bits=4), lin, 2)) == {"a"}  # 1 row: not split
    assert set(row_split_layers(SqueezeLLM(bits=3), lin, 2)) == {"a"}
    assert row_split_layers(SqueezeLLM(bits=3, sparsity=0.01), lin, 2) == {}
    assert row_split_layers(SqueezeLLM(bits=3, group_axis="column"), lin, 2) == {}
    assert row_split_layers(SqueezeLLM(bits=3, gptq=True), lin, 2) == {}
    assert row_split_layers(GPTQ(bits=4), lin, 2) == {}
    assert row_split_layers(RTN(bits=4), lin, 1) == {}


def test_error_on_one_rank_is_raised_on_every_rank(runs):
    """A ValueError while rank 1 quantizes a layer reaches rank 0 too, naming rank 1."""
    root = runs["root"]
    assert runs["bad_rcs"] == [1, 1]
    for r in range(2):
        log = _log(root, "bad", r)
        assert "ValueError: layer 'model.layers.1." in log and "simulated bad weights" in log
        assert "(on rank 1)" in log, log[-2000:]
    assert not (root / "bad-gptq").exists()
