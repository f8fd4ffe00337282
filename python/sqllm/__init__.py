"""sqllm: post-training weight quantization of LLMs with C++/CUDA kernels.

Main entry points::

    import sqllm
    model = sqllm.quantize(model, method="squeezellm", bits=3,
                           calibration="austen:emma", tokenizer=tok)
    sqllm.save_quantized(model, "out/", tokenizer=tok)
    model = sqllm.load_quantized("out/")

See README.md and docs/ for the formats and algorithms.
"""
from __future__ import annotations

import logging
from typing import Tuple

import numpy as np

from . import _C
from ._version import __version__
from .api import quantize, size_report
from .calib import open_on_meta
from .calibration import find_linear_layers, fisher_diagonal
from .config import (FORMAT_VERSION, CalibrationConfig, LayerFormat, QuantizationConfig,
                     QuantizationConfigError, method_options)
from ._hf_hook import install_transformers_integration
from .io import load_quantized, read_quantization_config, save_quantized
from .methods import METHODS, QuantMethod, get_method, register_method
from .nn import FORMATS, QuantLinear, QuantLinearBase, register_format
from .nn_uniform import UniformQuantLinear
from .gptq import GptqResult, gptq_quantize
from .nn_vq import VQQuantLinear
from .vptq import vptq_quantize
from .nn_ptq161 import PTQ161QuantLinear
from . import ptq161 as _ptq161  # registers the "ptq161" method
from .nn_glut import GlutQuantLinear
from .glut import glut_quantize
from . import fastdecode  # sqllm.fastdecode.generate: the C++ LLaMA decode path

__all__ = [
    "CalibrationConfig",
    "FORMATS",
    "FORMAT_VERSION",
    "GlutQuantLinear",
    "PTQ161QuantLinear",
    "GptqResult",
    "LayerFormat",
    "METHODS",
    "QuantLinear",
    "QuantLinearBase",
    "QuantMethod",
    "QuantizationConfig",
    "QuantizationConfigError",
    "__version__",
    "find_linear_layers",
    "fisher_diagonal",
    "get_method",
    "glut_quantize",
    "gptq_quantize",
    "vptq_quantize",
    "has_cuda",
    "kmeans1d",
    "load_quantized",
    "method_options",
    "open_on_meta",
    "quantize",
    "read_quantization_config",
    "register_format",
    "register_method",
    "save_quantized",
    "size_report",
    "UniformQuantLinear",
    "VQQuantLinear",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())

# transformers.AutoModelForCausalLM.from_pretrained(<sqllm folder>) works after
# `import sqllm`: the quantizer is registered now if transformers' quantizers are
# loaded, else the moment they are (importing them here would cost seconds).
install_transformers_integration()


def has_cuda() -> bool:
    """True when the CUDA kernels were compiled in and a CUDA device is visible."""
    return bool(_C.cuda_compiled()) and int(_C.cuda_device_count()) > 0


def kmeans1d(values, weights=None, k: int = 8, method: str = "exact",
             max_iter: int = 50) -> Tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means.

    Parameters
    ----------
    values : array_like (n,)
        NumPy array or torch tensor of floats (no NaN/Inf).
    weights : array_like (n,), optional
        Non-negative weights (None: all ones; all zero: treated as all ones).
    k : int
        Number of clusters.
    method : {"exact", "lloyd"}
        "exact": the globally optimal weighted SSE (dynamic programming);
        "lloyd": fast Lloyd iterations on sorted values from a near-optimal start.

    Returns
    -------
    (centroids float32 (k,), ascending; labels int32 (n,), the nearest centroid)
    """
    x = _as_1d_float(values, "values")
    w = None if weights is None else _as_1d_float(weights, "weights")
    if w is not None and w.shape != x.shape:
        raise ValueError(f"values and weights must have the same shape, got {x.shape} and {w.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if method not in ("exact", "lloyd"):
        raise ValueError(f"method must be 'exact' or 'lloyd', got {method!r}")
    centroids, labels, _ = _C.kmeans1d(x, w, int(k), method, int(max_iter))
    return centroids, labels


def _as_1d_float(a, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)
