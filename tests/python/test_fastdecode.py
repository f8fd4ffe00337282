"""sqllm.fastdecode: the C++ LLaMA decoder against transformers' eager model.

Reference: the same model in float64 (every quantized layer replaced by an
nn.Linear / nn.Embedding holding its dequantized weight, which fp32 and fp64
represent exactly), run step by step by transformers (eager attention,
its cache) on the tokens fastdecode produced (teacher forcing, so the two
stay on one sequence).

Tolerance: fastdecode and transformers' fp32 eager forward evaluate the same
function in fp32 and differ from the float64 value only by rounding, under the
same forward-error model (each dot product of n terms within γ_n·Σ|terms|,
propagated through the same layers); they differ in summation order (blocked
SIMD sums vs torch's), which changes which errors occur, not their size.  So
the measured error of transformers' fp32 run against the float64 reference
is the scale of that bound for these very inputs, and fastdecode may be off
by at most 8× it (plus 1e-6 of the largest logit, for a reference error that
happens to be ~0).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sqllm
from sqllm import _C, fastdecode
from sqllm.api import set_module
from sqllm.nn import QuantLinearBase
from sqllm.nn_embedding import QuantEmbedding


def _tiny(seed=0, hidden=48, heads=6, kv=2, head_dim=None, inter=100, vocab=97, layers=2,
          tie=True, rope=None, bias=False, act="silu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              max_position_embeddings=256, tie_word_embeddings=tie, attention_bias=bias,
              mlp_bias=bias, hidden_act=act, rms_norm_eps=1e-5)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if rope is not None:
        kw["rope_parameters"] = dict(rope, rope_theta=10000.0)
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 and biases non-zero, so both are exercised
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


CASES = {
    # 4-bit LUT layers (AVX-512 word-aligned path: in=136 >= 128, with a tail),
    # 4-bit embedding tied to lm_head, GQA 4/2, head_dim 34.
    "lut4-tied-emb4": dict(model=dict(hidden=136, heads=4, kv=2, inter=100, tie=True),
                           quant=dict(method="squeezellm", bits=4, quantize_embeddings=4)),
    # 3-bit column grouping with a sparse part, untied 3-bit embedding, fp32
    # lm_head, linear rope scaling, 6 heads / 3 kv heads.
    "lut3-col-sparse-untied-linear": dict(
        model=dict(hidden=48, heads=6, kv=3, inter=70, vocab=61, tie=False,
                   rope=dict(rope_type="linear", factor=2.0)),
        quant=dict(method="squeezellm", bits=3, group_axis="column", sparsity=0.02,
                   quantize_embeddings=3)),
    # Uniform (RTN, groups of 32 over 64 / 90 columns), attention and MLP
    # biases, llama3 rope, multi-query attention, fp32 embedding.
    "uniform4-bias-llama3-mqa": dict(
        model=dict(hidden=64, heads=4, kv=1, inter=90, bias=True,
                   rope=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16)),
        quant=dict(method="rtn", bits=4, group_size=32)),
    # Unquantized fp32, yarn rope (attention scaling != 1), head_dim 12 with
    # heads*head_dim != hidden, a prompt of 70 tokens (prefill's batched path).
    "fp32-yarn-headdim": dict(
        model=dict(hidden=40, heads=4, kv=2, head_dim=12, inter=56, tie=False,
                   rope=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
        quant=None, prompt=70),
    # 2-bit rows (word-aligned path at in=272 >= 256), 8-bit embedding (uniform
    # grid per row), prompt of 70 (lut_matmul's GEMM path in prefill).
    "lut2-emb8-long-prompt": dict(model=dict(hidden=272, heads=4, kv=2, inter=64, vocab=50),
                                  quant=dict(method="squeezellm", bits=2, quantize_embeddings=8),
                                  prompt=70),
}


def _build(case):
    spec = CASES[case]
    model = _tiny(**spec["model"])
    if spec["quant"] is not None:
        q = dict(spec["quant"])
        method = q.pop("method")
        extra = dict(kmeans="lloyd", weighted=False) if method == "squeezellm" else {}
        sqllm.quantize(model, method=method, progress=False, **extra, **q)
    return model, spec.get("prompt", 5)


def _reference64(model):
    """The model in float64 with every quantized layer dequantized."""
    ref = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinearBase):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            set_module(ref, name, lin)
        elif isinstance(m, QuantEmbedding):
            emb = nn.Embedding(m.num_embeddings, m.embedding_dim)
            with torch.no_grad():
                emb.weight.copy_(m.dequantize())
            set_module(ref, name, emb)
    return ref.double().eval()


@torch.no_grad()
def _hf_step_logits(model, seq, prompt_len):
    """transformers' logits for each new token of seq (prefill, then one step each)."""
    out = model(seq[:, :prompt_len], use_cache=True)
    logits = [out.logits[0, -1]]
    for t in range(prompt_len, seq.shape[1] - 1):
        out = model(seq[:, t:t + 1], cache=out.cache, use_cache=True)
        logits.append(out.logits[0, -1])
    return torch.stack(logits).double()


