"""The CUDA VQ kernels (sqllm.kernels_cuda_vq) against float64 on a GPU.

Skipped cleanly without a GPU or without a CUDA build; the kernels' logic is
also tested on every run on the host emulator (tests/cpp/cuda_emulation/
test_vq_cuda_emulated.cpp).  The reference is the float64 decode of the
documented layout (test_vptq.upstream_decode), and the tolerance the bound of
an fp32 sum in any order (see cuda/vq_matmul.cu).
"""
import numpy as np
import pytest
import torch

from sqllm import kernels_cuda_vq

from test_vptq import random_layer, reference

needs_gpu = pytest.mark.skipif(not kernels_cuda_vq.available(),
                               reason="needs a CUDA device and sqllm built with CUDA")

U = 2.0 ** -24
U_OUT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 0.0}
ABS_OUT = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134, torch.float32: 0.0}


CONFIGS = [
    dict(in_f=200, out_f=70, v=4, k=16, kr=0, perm=False, norm=False),
    dict(in_f=300, out_f=77, v=6, k=256, kr=16, groups=2, outliers=7, vo=3, ko=5),
    dict(in_f=1030, out_f=48, v=16, k=4096, kr=0),
    dict(in_f=5000, out_f=40, v=8, k=65536, kr=256),  # several x tiles, 24-bit slots
]


@needs_gpu
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_gemv_equals_float64(cfg, dtype, batch):
    layer = random_layer(**cfg, seed=batch)
    W, mag = reference(layer)
    layer = layer.cuda()
    x = torch.randn(batch, cfg["in_f"], generator=torch.Generator().manual_seed(5)).to(dtype)
    y = kernels_cuda_vq.vq_matmul(x.cuda(), layer, bias=True).cpu().double().numpy()
    xd = x.double().numpy()
    bias = layer.bias.cpu().double().numpy()
    ref = xd @ W.T + bias
    gam = (cfg["in_f"] + 10) * U / (1 - (cfg["in_f"] + 10) * U)
    m = np.abs(xd) @ mag.T + np.abs(bias)
    bound = gam * m + U_OUT[dtype] * (np.abs(ref) + gam * m) + ABS_OUT[dtype]
    assert np.all(np.abs(y - ref) <= bound), float(np.max(np.abs(y - ref) / bound))


@needs_gpu
@pytest.mark.parametrize("cfg", CONFIGS[:2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_equals_float64(cfg, dtype):
    layer = random_layer(**cfg)
    W, mag = reference(layer)
    w = kernels_cuda_vq.vq_dequantize(layer.cuda(), dtype, "cuda").cpu().double().numpy()
    e32 = 3 * U * mag
    assert np.all(np.abs(w - W) <= e32 + U_OUT[dtype] * (np.abs(W) + e32) + ABS_OUT[dtype])


@needs_gpu
@pytest.mark.parametrize("batch", [1, 8, 20])
def test_layer_forward_on_cuda_matches_cpu(batch, caplog):
    layer = random_layer(**CONFIGS[1])
    x = torch.randn(batch, 300, generator=torch.Generator().manual_seed(1))
    ref = layer(x).double()
    with caplog.at_level("INFO", logger="sqllm.nn_vq"):
        got = layer.cuda()(x.cuda()).cpu().double()
    assert not any("dequantizing and using F.linear" in r.message for r in caplog.records)
    assert layer.backend(torch.device("cuda")) == "cuda"
    # both are fp32 sums of the same products: within twice the bound of one
    _, mag = reference(layer.cpu())
    gam = 310 * U / (1 - 310 * U)
    m = np.abs(x.double().numpy()) @ mag.T + np.abs(layer.bias.double().numpy())
    assert np.all(np.abs(got.numpy() - ref.numpy()) <= 2 * gam * m + 1e-6)


@needs_gpu
def test_bad_inputs_raise():
    layer = random_layer(**CONFIGS[0]).cuda()
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        kernels_cuda_vq.vq_matmul(torch.zeros(1, 200), layer)
    with pytest.raises(ValueError, match=r"shape \(batch, 200\)"):
        kernels_cuda_vq.vq_matmul(torch.zeros(1, 199, device="cuda"), layer)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        kernels_cuda_vq.vq_matmul(torch.zeros(1, 200, device="cuda", dtype=torch.float64), layer)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        kernels_cuda_vq.vq_dequantize(layer, torch.int32, "cuda")


@pytest.mark.skipif(kernels_cuda_vq.available(), reason="tests the missing-kernel path")
def test_without_the_kernels_a_clear_error():
    layer = random_layer(**CONFIGS[0])
    with pytest.raises(RuntimeError, match="CUDA VQ kernels are not available"):
        kernels_cuda_vq.vq_matmul(torch.zeros(1, 200), layer)
    assert layer.backend(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():  # GPU but no CUDA build: the dense fallback is named
        assert "cuda-dequantize" in layer.backend(torch.device("cuda"))
