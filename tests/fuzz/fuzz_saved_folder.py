"""Fuzz sqllm.load_quantized with mutated copies of a small real saved folder.

The first input byte picks what is replaced in a copy of
corpus/base/folder (written by make_corpus.py):
  0 config.json, 1 model.safetensors, 2 model.safetensors.index.json,
  3 the safetensors header (same data after it), 4 truncation of a file at an offset;
the rest of the input is the new content.  A folder that loads must then run
a forward pass without error.

    python tests/fuzz/fuzz_saved_folder.py WORK_CORPUS_DIR -max_total_time=60 -timeout=30
"""
from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CORPUS, check, instrumented, run  # noqa: E402

with instrumented(["sqllm"]):
    import sqllm  # noqa: E402
    import sqllm.io  # noqa: E402,F401

import logging  # noqa: E402

import torch  # noqa: E402

logging.disable(logging.CRITICAL)
torch.set_num_threads(1)
BASE = CORPUS / "base" / "folder"
FILES = {p.name: p.read_bytes() for p in BASE.iterdir() if p.is_file()}
WORK = Path(tempfile.mkdtemp(prefix="sqllm-fuzz-folder-", dir=os.environ.get("SQLLM_FUZZ_TMP")))
IDS = torch.tensor([[0, 5, 9, 63]])


def build(data: bytes) -> Path:
    d = WORK / "m"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    files = dict(FILES)
    mode, body = data[0] % 5, data[1:]
    if mode == 0:
        files["config.json"] = body
    elif mode == 1:
        files["model.safetensors"] = body
    elif mode == 2:
        files["model.safetensors.index.json"] = body
    elif mode == 3:
        st = files["model.safetensors"]
        n = struct.unpack("<Q", st[:8])[0]
        files["model.safetensors"] = struct.pack("<Q", len(body)) + body + st[8 + n:]
    else:
        names = sorted(files)
        cut = struct.unpack("<I", (body + b"\0\0\0\0")[:4])[0]
        name = names[body[4] % len(names)] if len(body) > 4 else "model.safetensors"
        files[name] = files[name][:cut % (len(files[name]) + 1)]
    for name, content in files.items():
        (d / name).write_bytes(content)
    return d


def test_one_input(data: bytes) -> None:
    if not data:
        return
    d = build(data)
    model = check(lambda: sqllm.load_quantized(d))
    if model is not None:
        with torch.no_grad():
            model(IDS)


if __name__ == "__main__":
    run(test_one_input, "saved_folder")
