"""``torch.compile`` support: sqllm's CPU kernels as torch custom ops, and greedy
decoding with a static KV cache and a compiled decode step.

Eager decoding of a small model spends most of its time in transformers' Python
(RMSNorm, rotary embeddings, attention, cache bookkeeping: thousands of module
calls per token).  ``torch.compile`` removes that, but only if the quantized
layers do not break the graph: their kernels are called through NumPy.  Here
the two CPU kernels the decode step needs are registered as torch operators
(``torch.library``, with fake implementations that give the output shape), and :class:`~sqllm.QuantLinear` / :class:`~sqllm.QuantEmbedding` call them
when they are being traced (``torch.compiler.is_compiling()``); eager calls keep
their own path unchanged.

* ``sqllm::lut_matmul(x, qweight, lookup_table, bits, in_features, group_axis,
  row_ptr, col_idx, values)`` -- y = x Ŵᵀ (fp32, CPU), the same C++ kernel as the
  eager path (``_C.lut_matmul``);
* ``sqllm::lut_rows(codes, tables, dim, bits)`` -- the fp32 rows of gathered
  row-grouped codes (``_C.nuq_dequantize``), the embedding lookup.

:func:`generate` runs ``model.generate`` greedily with
``cache_implementation="static"`` and transformers' compile of the decode step
(``CompileConfig``; transformers compiles only on GPUs unless told otherwise).
The prompt (prefill) runs eagerly; the first decode step compiles (tens of
seconds on a small CPU), later calls of the same shapes reuse it.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from . import _C

__all__ = ["generate", "prepare_for_compile"]


# Defined with the low-level torch.library.Library API rather than
# torch.library.custom_op: the decode step calls these ~200 times per token and
# custom_op's wrappers (autograd and dynamo guards around the Python kernel)
# cost about as much as a 576-wide layer's kernel (measured 45 vs 26 µs a call
# on the loaded box, 10 µs of which is the kernel).  No autograd formula: the
# compiled path is for inference (QuantLinear's eager path keeps its gradient).
_lib = torch.library.Library("sqllm", "DEF")
_lib.define("lut_matmul(Tensor x, Tensor qweight, Tensor lookup_table, int bits, "
            "int in_features, str group_axis, Tensor? row_ptr, Tensor? col_idx, "
            "Tensor? values) -> Tensor")
_lib.define("lut_rows(Tensor codes, Tensor tables, int dim, int bits) -> Tensor")


def lut_matmul(x: Tensor, qweight: Tensor, lookup_table: Tensor, bits: int, in_features: int,
               group_axis: str, row_ptr: Optional[Tensor], col_idx: Optional[Tensor],
               values: Optional[Tensor]) -> Tensor:
    """x (N, in) fp32 -> (N, out) fp32 through the CPU LUT kernel (no bias);
    the C++ side checks shapes, dtypes and the CSR part."""
    sparse = None
    if row_ptr is not None and col_idx is not None and values is not None and values.numel():
        sparse = (row_ptr.numpy(), col_idx.numpy(), values.numpy().view(np.uint16))
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    return torch.from_numpy(_C.lut_matmul(x.numpy(), qweight.numpy().view(np.uint32),
                                          lookup_table.numpy(), bits, in_features, group_axis,
                                          sparse, 0, False))


def lut_rows(codes: Tensor, tables: Tensor, dim: int, bits: int) -> Tensor:
    """Rows of packed row-grouped codes (R, words) with their tables (R, 2^bits) -> (R, dim)."""
    return torch.from_numpy(_C.nuq_dequantize(
        codes.contiguous().numpy().view(np.uint32),
        tables.to(torch.float32).contiguous().numpy(), dim, bits, "row"))


_lib.impl("lut_matmul", lut_matmul, "CPU")
_lib.impl("lut_rows", lut_rows, "CPU")


@torch.library.register_fake("sqllm::lut_matmul")
def _lut_matmul_fake(x: Tensor, qweight: Tensor, lookup_table: Tensor, bits: int,
                     in_features: int, group_axis: str, row_ptr: Optional[Tensor],
                     col_idx: Optional[Tensor], values: Optional[Tensor]) -> Tensor:
    torch._check(x.dim() == 2 and x.shape[1] == in_features)
    return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)


@torch.library.register_fake("sqllm::lut_rows")
def _lut_rows_fake(codes: Tensor, tables: Tensor, dim: int, bits: int) -> Tensor:
    return codes.new_empty((codes.shape[0], dim), dtype=torch.float32)


def quant_linear_forward(layer: Any, x: Tensor) -> Tensor:
    """QuantLinear's forward as traced by torch.compile (CPU, any float dtype)."""
    shape = x.shape
    x2 = x.reshape(-1, layer.in_features)
    b = layer._buffers
    sparse = layer.nnz > 0
    y = torch.ops.sqllm.lut_matmul(
        x2.to(torch.float32).contiguous(), b["qweight"], b["lookup_table"], layer.bits, layer.in_features,
        layer.group_axis, b["sparse_row_ptr"] if sparse else None,
        b["sparse_col_idx"] if sparse else None, b["sparse_values"] if sparse else None)
    bias = b.get("bias")
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).view(*shape[:-1], layer.out_features)


def quant_embedding_forward(emb: Any, ids: Tensor) -> Tensor:
    """QuantEmbedding's forward as traced by torch.compile (CPU)."""
    s = emb.storage
    flat = ids.reshape(-1).to(torch.int64)
    codes = s._buffers["qweight"].index_select(0, flat)  # raises on ids out of range
    tables = s._buffers["lookup_table"].index_select(0, flat)
    w = torch.ops.sqllm.lut_rows(codes, tables, emb.embedding_dim, s.bits)
    return w.to(emb.out_dtype).view(*ids.shape, emb.embedding_dim)


def prepare_for_compile(model: torch.nn.Module) -> torch.nn.Module:
    """Validate every quantized layer's buffers now (the compiled path does not
    re-check them per call) and check that they are on the CPU; returns the model."""
    from .nn import QuantLinear

    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if not m.qweight.is_cpu:
                raise ValueError(f"layer {name!r}: the compiled path runs on the CPU, its buffers "
                                 f"are on {m.qweight.device}")
            m.validate()
    return model


def generate(model: torch.nn.Module, input_ids: Tensor, max_new_tokens: int,
             attention_mask: Optional[Tensor] = None, fullgraph: bool = True,
             backend: str = "inductor", **generate_kwargs: Any) -> Any:
    """Greedy ``model.generate`` with a static KV cache and a compiled decode step.

    Parameters
    ----------
    model : a transformers causal LM on the CPU (quantized by sqllm or not)
    input_ids : LongTensor [batch, prompt]
    max_new_tokens : int
    fullgraph : bool
        Compile the decode step as one graph (default): a graph break raises
        instead of silently falling back to Python.
    backend : str
        ``torch.compile`` backend ("inductor": generated C++; "aot_eager" traces
        without code generation, for tests).
    **generate_kwargs :
        Passed to ``model.generate`` (e.g. ``output_logits=True,
        return_dict_in_generate=True``).
    """
    from transformers import CompileConfig

    prepare_for_compile(model)
    cc = CompileConfig(fullgraph=fullgraph, dynamic=False, mode="default", backend=backend)
    cc._compile_all_devices = True  # transformers compiles on GPUs only by default
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    generate_kwargs.setdefault("do_sample", False)
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          cache_implementation="static", compile_config=cc, **generate_kwargs)
