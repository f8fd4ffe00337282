"""Regenerate the fuzz seed corpus from a tiny model saved by the current code.

    python tests/fuzz/make_corpus.py [OUT]      (default: tests/fuzz/corpus)

Writes
  OUT/base/folder/      a tiny quantized LLaMA saved by sqllm.save_quantized
                        (3-bit, Dense-and-Sparse, attention biases)
  OUT/base/upstream/    the same model as an upstream SqueezeLLM .pt + quant_config.json
  OUT/saved_folder/     seeds of fuzz_saved_folder.py (mode byte + file bytes)
  OUT/upstream/         seeds of fuzz_upstream.py
  OUT/layers/           seeds of fuzz_layers.py
Deterministic: the same code writes the same files.
"""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=True, attention_bias=True,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def main(out: Path) -> None:
    import sqllm
    from sqllm.upstream import save_squeezellm_checkpoint

    if out.exists():
        shutil.rmtree(out)
    model = tiny_model()
    sqllm.quantize(model, bits=3, sparsity=0.05, weighted=False, progress=False)
    folder = sqllm.save_quantized(model, out / "base" / "folder")
    save_squeezellm_checkpoint(model, out / "base" / "upstream" / "model.pt")

    seeds = out / "saved_folder"
    seeds.mkdir(parents=True)
    st = (folder / "model.safetensors").read_bytes()
    cfg = (folder / "config.json").read_bytes()
    (seeds / "config").write_bytes(b"\x00" + cfg)
    (seeds / "safetensors").write_bytes(b"\x01" + st)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    index = {"metadata": {"total_size": len(st)},
             "weight_map": {n: "model.safetensors" for n in names}}
    (seeds / "index").write_bytes(b"\x02" + json.dumps(index).encode())
    header_len = struct.unpack("<Q", st[:8])[0]
    (seeds / "header").write_bytes(b"\x03" + st[8:8 + header_len])
    for i, cut in enumerate((0, 8, header_len + 8, len(st) // 2, len(st) - 1)):
        (seeds / f"truncate-{i}").write_bytes(b"\x04" + struct.pack("<I", cut))

    up = out / "upstream"
    up.mkdir()
    pt = (out / "base" / "upstream" / "model.pt").read_bytes()
    (up / "pt").write_bytes(b"\x00" + pt)
    (up / "quant_config").write_bytes(b"\x01" + b'{"wbits": 3}')
    for i in range(8):
        (up / f"edit-{i}").write_bytes(b"\x02" + bytes([i, i * 37 % 256, 255 - i, 7, i]) * 3)

    lay = out / "layers"
    lay.mkdir()
    # mode 0: raw CSR for _C.check_csr: rows, cols, row_ptr, (col, value) pairs
    rows, cols = 3, 8
    rp = [0, 2, 2, 3]
    entries = [(1, 0x3C00), (5, 0xBC00), (7, 0x4000)]
    body = bytes([rows - 1, cols - 1]) + b"".join(struct.pack("<i", r) for r in rp) + \
        b"".join(struct.pack("<iH", c, v) for c, v in entries)
    (lay / "csr").write_bytes(b"\x00" + body)
    # mode 1: a layer from_packed: a real layer's tensors
    layer = next(m for m in model.modules() if isinstance(m, sqllm.QuantLinear))
    blob = b"".join(t.contiguous().numpy().tobytes() for t in
                    (layer.qweight, layer.lookup_table, layer.sparse_row_ptr,
                     layer.sparse_col_idx, layer.sparse_values))
    (lay / "layer").write_bytes(b"\x01" + bytes([layer.bits, layer.out_features,
                                                 layer.in_features, layer.nnz % 256]) + blob)
    for i in range(4):
        (lay / f"kernel-{i}").write_bytes(bytes([2, i + 1, 16 + i, 3, 5]) + bytes(range(64)))
    print(f"seed corpus written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "corpus")
