"""Fuzz the CSR and packed-layout validators and the CPU kernel behind them.

The first input byte picks the entry point:
  0 sqllm._C.check_csr on a raw CSR (then lut_matmul with it when accepted),
  1 QuantLinear.from_packed on raw qweight/table/CSR bytes (then forward and
    dequantize when accepted: a validated layer must never crash a kernel),
  2 the packed-layout bindings (lut_matmul, nuq_dequantize, unpack_codes,
    packed_words) with fuzzed shapes, dtypes and bit widths.

    python tests/fuzz/fuzz_layers.py WORK_CORPUS_DIR -max_total_time=60 -timeout=10
"""
from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check, instrumented, run  # noqa: E402

with instrumented(["sqllm"]):
    import sqllm  # noqa: E402
    from sqllm import QuantLinear, _C  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def _arr(buf: bytes, dtype, n: int) -> np.ndarray:
    item = np.dtype(dtype).itemsize
    raw = (buf + b"\0" * (n * item))[: n * item]
    return np.frombuffer(raw, dtype=dtype).copy()


def csr_case(body: bytes) -> None:
    if len(body) < 2:
        return
    rows, cols = body[0] % 16 + 1, body[1] % 64 + 1
    rest = body[2:]
    rp = _arr(rest, np.int32, rows + 1)
    rest = rest[4 * (rows + 1):]
    nnz = len(rest) // 6
    pairs = np.frombuffer(rest[: 6 * nnz], dtype=np.dtype([("c", "<i4"), ("v", "<u2")]))
    ci, va = pairs["c"].copy(), pairs["v"].copy()
    if _accepts(lambda: _C.check_csr((rp, ci, va), rows, cols)):
        codes = np.zeros((rows, _C.packed_words(cols, 3)), np.uint32)
        tables = np.ones((rows, 8), np.float32)
        y = _C.lut_matmul(np.ones((2, cols), np.float32), codes, tables, 3, cols, "row",
                          (rp, ci, va), 0, False)
        if not np.isfinite(y).all() and np.isfinite(va.view(np.float16)).all():
            raise AssertionError("finite inputs gave a non-finite product")


def _accepts(fn) -> bool:
    try:
        fn()
        return True
    except (ValueError, TypeError):
        return False


def layer_case(body: bytes) -> None:
    if len(body) < 4:
        return
    bits, out_f, in_f, nnz = body[0] % 10, body[1] % 40, body[2] % 80, body[3]
    rest = body[4:]
    words = (in_f * max(bits, 1) + 31) // 32
    qw = _arr(rest, np.int32, out_f * words).reshape(out_f, words)
    rest = rest[qw.nbytes:]
    k = 2 ** min(max(bits, 1), 8)
    tab = _arr(rest, np.float32, out_f * k).reshape(out_f, k)
    rest = rest[tab.nbytes:]
    rp = _arr(rest, np.int32, out_f + 1)
    rest = rest[rp.nbytes:]
    ci = _arr(rest, np.int32, nnz)
    va = _arr(rest[ci.nbytes:], np.uint16, nnz)
    layer = check(lambda: QuantLinear.from_packed(qw, tab, bits, in_f, "row",
                                                  sparse=(rp, ci, va) if nnz else None))
    if layer is None:
        return
    x = torch.randn(3, in_f)
    layer(x)
    layer.dequantize()


def kernel_case(body: bytes) -> None:
    if len(body) < 5:
        return
    bits, out_f, in_f, k, axis = (body[0] % 10, body[1] % 20, body[2] % 70, body[3] % 300,
                                  "row" if body[4] & 1 else ("column" if body[4] & 2 else "diag"))
    rest = body[5:]
    words = struct.unpack("<B", rest[:1])[0] % 8 if rest else 0
    qw = _arr(rest, np.uint32, out_f * words).reshape(out_f, words)
    tab = _arr(rest, np.float32, out_f * k).reshape(out_f, k) if k else np.zeros((0,), np.float32)
    x = _arr(rest[::-1], np.float32, 2 * in_f).reshape(2, in_f)
    check(lambda: _C.lut_matmul(x, qw, tab, bits, in_f, axis, None, 0, False))
    check(lambda: _C.nuq_dequantize(qw, tab, in_f, bits, axis))
    check(lambda: _C.unpack_codes(qw, in_f, bits))
    check(lambda: _C.packed_words(in_f, bits))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    (csr_case, layer_case, kernel_case)[data[0] % 3](data[1:])


if __name__ == "__main__":
    run(test_one_input, "layers")
