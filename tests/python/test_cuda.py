"""Tests of the CUDA LUT kernels (sqllm.kernels_cuda) and of their CPU oracle.

* The CPU reference ``_C.lut_matmul_reference`` (the bit-exact twin of the
  exact CUDA kernel) runs everywhere: it is checked against float64 here.
* The GPU tests are skipped with a reason when sqllm was built without CUDA
  or no CUDA device is visible.  With a device they compare
    - the fast kernel with a float64 reference within the derived bounds below,
    - the exact kernel with the CPU reference bit for bit, in every precision
      mode.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sqllm import _C

# ---------------------------------------------------------------------------
# Named tolerances.  For an output y = sum_t (w_t x_t) with A = sum_t |w_t x_t|
# (computed in float64) the fast kernel's error is bounded by
#     |y - y64| <= U_OUT[dtype] * |y64| + (1 + U_OUT) * gamma(n) * A + U_ABS[dtype],
# where U_OUT is the unit roundoff of the output type (one final rounding),
# gamma(n) = n u / (1 - n u) with u = U_FP32 is the fp32 accumulation error
# (products are fused into FMAs, so each term sees at most n roundings), and
# n is the longest chain of roundings in the fast kernel's order: lane l sums
# the 32-column chunks l, l + 32, ... (32 * ceil(chunks / 32) FMAs, chunks =
# ceil(in / 32)), then its share of the row's sparse entries (ceil(nnz / 32)),
# then 5 butterfly levels.  x, tables and sparse values are exact inputs.
# The dequantize + torch.matmul path (batch > 16) also rounds every weight to
# x.dtype (U_W relative) before an fp32-accumulating GEMM (reduced-precision
# reductions are switched off in those tests).
# ---------------------------------------------------------------------------
U_FP32 = 2.0 ** -24
U_OUT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}
U_W = U_OUT
# Half the smallest subnormal of the output type: the absolute rounding error
# of outputs below the normal range.
U_ABS = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134, torch.float32: 2.0 ** -150}


def gamma(n: int, u: float = U_FP32) -> float:
    return n * u / (1 - n * u)


# ---------------------------------------------------------------------------
# Problem generation and a numpy float64 reference.
# ---------------------------------------------------------------------------
def pack_codes_np(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes (rows, n) uint8 -> uint32 (rows, ceil(n*bits/32)), docs/formats.md layout."""
    rows, n = codes.shape
    words = (n * bits + 31) // 32
    bitmat = ((codes[:, :, None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1)
    bitmat = bitmat.reshape(rows, n * bits).astype(np.uint64)
    padded = np.zeros((rows, words * 32), dtype=np.uint64)
    padded[:, : n * bits] = bitmat
    w = (padded.reshape(rows, words, 32) << np.arange(32, dtype=np.uint64)).sum(axis=2)
    return w.astype(np.uint32)


def unpack_codes_np(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    rows, words = packed.shape
    bitmat = (packed[:, :, None].astype(np.uint64) >> np.arange(32, dtype=np.uint64)) & 1
    bitmat = bitmat.reshape(rows, words * 32)[:, : n * bits].reshape(rows, n, bits)
    return (bitmat << np.arange(bits, dtype=np.uint64)).sum(axis=2).astype(np.int64)


class Problem:
    """A random LUT-quantized layer; x, tables and sparse values are chosen so
    that every fp16 operand and product is a normal number."""

    def __init__(self, batch, in_f, out_f, bits, axis="row", sparse=False, seed=0,
                 integers=False):
        rng = np.random.default_rng(seed)
        self.batch, self.in_f, self.out_f, self.bits, self.axis = batch, in_f, out_f, bits, axis
        K = 2 ** bits

        def vals(shape):
            if integers:
                return rng.integers(-8, 9, size=shape).astype(np.float32)
            mag = np.exp2(rng.uniform(-6.0, 2.0, size=shape))
            return (mag * rng.choice([-1.0, 1.0], size=shape)).astype(np.float32)

        self.x = vals((batch, in_f)).astype(np.float16).astype(np.float32)
        self.tables = vals((out_f if axis == "row" else in_f, K))
        self.codes_u8 = rng.integers(0, K, size=(out_f, in_f)).astype(np.uint8)
        self.packed = pack_codes_np(self.codes_u8, bits)
        self.csr = None
        if sparse:
            counts = rng.integers(0, 6, size=out_f)
            row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            cols = [np.sort(rng.choice(in_f, size=c, replace=False)) for c in counts]
            col_idx = (np.concatenate(cols) if cols else np.zeros(0)).astype(np.int32)
            values = vals(int(row_ptr[-1])).astype(np.float16)
            self.csr = (row_ptr, col_idx, values)

    def weight64(self) -> np.ndarray:
        c = self.codes_u8.astype(np.int64)
        if self.axis == "row":
            w = np.take_along_axis(self.tables.astype(np.float64), c, axis=1)
        else:
            w = self.tables.astype(np.float64)[np.arange(self.in_f)[None, :], c]
        if self.csr is not None:
            row_ptr, col_idx, values = self.csr
            rows = np.repeat(np.arange(self.out_f), np.diff(row_ptr))
            np.add.at(w, (rows, col_idx), values.astype(np.float64))
        return w

    def reference64(self, x=None):
        """(y64, A) with A = sum |w x| (sparse entries counted separately)."""
        x = self.x if x is None else x
        x64 = x.astype(np.float64)
        c = self.codes_u8.astype(np.int64)
        if self.axis == "row":
            wd = np.take_along_axis(self.tables.astype(np.float64), c, axis=1)
        else:
            wd = self.tables.astype(np.float64)[np.arange(self.in_f)[None, :], c]
        y = x64 @ wd.T
        a = np.abs(x64) @ np.abs(wd).T
        if self.csr is not None:
            row_ptr, col_idx, values = self.csr
            ws = np.zeros_like(wd)
            rows = np.repeat(np.arange(self.out_f), np.diff(row_ptr))
            np.add.at(ws, (rows, col_idx), values.astype(np.float64))
            y = y + x64 @ ws.T
            a = a + np.abs(x64) @ np.abs(ws).T
        return y, a

    def max_row_nnz(self) -> int:
        return 0 if self.csr is None else int(np.diff(self.csr[0]).max(initial=0))

    def ref_csr(self):
        if self.csr is None:
            return None
        r, c, v = self.csr
        return (r, c, v.astype(np.float32))

    def reference(self, precision="fp32", emu=(5, 10, 8, 23), x=None):
        x = self.x if x is None else x
        return _C.lut_matmul_reference(x, self.packed.view(np.int32), self.tables, self.bits,
                                       self.in_f, self.axis == "column", self.ref_csr(),
                                       precision, *emu)


# ---------------------------------------------------------------------------
# CPU: the reference itself (runs without a GPU).
# ---------------------------------------------------------------------------
def test_pack_helpers_roundtrip():
    p = Problem(1, 77, 5, 3)
    assert np.array_equal(unpack_codes_np(p.packed, 77, 3), p.codes_u8.astype(np.int64))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("sparse", [False, True])
def test_reference_fp32_vs_float64(bits, axis, sparse):
    p = Problem(3, 301, 9, bits, axis, sparse, seed=bits)
    y = p.reference("fp32")
    y64, a = p.reference64()
    assert y.dtype == np.float32 and y.shape == (3, 9)
    # Reference order: ceil(in/32) lane steps + 5 tree levels + sparse entries,
    # one rounding per product (u = 2^-24).
    n = math.ceil(p.in_f / 32) + 5 + p.max_row_nnz() + 1
    assert np.all(np.abs(y.astype(np.float64) - y64) <= gamma(n) * a)
    # Its float64 mode is the float64 sum.
    np.testing.assert_allclose(p.reference("float64"), y64, rtol=1e-12, atol=1e-12 * a.max())


def test_reference_exact_on_small_integers():
    p = Problem(2, 100, 7, 3, "column", True, seed=5, integers=True)
    y64, _ = p.reference64()
    assert np.array_equal(p.reference("fp32").astype(np.float64), y64)


def test_reference_fp16_and_emulated_bounds():
    p = Problem(2, 200, 6, 4, "row", True, seed=9)
    y64, a = p.reference64()
    n = math.ceil(p.in_f / 32) + 5 + p.max_row_nnz()
    # FP16: operands and product rounded to fp16 (3 roundings of 2^-11).
    rel = (1 + 2.0 ** -11) ** 3 * (1 + U_FP32) ** n - 1
    assert np.all(np.abs(p.reference("fp16") - y64) <= rel * a)
    # E5M3 multiply / E8M7 accumulate.
    emu = (5, 3, 8, 7)
    rel = (1 + 2.0 ** -4) ** 3 * (1 + 2.0 ** -8) ** n - 1
    y = p.reference("emulated", emu)
    assert np.all(np.abs(y - y64) <= rel * a)
    assert not np.array_equal(y, p.reference("fp32"))


def test_reference_fp16_equals_emulated_e5m10_e8m23():
    p = Problem(2, 130, 5, 2, "row", True, seed=3)
    assert np.array_equal(p.reference("fp16").view(np.uint32),
                          p.reference("emulated", (5, 10, 8, 23)).view(np.uint32))
    assert np.array_equal(p.reference("fp32").view(np.uint32),
                          p.reference("emulated", (8, 23, 8, 23)).view(np.uint32))


def test_reference_rejects_bad_inputs():
    p = Problem(1, 40, 3, 2)
    with pytest.raises(ValueError, match="codes must have shape"):
        _C.lut_matmul_reference(p.x, p.packed[:, :1], p.tables, 2, 40)
    with pytest.raises(ValueError, match="tables must have shape"):
        _C.lut_matmul_reference(p.x, p.packed, p.tables[:2], 2, 40)
    with pytest.raises(ValueError, match="precision must be"):
        _C.lut_matmul_reference(p.x, p.packed, p.tables, 2, 40, precision="fp8")
    with pytest.raises(ValueError, match="mantissa bits"):
        _C.lut_matmul_reference(p.x, p.packed, p.tables, 2, 40, precision="emulated",
                                mul_man=30)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        _C.lut_matmul_reference(p.x, p.packed, p.tables, 9, 40)


def test_wrapper_without_cuda_raises_clearly():
    from sqllm.kernels_cuda import lut_matmul_cuda

    p = Problem(1, 64, 4, 2)
    x = torch.from_numpy(p.x).half()
    codes = torch.from_numpy(p.packed.view(np.int32))
    tables = torch.from_numpy(p.tables)
    if not _C.cuda_compiled():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            lut_matmul_cuda(x, codes, tables, 2, 64, 4)
    else:  # a CPU tensor is refused before anything is launched
        with pytest.raises(ValueError, match="x must be a CUDA tensor"):
            lut_matmul_cuda(x, codes, tables, 2, 64, 4)
    assert _C.cuda_device_count() >= 0


@pytest.mark.skipif(not _C.cuda_compiled(), reason="sqllm built without CUDA")
def test_cuda_entry_validates_before_touching_the_device():
    """Runs without a GPU: argument errors name the problem and the shapes."""
    args = dict(x=16, y=16, batch=1, in_features=64, out_features=8, x_stride=0, bits=3,
                codes=16, tables=16, column_grouping=False, csr_row_ptr=0, csr_col_idx=0,
                csr_values=0, nnz=0, dtype="float16", precision="fp32", mul_exp=5, mul_man=10,
                acc_exp=8, acc_man=23, exact=False, stream=0)
    cases = [("bits", 9, r"bits must be in 1\.\.8, got 9 \(x\[1, 64\]"),
             ("in_features", 0, "in_features and out_features must be >= 1"),
             ("codes", 0, r"codes and tables are required.*codes\[8, 6\] bits=3"),
             ("dtype", "int8", "dtype must be"),
             ("acc_man", 24, "accumulate format")]
    for key, value, match in cases:
        bad = dict(args, **{key: value})
        if key == "acc_man":
            bad["precision"] = "emulated"
        with pytest.raises(ValueError, match=match):
            _C.cuda_lut_matmul(**bad)
    if _C.cuda_device_count() == 0:  # a CUDA runtime failure is a RuntimeError, not a crash
        with pytest.raises(RuntimeError, match="sqllm CUDA"):
            _C.cuda_lut_matmul(**args)


# ---------------------------------------------------------------------------
# GPU tests.
# ---------------------------------------------------------------------------
def _cuda_skip_reason():
    if not _C.cuda_compiled():
        return "sqllm built without CUDA"
    if _C.cuda_device_count() == 0 or not torch.cuda.is_available():
        return "no CUDA device"
    return None


requires_cuda = pytest.mark.skipif(_cuda_skip_reason() is not None,
                                   reason=_cuda_skip_reason() or "")


def _to_dev(p: Problem, dtype=torch.float16, x=None):
    dev = torch.device("cuda")
    xt = torch.from_numpy(p.x if x is None else x).to(dev, dtype)
    codes = torch.from_numpy(p.packed.view(np.int32)).to(dev)
    tables = torch.from_numpy(p.tables).to(dev)
    csr = None
    if p.csr is not None:
        r, c, v = p.csr
        csr = (torch.from_numpy(r).to(dev), torch.from_numpy(c).to(dev),
               torch.from_numpy(v).to(dev))
    return xt, codes, tables, csr


def _check_fast(p: Problem, y: torch.Tensor, dtype, dequant_path=False, x=None):
    """x: the activations the kernel received (p.x rounded to its dtype: bf16
    keeps 8 significant bits of p.x's fp16 values, so the reference must be
    the exact sum over the rounded x, not over p.x)."""
    x_used = None if x is None else x.float().cpu().numpy()
    y64, a = p.reference64(x_used)
    n = 32 * math.ceil(math.ceil(p.in_f / 32) / 32) + math.ceil(p.max_row_nnz() / 32) + 5
    if dequant_path:  # weight rounding to dtype + fp32 GEMM over `in` terms
        bound = U_OUT[dtype] * np.abs(y64) + (1 + U_OUT[dtype]) * (U_W[dtype] + gamma(p.in_f + 1)) * a
    else:
        bound = U_OUT[dtype] * np.abs(y64) + (1 + U_OUT[dtype]) * gamma(n) * a
    bound = bound + U_ABS[dtype]
    err = np.abs(y.float().cpu().numpy().astype(np.float64) - y64)
    worst = float((err / (bound + 1e-300)).max())
    assert worst <= 1.0, f"max err/bound = {worst}"


@pytest.fixture()
def no_reduced_precision_gemm():
    m = torch.backends.cuda.matmul
    old = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction,
           m.allow_tf32)
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    m.allow_tf32 = False
    yield
    (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction,
     m.allow_tf32) = old


SHAPES = [(300, 77), (1024, 64), (2080, 33), (4096, 96)]  # (in, out): tails, odd out, tiles


@requires_cuda
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("batch", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", ["auto", "tiled", "warp"])
def test_fast_vs_float64(bits, dtype, axis, batch, sparse, shape, kernel, no_reduced_precision_gemm):
    """Both fast kernels (and auto's choice, with the dequantize path above
    16 rows) within the bound of their common summation order."""
    from sqllm.kernels_cuda import FAST_MAX_BATCH, lut_matmul_cuda

    in_f, out_f = shape
    p = Problem(batch, in_f, out_f, bits, axis, sparse, seed=bits * 7 + batch)
    x, codes, tables, csr = _to_dev(p, dtype)
    if kernel == "warp" and (axis == "column" or in_f % 32):
        with pytest.raises(ValueError, match="warp kernel needs row grouping"):
            lut_matmul_cuda(x, codes, tables, bits, in_f, out_f, axis, csr=csr, kernel=kernel)
        return
    y = lut_matmul_cuda(x, codes, tables, bits, in_f, out_f, axis, csr=csr, kernel=kernel)
    torch.cuda.synchronize()
    assert y.dtype == dtype and y.shape == (batch, out_f)
    _check_fast(p, y, dtype, dequant_path=kernel == "auto" and batch > FAST_MAX_BATCH, x=x)


@requires_cuda
@pytest.mark.parametrize("bits", [1, 5, 6, 7, 8])
def test_fast_other_widths_use_exact_fp32(bits):
    from sqllm.kernels_cuda import lut_matmul_cuda

    p = Problem(3, 129, 17, bits, "row", True, seed=bits)
    x, codes, tables, csr = _to_dev(p, torch.float16)
    y = lut_matmul_cuda(x, codes, tables, bits, 129, 17, csr=csr)
    ref = torch.from_numpy(p.reference("fp32")).to(torch.float16)
    assert torch.equal(y.cpu().view(torch.int16), ref.view(torch.int16))


@requires_cuda
@pytest.mark.parametrize("precision,emu", [("fp32", (5, 10, 8, 23)), ("fp16", (5, 10, 8, 23)),
                                           ("emulated", (5, 10, 8, 23)),
                                           ("emulated", (4, 3, 8, 7)),
                                           ("emulated", (5, 2, 6, 9)),
                                           ("emulated", (8, 23, 8, 23))])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_exact_bitwise_vs_reference(precision, emu, bits, axis, batch):
    from sqllm.kernels_cuda import lut_matmul_cuda

    p = Problem(batch, 333, 19, bits, axis, True, seed=batch + bits)
    ref = p.reference(precision, emu)
    # float32 activations (fp16 values): the float result itself, bit for bit.
    x, codes, tables, csr = _to_dev(p, torch.float32)
    y = lut_matmul_cuda(x, codes, tables, bits, 333, 19, axis, csr=csr, precision=precision,
                        emu=emu)
    assert np.array_equal(y.cpu().numpy().view(np.uint32), ref.view(np.uint32))
    # float16 / bfloat16 activations: the float result rounded once (nearest even).
    for dt in (torch.float16, torch.bfloat16):
        xt = x.to(dt)
        ref_x = xt.float().cpu().numpy()
        ref_dt = torch.from_numpy(p.reference(precision, emu, x=ref_x)).to(dt)
        y = lut_matmul_cuda(xt, codes, tables, bits, 333, 19, axis, csr=csr,
                            precision=precision, emu=emu)
        assert torch.equal(y.cpu().view(torch.int16), ref_dt.view(torch.int16)), dt


@requires_cuda
def test_noncontiguous_x_leading_dims_and_streams():
    from sqllm.kernels_cuda import lut_matmul_cuda

    p = Problem(6, 200, 40, 3, "row", True, seed=11)
    x, codes, tables, csr = _to_dev(p, torch.float16)
    want = lut_matmul_cuda(x, codes, tables, 3, 200, 40, csr=csr)
    # Row stride > in (a slice of a wider buffer): passed as x_stride, no copy.
    wide = torch.zeros(6, 256, dtype=torch.float16, device="cuda")
    wide[:, :200] = x
    assert torch.equal(lut_matmul_cuda(wide[:, :200], codes, tables, 3, 200, 40, csr=csr), want)
    # Last dimension strided: copied.
    inter = torch.zeros(6, 400, dtype=torch.float16, device="cuda")
    inter[:, ::2] = x
    assert torch.equal(lut_matmul_cuda(inter[:, ::2], codes, tables, 3, 200, 40, csr=csr), want)
    # Leading dims and out_dtype.
    y3 = lut_matmul_cuda(x.reshape(2, 3, 200), codes, tables, 3, 200, 40, csr=csr,
                         out_dtype=torch.float32)
    assert y3.shape == (2, 3, 40) and y3.dtype == torch.float32
    assert torch.equal(y3.reshape(6, 40).half(), want)
    # A side stream.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ys = lut_matmul_cuda(x, codes, tables, 3, 200, 40, csr=csr)
    s.synchronize()
    assert torch.equal(ys, want)
    # Empty batch.
    assert lut_matmul_cuda(x[:0], codes, tables, 3, 200, 40).shape == (0, 40)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("bits", [2, 3, 4, 7])
def test_dequantize(dtype, axis, bits):
    from sqllm.kernels_cuda import dequantize_cuda

    for in_f in (256, 203):  # vector stores, then the scalar tail
        p = Problem(1, in_f, 21, bits, axis, True, seed=bits)
        _, codes, tables, csr = _to_dev(p)
        w = dequantize_cuda(codes, tables, bits, in_f, 21, axis, csr=csr, dtype=dtype)
        # The kernel forms dense + sparse in fp32 and rounds to dtype; the
        # float64 sum here is exact (exponents differ by < 29), so rounding it
        # to fp32 and then to dtype gives the same bits.
        want = torch.from_numpy(p.weight64().astype(np.float32)).to(dtype)
        assert torch.equal(w.cpu(), want)


@requires_cuda
def test_bad_inputs_raise():
    from sqllm.kernels_cuda import lut_matmul_cuda

    p = Problem(2, 64, 8, 2, "row", True)
    x, codes, tables, csr = _to_dev(p)
    with pytest.raises(TypeError, match="codes"):
        lut_matmul_cuda(x, codes.long(), tables, 2, 64, 8)
    with pytest.raises(ValueError, match="codes must have shape"):
        lut_matmul_cuda(x, codes[:, :1].contiguous(), tables, 2, 64, 8)
    with pytest.raises(ValueError, match="tables must have shape"):
        lut_matmul_cuda(x, codes, tables, 2, 64, 8, group_axis="column")
    with pytest.raises(TypeError, match="tables"):
        lut_matmul_cuda(x, codes, tables.half(), 2, 64, 8)
    with pytest.raises(ValueError, match="in_features"):
        lut_matmul_cuda(x[:, :32], codes, tables, 2, 64, 8)
    with pytest.raises(ValueError, match="must be on"):
        lut_matmul_cuda(x, codes.cpu(), tables, 2, 64, 8)
    with pytest.raises(ValueError, match="contiguous"):
        lut_matmul_cuda(x, codes.t().contiguous().t(), tables, 2, 64, 8)
    with pytest.raises(ValueError, match="precision"):
        lut_matmul_cuda(x, codes, tables, 2, 64, 8, precision="fp8")
    with pytest.raises(ValueError, match="mantissa bits"):
        lut_matmul_cuda(x, codes, tables, 2, 64, 8, precision="emulated", emu=(5, 30, 8, 23))
    with pytest.raises(ValueError, match="csr row_ptr"):
        lut_matmul_cuda(x, codes, tables, 2, 64, 8, csr=(csr[0][:-1].contiguous(), csr[1], csr[2]))
    with pytest.raises(TypeError, match="csr values"):
        lut_matmul_cuda(x, codes, tables, 2, 64, 8, csr=(csr[0], csr[1], csr[2].float()))
    with pytest.raises(ValueError, match="bits"):
        lut_matmul_cuda(x, codes, tables, 9, 64, 8)
    with pytest.raises(ValueError, match="kernel must be one of"):
        lut_matmul_cuda(x, codes, tables, 2, 64, 8, kernel="fastest")
    with pytest.raises(ValueError, match="needs precision='fast'"):
        lut_matmul_cuda(x, codes, tables, 2, 64, 8, precision="fp32", kernel="warp")


# ---------------------------------------------------------------------------
# QuantLinear and a quantized model on the GPU.
# ---------------------------------------------------------------------------
def _quant_layer(in_f, out_f, bits, axis, sparsity, bias, seed):
    from sqllm.nn import QuantLinear

    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return QuantLinear.from_linear(lin, bits=bits, group_axis=axis, kmeans="lloyd",
                                   sparsity=sparsity)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,axis,sparsity,bias", [(3, "row", 0.0, False), (4, "column", 0.01, True),
                                                     (2, "row", 0.005, True), (5, "row", 0.0, False)])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 9), (40,)])