def _assert_close(ours, hf32, ref64):
    err_hf = (hf32 - ref64).abs().max().item()
    err = (ours.double() - ref64).abs().max().item()
    bound = 8 * err_hf + 1e-6 * ref64.abs().max().item()
    assert err <= bound, f"fastdecode error {err:.3g} > bound {bound:.3g} (fp32 HF error {err_hf:.3g})"


def _check_greedy(ours_logits, new_tokens, ref64):
    # Each token is the argmax of fastdecode's logits, and that of the float64
    # reference wherever its top two are not within rounding of each other.
    assert torch.equal(ours_logits.argmax(dim=1), new_tokens)
    top2 = ref64.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * ref64.abs().max()
    assert clear.any()
    assert torch.equal(ref64.argmax(dim=1)[clear], new_tokens[clear])


@pytest.mark.parametrize("case", list(CASES))
def test_step_logits_equal_hf_eager(case):
    model, prompt_len = _build(case)
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    new = 6
    seq, logits = fastdecode.generate(model, prompt, new, output_logits=True)
    assert seq.shape == (1, prompt_len + new) and torch.equal(seq[:, :prompt_len], prompt)
    assert logits.shape == (new, vocab) and logits.dtype == torch.float32
    hf32 = _hf_step_logits(model, seq, prompt_len)
    ref64 = _hf_step_logits(_reference64(model), seq, prompt_len)
    _assert_close(logits, hf32, ref64)
    _check_greedy(logits, seq[0, prompt_len:], ref64)


@pytest.mark.parametrize("kernel", _C.cpu_kernels())
def test_every_cpu_kernel_path(kernel):
    model, prompt_len = _build("lut4-tied-emb4")
    prompt = torch.arange(1, 1 + prompt_len).unsqueeze(0)
    seq, logits = fastdecode.generate(model, prompt, 5, output_logits=True, kernel=kernel)
    hf32 = _hf_step_logits(model, seq, prompt_len)
    ref64 = _hf_step_logits(_reference64(model), seq, prompt_len)
    _assert_close(logits, hf32, ref64)


def test_threads_do_not_change_results():
    # Each output row, attention head and norm is computed by one thread in a
    # fixed order: one and two threads give identical logits.
    model, _ = _build("lut4-tied-emb4")
    prompt = torch.tensor([[5, 9, 2, 77, 13]])
    s1, l1 = fastdecode.generate(model, prompt, 6, output_logits=True, num_threads=1)
    s2, l2 = fastdecode.generate(model, prompt, 6, output_logits=True, num_threads=2)
    assert torch.equal(s1, s2) and torch.equal(l1, l2)


