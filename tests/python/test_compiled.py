"""torch.compile path (sqllm.compiled): the kernels as torch custom ops, and greedy
decoding with a static cache and a compiled decode step, against the eager path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sqllm
from sqllm import compiled
from sqllm.nn import QuantLinear
from sqllm.nn_embedding import QuantEmbedding

from conftest import make_tiny_llama


def _random_layer(out: int, inp: int, bits: int, axis: str, sparsity: float, bias: bool,
                  seed: int) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return QuantLinear.from_weight(w, bits=bits, group_axis=axis, kmeans="lloyd",
                                   sparsity=sparsity, bias=b)


CASES = [(7, 13, 3, "row", 0.0, False), (33, 70, 4, "column", 0.0, True),
         (16, 96, 2, "row", 0.05, True), (5, 1, 4, "row", 0.0, False)]


@pytest.mark.parametrize("out,inp,bits,axis,sparsity,bias", CASES)
def test_lut_matmul_op_equals_eager_and_reference(out, inp, bits, axis, sparsity, bias):
    layer = _random_layer(out, inp, bits, axis, sparsity, bias, seed=out * inp)
    x = torch.randn(3, 2, inp, generator=torch.Generator().manual_seed(5))
    eager = layer(x)
    # the same kernel, called through the custom op inside a traced graph
    traced = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(traced, eager)
    # float64 reference: x @ Ŵᵀ + b with Ŵ dequantized (tables, codes, sparse part)
    ref = x.double() @ layer.dequantize().double().T
    if bias:
        ref = ref + layer.bias.double()
    # fp32 kernel vs float64: |err| <= in * eps32 * sum|x||w| (a dot product of `in` terms)
    bound = inp * 2.0 ** -23 * (x.double().abs() @ layer.dequantize().double().abs().T) + 1e-12
    assert ((traced.double() - ref).abs() <= bound + 2.0 ** -23 * ref.abs()).all()


def test_custom_ops_pass_opcheck():
    layer = _random_layer(16, 96, 2, "row", 0.05, False, seed=3)
    b = layer._buffers
    x = torch.randn(4, 96)
    torch.library.opcheck(torch.ops.sqllm.lut_matmul.default,
                          (x, b["qweight"], b["lookup_table"], 2, 96, "row", b["sparse_row_ptr"],
                           b["sparse_col_idx"], b["sparse_values"]))
    torch.library.opcheck(torch.ops.sqllm.lut_matmul.default,
                          (x, b["qweight"], b["lookup_table"], 2, 96, "row", None, None, None))
    torch.library.opcheck(torch.ops.sqllm.lut_rows.default,
                          (b["qweight"][:3], b["lookup_table"][:3], 96, 2))


def test_embedding_traced_equals_eager():
    layer = _random_layer(50, 24, 4, "row", 0.0, False, seed=9)
    emb = QuantEmbedding(layer, tied=True)
    ids = torch.tensor([[0, 49, 7], [7, 3, 3]])
    eager = emb(ids)
    traced = torch.compile(emb, backend="aot_eager", fullgraph=True)(ids)
    assert torch.equal(traced, eager)
    w = layer.dequantize()
    assert torch.equal(eager, w[ids])


def test_prepare_rejects_corrupt_buffers():
    model = make_tiny_llama(3)
    sqllm.quantize(model, bits=3, weighted=False, kmeans="lloyd", progress=False)
    q = model.model.layers[0].mlp.down_proj
    q.lookup_table[0, 0] = float("nan")
    with pytest.raises(ValueError, match="lookup_table"):
        compiled.prepare_for_compile(model)


# inductor's own imports touch the deprecated torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_generate_logits_equal_eager(backend):
    model = make_tiny_llama(1)
    sqllm.quantize(model, bits=4, weighted=False, kmeans="lloyd", progress=False,
                   quantize_embeddings=4)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        eager = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               **kw)
        comp = compiled.generate(model, ids, backend=backend, **kw)
        again = compiled.generate(model, ids, backend=backend, **kw)  # reuses the graph
    assert torch.equal(comp.sequences, eager.sequences)
    assert torch.equal(again.sequences, eager.sequences)
    for a, b in zip(comp.logits, eager.logits):
        # The static cache attends over its full length with masked slots (the
        # eager dynamic cache over the tokens so far): softmax and P·V sum in
        # another order, fp32 rounding of ~2^-24 relative per term (measured:
        # 6e-8 on logits of 0.8).  Inductor further fuses RMSNorm, rotary and
        # softmax with other reduction orders.  A wrong kernel, code or cache
        # slot changes logits by O(0.1); the bounds are far below that.
        tol = 1e-5 if backend == "aot_eager" else 1e-4
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())