def test_quantlinear_cuda_matches_cpu(dtype, bits, axis, sparsity, bias, lead,
                                      no_reduced_precision_gemm):
    q = _quant_layer(200, 72, bits, axis, sparsity, bias, seed=bits)
    g = torch.Generator().manual_seed(len(lead))
    x = torch.randn(*lead, 200, generator=g).to(dtype)
    want = q(x.float()).double()  # the CPU kernel on the same (rounded) inputs, fp32
    nnz_max = int((q.sparse_row_ptr[1:] - q.sparse_row_ptr[:-1]).max())
    qc = q.to("cuda")
    y = qc(x.cuda())
    assert y.dtype == dtype and y.shape == (*lead, 72)
    # Each side is an fp32 sum of the same products, within gamma(n) * A of the
    # exact sum (n = in + nnz + 6 bounds the rounding chain of every order
    # used: CPU paths, the GPU kernel's, cuBLAS's), so they differ by at most
    # 2 gamma(n) A before the GPU result is rounded to dtype -- once without a
    # bias, twice with one (kernel output, then + bias in fp32); each rounding
    # adds U_OUT relative (of a value within |want| + 2 gamma A) or U_ABS.  The
    # dequantize path (N > 16) first rounds every weight to dtype (U_W).
    w = q.dequantize().double()
    a = x.double().abs() @ w.abs().t() + (q.bias.double().abs() if bias else 0)
    gam = gamma(200 + nnz_max + 6)
    u_w = U_W[dtype] if x.reshape(-1, 200).shape[0] > 16 else 0.0
    r = 2 if bias else 1
    grow = (1 + U_OUT[dtype]) ** r - 1
    bound = grow * (want.abs() + (2 * gam + u_w) * a) + (2 * gam + u_w) * a + r * U_ABS[dtype]
    err = (y.cpu().double() - want).abs()
    assert bool((err <= bound).all()), f"max err/bound {float((err / bound).max())}"


