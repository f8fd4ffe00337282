"""Tests for sqllm.evaluate.perplexity against a float64 reference, on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from sqllm.evaluate import PerplexityResult, perplexity

VOCAB = 97


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    # Larger-than-default weights so the predictions are far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (1, 7 * 24 + 5), generator=gen)  # 7 windows of 24, 5 left over


@pytest.fixture(scope="module")
def base(tiny_llama, tokens):
    return perplexity(tiny_llama, tokens, seqlen=24, progress=False)


def reference_nll(model, ids: torch.Tensor, seqlen: int) -> float:
    """Mean NLL over non-overlapping windows, log-softmax in float64."""
    n = ids.shape[1] // seqlen
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            window = ids[:, i * seqlen : (i + 1) * seqlen]
            logits = model(window).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= logp.gather(1, window[0, 1:, None]).sum().item()
            count += seqlen - 1
    return total / count


def test_matches_float64_reference(tiny_llama, tokens, base):
    res = base
    ref = reference_nll(tiny_llama, tokens, 24)
    assert isinstance(res, PerplexityResult)
    assert (res.n_windows, res.seqlen, res.n_tokens_evaluated) == (7, 24, 7 * 23)
    assert res.nll == pytest.approx(ref, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(ref), rel=1e-5)
    assert 1.0 < res.ppl and abs(res.ppl - VOCAB) > 5  # a real, non-uniform model


@pytest.mark.parametrize("batch_size", [3, 100])
def test_batch_size_does_not_change_result(tiny_llama, tokens, base, batch_size):
    many = perplexity(tiny_llama, tokens, seqlen=24, batch_size=batch_size, progress=False)
    assert many.n_windows == 7
    assert many.nll == pytest.approx(base.nll, rel=1e-6)


def test_windows_are_independent_and_remainder_dropped(tiny_llama, tokens, base):
    changed = tokens.clone()
    changed[0, 7 * 24 :] = (changed[0, 7 * 24 :] + 1) % VOCAB  # only the dropped remainder
    assert perplexity(tiny_llama, changed, seqlen=24, progress=False).nll == base.nll
    # the mean over all windows equals the mean of per-window results (equal token counts)
    per_window = [
        perplexity(tiny_llama, tokens[:, i * 24 : (i + 1) * 24], seqlen=24, progress=False).nll for i in range(7)
    ]
    assert base.nll == pytest.approx(sum(per_window) / 7, rel=1e-6)


def test_max_tokens_and_1d_input(tiny_llama, tokens):
    res = perplexity(tiny_llama, tokens[0], seqlen=24, max_tokens=3 * 24 + 10, progress=False)
    assert res.n_windows == 3
    assert res.nll == pytest.approx(reference_nll(tiny_llama, tokens[:, : 3 * 24], 24), rel=1e-5)


def test_uniform_model_has_perplexity_vocab_size(tokens):
    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, VOCAB)

    res = perplexity(Uniform(), tokens, seqlen=16, progress=False)
    assert res.ppl == pytest.approx(VOCAB, rel=1e-6)


def test_eval_mode_during_call_and_training_mode_restored(tiny_llama, tokens):
    modes = []
    handle = tiny_llama.model.layers[0].register_forward_hook(lambda m, i, o: modes.append(m.training))
    tiny_llama.train()
    try:
        perplexity(tiny_llama, tokens, seqlen=24, max_tokens=48, progress=False)
    finally:
        handle.remove()
        training_after = tiny_llama.training
        tiny_llama.eval()
    assert modes == [False, False]
    assert training_after


def test_progress_bar_can_be_silenced(tiny_llama, tokens, capsys):
    perplexity(tiny_llama, tokens, seqlen=24, max_tokens=48, progress=False)
    assert capsys.readouterr().err == ""
    perplexity(tiny_llama, tokens, seqlen=24, max_tokens=48, progress=True)
    assert "perplexity" in capsys.readouterr().err


def test_errors(tiny_llama, tokens):
    with pytest.raises(ValueError, match="173 tokens, need at least seqlen=2048"):
        perplexity(tiny_llama, tokens, seqlen=2048, progress=False)
    with pytest.raises(ValueError, match=r"20 tokens \(after max_tokens\)"):
        perplexity(tiny_llama, tokens, seqlen=24, max_tokens=20, progress=False)
    with pytest.raises(ValueError, match=r"shape \[1, T\]"):
        perplexity(tiny_llama, tokens.expand(2, -1), seqlen=24, progress=False)
    with pytest.raises(ValueError, match="integer"):
        perplexity(tiny_llama, tokens.float(), seqlen=24, progress=False)
    with pytest.raises(ValueError, match="seqlen"):
        perplexity(tiny_llama, tokens, seqlen=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(tiny_llama, tokens, seqlen=24, batch_size=0, progress=False)