def test_step_api_and_eos():
    model, _ = _build("lut4-tied-emb4")
    prompt = torch.tensor([3, 1, 4, 1, 5])
    seq, logits = fastdecode.generate(model, prompt, 4, output_logits=True)
    dec = fastdecode.FastDecoder(model, capacity=8)
    assert dec.position == 0 and dec.capacity == 8
    steps = [dec.forward(prompt)]
    for t in seq[0, 5:8]:
        steps.append(dec.forward([int(t)]))
    assert dec.position == 8
    assert torch.equal(torch.stack(steps), logits)
    with pytest.raises(ValueError, match="capacity"):
        dec.forward([1])
    dec.reset()
    assert torch.equal(dec.forward(prompt), logits[0])
    # eos: stops right after the first occurrence
    eos = int(seq[0, 6])
    out = fastdecode.generate(model, prompt, 4, eos_token_id=eos)
    assert torch.equal(out, seq[:, :7]) or int(seq[0, 5]) == eos


def test_bad_inputs_refused():
    model, _ = _build("lut4-tied-emb4")
    with pytest.raises(ValueError, match="batch 1"):
        fastdecode.generate(model, torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="empty"):
        fastdecode.generate(model, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="outside"):
        fastdecode.generate(model, torch.tensor([[1, 97]]), 2)
    with pytest.raises(ValueError, match="outside"):
        fastdecode.generate(model, torch.tensor([[-1]]), 2)
    with pytest.raises(ValueError, match="integers"):
        fastdecode.generate(model, torch.zeros(1, 3), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fastdecode.generate(model, torch.tensor([[1]]), 0)
    with pytest.raises(ValueError, match="attention_mask"):
        fastdecode.generate(model, torch.tensor([[1, 2]]), 2,
                            attention_mask=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="cpu kernel"):
        fastdecode.generate(model, torch.tensor([[1]]), 2, kernel="neon")


def test_unsupported_models_refused():
    from transformers import MistralConfig, MistralForCausalLM

    m = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=40,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2))
    with pytest.raises(ValueError, match="LLaMA"):
        fastdecode.generate(m, torch.tensor([[1]]), 2)
    with pytest.raises(ValueError, match="hidden_act"):
        fastdecode.generate(_tiny(act="gelu"), torch.tensor([[1]]), 2)
    with pytest.raises(ValueError, match="dynamic"):
        fastdecode.generate(_tiny(rope=dict(rope_type="dynamic", factor=2.0)),
                            torch.tensor([[1]]), 2)
    with pytest.raises(ValueError, match="float32"):
        fastdecode.generate(_tiny().to(torch.bfloat16), torch.tensor([[1]]), 2)
    odd = _tiny()
    odd.model.layers[1].mlp.up_proj = nn.Sequential(odd.model.layers[1].mlp.up_proj)
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.*Sequential"):
        fastdecode.generate(odd, torch.tensor([[1]]), 2)


def test_corrupt_quantized_buffers_refused():
    model, _ = _build("lut3-col-sparse-untied-linear")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.nnz > 0
    layer.sparse_col_idx[0] = 10 ** 6
    with pytest.raises(ValueError):
        fastdecode.generate(model, torch.tensor([[1]]), 2)
    model, _ = _build("lut4-tied-emb4")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.lookup_table[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fastdecode.generate(model, torch.tensor([[1]]), 2)


@pytest.mark.slow
def test_real_model_tokens_equal_hf():
    from sqllm.models import load_model

    try:
        model, tok = load_model()
    except Exception as e:  # the offline model package is not installed
        pytest.skip(f"SmolLM2 not available: {e}")
    sqllm.quantize(model, method="squeezellm", bits=4, kmeans="lloyd", weighted=False,
                   quantize_embeddings=4, progress=False)
    model.config._attn_implementation = "eager"
    ids = tok("It is a truth universally acknowledged, that a single man",
              return_tensors="pt").input_ids
    n = 8
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    ours = fastdecode.generate(model, ids, n)
    assert torch.equal(ours, ref)