@requires_cuda
def test_quantlinear_cuda_follows_buffer_changes_and_devices():
    q = _quant_layer(96, 40, 3, "row", 0.01, False, seed=1).to("cuda")
    x = torch.randn(2, 96, device="cuda", dtype=torch.float16)
    y1 = q(x)
    with torch.no_grad():
        q.lookup_table.mul_(2.0)  # in place: the cached launch plan must not go stale
        q.sparse_values.mul_(2.0)
    y2 = q(x)
    torch.testing.assert_close(y2.float(), 2 * y1.float(), rtol=2e-3, atol=1e-3)
    qh = q.half()  # a model-wide .half() keeps the format's buffers as they are
    assert qh.lookup_table.dtype == torch.float32 and qh.sparse_values.dtype == torch.float16
    torch.testing.assert_close(qh(x), y2, rtol=0, atol=0)
    q.cpu()
    with pytest.raises(ValueError, match="buffers are on cpu"):
        q(x)


@requires_cuda
def test_quantized_model_generates_on_cuda(tiny_llama, calib_ids):
    import sqllm

    model = sqllm.quantize(tiny_llama, bits=4, calibration=calib_ids, progress=False)
    ids = calib_ids[:2, :12]
    with torch.no_grad():
        want = model(ids).logits
        mc = model.to("cuda")
        got = mc(ids.cuda()).logits.cpu()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        mh = mc.half()
        out = mh.generate(ids.cuda(), max_new_tokens=8, do_sample=False, pad_token_id=256)
    assert out.shape == (2, 20)
