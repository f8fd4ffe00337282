"""Shared fixtures: a tiny random LLaMA and a byte-level tokenizer (no downloads)."""
from __future__ import annotations

import pytest
import torch


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's reversible byte <-> printable-unicode map, so every byte is a token.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def byte_tokenizer():
    return _byte_tokenizer()


def make_tiny_llama(seed: int = 0, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=tie,
                      bos_token_id=256, eos_token_id=256, pad_token_id=256)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture()
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture()
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (4, 32), generator=g)


@pytest.fixture()
def tiny_model_dir(tmp_path, byte_tokenizer):
    """A saved tiny LLaMA folder with tokenizer, and a small text file."""
    model = make_tiny_llama()
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    byte_tokenizer.save_pretrained(d)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession "
                    "of a good fortune, must be in want of a wife. " * 40)
    return d, text
