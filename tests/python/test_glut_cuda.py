"""The CUDA glut kernels (sqllm.kernels_cuda_glut) and GlutQuantLinear on CUDA.

The GPU tests are skipped cleanly without a GPU or without a CUDA build; the
kernels' logic is tested on every run on the host emulator
(tests/cpp/cuda_emulation/test_glut_cuda_emulated.cpp: the same bounds, and the
dequantizer bit for bit against the CPU decode and the references).  Here, on a
device: the GEMV against float64 within the bound of an fp32 sum in any order
(cuda/glut_matmul.cu), the dequantizer bit for bit against the CPU
``dequantize()`` and the NumPy reference, and the layer's CUDA path.  The
tests that run everywhere check the guards: a clear error without the kernels,
and the layer's behaviour on the CPU unchanged.
"""
import numpy as np
import pytest
import torch

from sqllm import kernels_cuda_glut
from sqllm.nn_glut import GlutQuantLinear, glut_dequantize_numpy

from test_glut import random_glut

needs_gpu = pytest.mark.skipif(not kernels_cuda_glut.available(),
                               reason="needs a CUDA device and sqllm built with CUDA")

U = 2.0 ** -24
U_OUT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 0.0}
ABS_OUT = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134, torch.float32: 0.0}

# (out, in, bits, group_size): every width, groups that are and are not
# multiples of 32, partial chunks, several staged tiles of x (in > 8192).
CONFIGS = [(37, 70, 1, 5), (64, 200, 2, 64), (33, 100, 3, 33), (20, 576, 3, 576),
           (48, 1030, 4, 128), (9, 129, 5, 64), (16, 300, 6, 100), (5, 45, 7, 16),
           (7, 50, 8, 7), (12, 9000, 4, 288)]
CFG_IDS = [f"{o}x{i}b{b}g{g}" for o, i, b, g in CONFIGS]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]


