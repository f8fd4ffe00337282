"""Fuzz sqllm.upstream.load_squeezellm_checkpoint.

The first input byte picks the input kind:
  0 the .pt file's bytes (a zip of pickles: torch.load's own parser, weights_only),
  1 quant_config.json's bytes (with the original .pt),
  2 structured edits of the original state dict, driven by the rest of the
    input: drop / replace a tensor by one of another shape, dtype or with
    extreme values, add stray keys.
A checkpoint that loads must then run a forward pass without error, and a
failed load must leave the base model untouched.

    python tests/fuzz/fuzz_upstream.py WORK_CORPUS_DIR -max_total_time=60 -timeout=30
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CORPUS, check, instrumented, run  # noqa: E402

with instrumented(["sqllm"]):
    import sqllm  # noqa: E402,F401
    from sqllm.upstream import load_squeezellm_checkpoint  # noqa: E402

import logging  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from make_corpus import tiny_model  # noqa: E402

logging.disable(logging.CRITICAL)
torch.set_num_threads(1)
PT = CORPUS / "base" / "upstream" / "model.pt"
PT_BYTES = PT.read_bytes()
STATE = torch.load(PT, weights_only=True)
KEYS = sorted(STATE)
BASE = tiny_model()
WORK = Path(tempfile.mkdtemp(prefix="sqllm-fuzz-upstream-", dir=os.environ.get("SQLLM_FUZZ_TMP")))
IDS = torch.tensor([[0, 5, 9, 63]])
EXTREMES = [0, -1, 1, 2 ** 31 - 1, -2 ** 31, 2 ** 31, 2 ** 40, 10 ** 6]
FLOATS = [0.0, -1.0, 1e9, -7e4, float("inf"), float("nan"), 65504.0, 1e-30]
DTYPES = [torch.int32, torch.int64, torch.int16, torch.uint8, torch.float32, torch.float16,
          torch.bfloat16, torch.float64, torch.bool]


def edited_state(data: bytes) -> dict:
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    state = dict(STATE)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        key = KEYS[fdp.ConsumeIntInRange(0, len(KEYS) - 1)]
        t = state.get(key, STATE[key])
        op = fdp.ConsumeIntInRange(0, 7)
        if op == 0:
            state.pop(key, None)
        elif op == 1:
            state[key] = t.to(DTYPES[fdp.ConsumeIntInRange(0, len(DTYPES) - 1)])
        elif op == 2 and t.numel():
            t = t.clone().to(torch.int64 if not t.is_floating_point() else t.dtype)
            flat = t.view(-1)
            i = fdp.ConsumeIntInRange(0, flat.numel() - 1)
            flat[i] = (EXTREMES if not t.is_floating_point() else FLOATS)[
                fdp.ConsumeIntInRange(0, 7)]
            state[key] = t
        elif op == 3:
            shape = [fdp.ConsumeIntInRange(0, 70) for _ in range(fdp.ConsumeIntInRange(0, 3))]
            state[key] = torch.zeros(shape, dtype=t.dtype)
        elif op == 4 and t.dim() == 2:
            state[key] = t.T.contiguous()
        elif op == 5:
            state[key.rsplit(".", 1)[0] + fdp.PickValueInList(
                [".bias", ".rows", ".cols", ".vals", ".qweight", ".lookup_table", ".x"])] = t
        elif op == 6 and t.numel():
            state[key] = t.reshape(-1)[: fdp.ConsumeIntInRange(0, t.numel())].clone()
        else:
            state["sparse_threshold." + key] = torch.tensor(fdp.ConsumeInt(4))
    return state


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    pt = WORK / "model.pt"
    qc = WORK / "quant_config.json"
    qc.write_bytes(b'{"wbits": 3}')
    if mode == 0:
        pt.write_bytes(body)
    elif mode == 1:
        pt.write_bytes(PT_BYTES)
        qc.write_bytes(body)
    else:
        torch.save(edited_state(body), pt)
    model = copy.deepcopy(BASE)
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = check(lambda: load_squeezellm_checkpoint(pt, model))
    if out is None:
        after = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        if after.keys() != before.keys() or any(after[n] is not before[n] for n in before):
            raise AssertionError("a failed upstream load changed the model")
        return
    with torch.no_grad():
        out(IDS)


if __name__ == "__main__":
    run(test_one_input, "upstream")
