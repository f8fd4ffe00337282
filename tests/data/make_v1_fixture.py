"""Generate tests/data/v1_tiny: a format_version 1 folder written by the release
that introduced that format (sqllm 0.1.0, commit 2a7ac81), with the logits the
quantized model gave before it was saved.

It is a compatibility fixture: run it with THAT release's code, never with a
newer one (a newer sqllm writes format_version 2).  Kept for the record:

    git checkout 2a7ac81 && PYTHONPATH=python python3 tests/data/make_v1_fixture.py
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

import sqllm  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402


def main() -> None:
    assert sqllm.FORMAT_VERSION == 1, "run this with the format_version 1 release"
    model = make_tiny_llama(seed=0)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    sqllm.quantize(model, method="squeezellm", bits=3, calibration=calib, sparsity=0.02,
                   progress=False)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.contiguous()
    out = HERE / "v1_tiny"
    if out.exists():
        shutil.rmtree(out)
    sqllm.save_quantized(model, out)
    save_file({"input_ids": ids.contiguous(), "logits": logits}, str(HERE / "v1_tiny_expected.safetensors"))
    print("wrote", out, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