def make_layer(out, inn, bits, g, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    qw, tables, scales, offsets, _ = random_glut(rng, out, inn, bits, g)
    b = torch.from_numpy(rng.standard_normal(out).astype(np.float32)) if bias else None
    layer = GlutQuantLinear.from_packed(qw, tables, scales, offsets, inn, bits, g, bias=b)
    W = glut_dequantize_numpy(qw, tables, scales, offsets, bits, g, inn)
    return layer, W


def gemv_bound(xd, W64, dtype):
    """|y - x W64ᵀ| of an fp32 sum of in products in any order, then one rounding to
    dtype: gamma(in) * sum |x W| (W = the fp32 decoded weights, exact in float64)."""
    n = xd.shape[1]
    gam = n * U / (1 - n * U)
    ref = xd @ W64.T
    e32 = gam * (np.abs(xd) @ np.abs(W64).T)
    return ref, e32 + U_OUT[dtype] * (np.abs(ref) + e32) + ABS_OUT[dtype]


@needs_gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 9])
def test_gemv_equals_float64(cfg, dtype, batch):
    out, inn, bits, g = cfg
    layer, W = make_layer(out, inn, bits, g, seed=batch)
    layer = layer.cuda()
    x = torch.randn(batch, inn, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = kernels_cuda_glut.glut_matmul(x.cuda(), layer)
    assert y.dtype == dtype and y.shape == (batch, out)
    ref, bound = gemv_bound(x.double().numpy(), W.astype(np.float64), dtype)
    err = np.abs(y.cpu().double().numpy() - ref)
    assert np.all(err <= bound), float(np.max(err / bound))


@needs_gpu
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
def test_dequantize_is_the_cpu_decode_bit_for_bit(cfg):
    out, inn, bits, g = cfg
    layer, W = make_layer(out, inn, bits, g, seed=1)
    cpu = layer.dequantize().numpy()
    assert np.array_equal(cpu.view(np.uint32), W.view(np.uint32))
    lc = layer.cuda()
    w32 = kernels_cuda_glut.glut_dequantize(lc, torch.float32)
    assert np.array_equal(w32.cpu().numpy().view(np.uint32), W.view(np.uint32))
    assert np.array_equal(lc.dequantize().cpu().numpy().view(np.uint32), W.view(np.uint32))
    for dt in (torch.float16, torch.bfloat16):  # one rounding (nearest even) of the fp32 value
        w = kernels_cuda_glut.glut_dequantize(lc, dt, "cuda").cpu()
        assert torch.equal(w, torch.from_numpy(W).to(dt))


def forward_bound(xd, Wc, bias, dtype, gemm_out_rounded):
    """(ref, bound) of GlutQuantLinear.forward: the fp32 sum of x Wcᵀ in any order
    (rounded to dtype when the GEMM writes dtype), + bias in fp32, rounded to dtype."""
    ref, e = gemv_bound(xd, Wc, torch.float32)
    if gemm_out_rounded:
        e = e + U_OUT[dtype] * (np.abs(ref) + e) + ABS_OUT[dtype]
    ref = ref + bias
    e = e + U * (np.abs(ref) + e)
    return ref, e + U_OUT[dtype] * (np.abs(ref) + e) + ABS_OUT[dtype]


@needs_gpu
@pytest.mark.parametrize("batch", [1, 8, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layer_forward_on_cuda_matches_float64(batch, dtype, caplog):
    out, inn, bits, g = 48, 1030, 4, 128
    layer, W = make_layer(out, inn, bits, g, seed=3)
    x = torch.randn(batch, inn, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = layer.bias.double().numpy()
    cuda_layer = layer.to("cuda")  # in place, as nn.Module.to
    assert cuda_layer.backend(torch.device("cuda")) == "cuda"
    gemv = batch <= kernels_cuda_glut.GEMV_MAX_BATCH
    saved = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        with caplog.at_level("INFO", logger="sqllm.nn_glut"):
            got = cuda_layer(x.cuda())
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = saved
    assert got.dtype == dtype and got.device.type == "cuda"
    assert not any("dequantizing and using F.linear" in r.message for r in caplog.records)
    # GEMV: x in fp32, the fp32 weights; above GEMV_MAX_BATCH: the weight decoded
    # to x.dtype (one rounding of W) and a GEMM writing x.dtype.
    Wc = W.astype(np.float64) if gemv else torch.from_numpy(W).to(dtype).double().numpy()
    ref, bound = forward_bound(x.double().numpy(), Wc, bias, dtype,
                               gemm_out_rounded=not gemv)
    err = np.abs(got.cpu().double().numpy() - ref)
    assert np.all(err <= bound), float(np.max(err / bound))
    back = cuda_layer.cpu()
    assert back.qweight.device.type == "cpu" and back.backend(torch.device("cpu")) == "cpu"


@needs_gpu
def test_bad_inputs_raise():
    layer = make_layer(7, 70, 4, 32)[0].cuda()
    with pytest.raises(ValueError, match="on a CUDA device"):
        kernels_cuda_glut.glut_matmul(torch.zeros(1, 70), layer)
    with pytest.raises(ValueError, match=r"shape \(batch, 70\)"):
        kernels_cuda_glut.glut_matmul(torch.zeros(1, 69, device="cuda"), layer)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        kernels_cuda_glut.glut_matmul(torch.zeros(1, 70, device="cuda", dtype=torch.float64), layer)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        kernels_cuda_glut.glut_dequantize(layer, torch.int32, "cuda")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernels_cuda_glut.glut_dequantize(layer, torch.float32, "cpu")
    with pytest.raises(ValueError, match="is on cpu"):
        kernels_cuda_glut.glut_matmul(torch.zeros(1, 70, device="cuda"), layer.cpu())


@pytest.mark.skipif(kernels_cuda_glut.available(), reason="tests the missing-kernel path")
def test_without_the_kernels_a_clear_error_and_the_cpu_path_unchanged():
    layer, W = make_layer(7, 70, 4, 32)
    with pytest.raises(RuntimeError, match="CUDA glut kernels are not available"):
        kernels_cuda_glut.glut_matmul(torch.zeros(1, 70), layer)
    with pytest.raises(RuntimeError, match="CUDA glut kernels are not available"):
        kernels_cuda_glut.glut_dequantize(layer, torch.float32, "cpu")
    assert layer.backend(torch.device("cpu")) == "cpu"
    assert layer.backend(torch.device("cuda")) == "cuda-dequantize (no CUDA glut kernels built)"
    assert "cuda" in GlutQuantLinear.supports["devices"]
    assert isinstance(kernels_cuda_glut.GEMV_MAX_BATCH, int) and kernels_cuda_glut.GEMV_MAX_BATCH >= 1
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(0))
    y = layer(x).double().numpy()
    ref, bound = forward_bound(x.double().numpy(), W.astype(np.float64),
                               layer.bias.double().numpy(), torch.float32, False)
    assert np.all(np.abs(y - ref) <= bound)
