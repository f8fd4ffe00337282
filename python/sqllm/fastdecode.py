"""Greedy decoding of LLaMA-architecture models with the whole forward pass in C++.

The eager (and even the ``torch.compile``'d) decode step of a small model
spends most of its time in per-layer Python, not in the kernels: ~210
operator calls per token on SmolLM2-135M.  :class:`FastDecoder` hands the
model's weights to a C++ decoder (``include/sqllm/llama_decode.hpp``) that runs
the whole step -- embedding, RMSNorm, RoPE, GQA attention over a preallocated
KV cache, the SiLU-gated MLP, the final norm and ``lm_head`` -- with OpenMP
inside, and the prompt (prefill) too, batched.  Nothing is copied: the C++
side reads the layers' packed buffers (and fp32 weights) where they are.

Supported (anything else raises ValueError naming it):

* ``transformers`` ``LlamaForCausalLM`` (``model_type == "llama"``; SmolLM2
  is one), float32, on the CPU, ``hidden_act == "silu"``, with or without
  attention/MLP biases, any ``head_dim``, grouped-query attention, tied or
  untied embeddings;
* RoPE types whose cos/sin depend on the position only: ``default``,
  ``linear``, ``llama3``, ``yarn``.  The cos/sin rows are computed by the
  model's own rotary module (transformers' code, its attention scaling
  included) for every position of the cache, so the C++ side applies exactly
  what transformers would;
* linear layers: ``nn.Linear`` (fp32), :class:`~sqllm.QuantLinear` (``lut``,
  row or column grouping, with its sparse part), :class:`~sqllm.UniformQuantLinear`
  (``uniform``); the embedding: ``nn.Embedding`` (fp32) or a
  :class:`~sqllm.nn_embedding.QuantEmbedding`.

Batch 1, greedy (argmax, first maximum on ties, as ``torch.argmax``).

Example::

    from sqllm import fastdecode
    out = fastdecode.generate(model, input_ids, max_new_tokens=32)   # [1, prompt + 32]
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import _C

__all__ = ["FastDecoder", "generate", "ROPE_TYPES"]

log = logging.getLogger(__name__)

#: RoPE variants whose cos/sin are a function of the position alone (the
#: decoder takes them as tables); "dynamic" and "longrope" change with the
#: sequence length and are refused.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")) or "default")


def _check_model(model: nn.Module) -> Any:
    try:
        from transformers import LlamaForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ValueError("fastdecode needs transformers") from e
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError("fastdecode supports LLaMA-architecture models (transformers' "
                         f"LlamaForCausalLM), got {type(model).__name__}")
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"fastdecode supports model_type 'llama', got {cfg.model_type!r}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"fastdecode supports hidden_act 'silu', got {cfg.hidden_act!r}")
    rt = _rope_type(cfg)
    if rt not in ROPE_TYPES:
        raise ValueError(f"fastdecode supports the RoPE types {ROPE_TYPES} (position-only "
                         f"tables), got {rt!r}")
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        raise ValueError("fastdecode does not support pretraining_tp > 1")
    return cfg


def _f32(t: Tensor, name: str) -> np.ndarray:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}: fastdecode runs on the CPU")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} is {t.dtype}: fastdecode runs float32 models (model.float())")
    return t.detach().contiguous().numpy()


def _linear(mod: nn.Module, name: str) -> Dict[str, Any]:
    """The C++ description of a linear layer (views of its buffers)."""
    from .nn import QuantLinear
    from .nn_uniform import UniformQuantLinear

    if isinstance(mod, QuantLinear) and mod.format == "lut":
        if not mod.qweight.is_cpu:
            raise ValueError(f"{name} is on {mod.qweight.device}: fastdecode runs on the CPU")
        codes, tables, sparse = mod._cpu_state()  # validated (shapes, finite tables, CSR)
        d: Dict[str, Any] = dict(kind="lut", qweight=codes, tables=tables, bits=mod.bits,
                                 axis=mod.group_axis, sparse=sparse)
    elif isinstance(mod, UniformQuantLinear):
        if not mod.qweight.is_cpu:
            raise ValueError(f"{name} is on {mod.qweight.device}: fastdecode runs on the CPU")
        mod.validate()
        qw, sc, ze, gi = mod._operands()
        d = dict(kind="uniform", qweight=qw, scales=sc, zeros=ze, g_idx=gi, bits=mod.bits,
                 group_size=mod.group_size)
    elif type(mod) is nn.Linear:
        d = dict(kind="dense", weight=_f32(mod.weight, f"{name}.weight"))
    else:
        raise ValueError(f"{name}: fastdecode runs nn.Linear, QuantLinear ('lut') and "
                         f"UniformQuantLinear ('uniform') layers, got {type(mod).__name__}")
    bias = getattr(mod, "bias", None)
    if bias is not None:
        if bias.device.type != "cpu":
            raise ValueError(f"{name}.bias is on {bias.device}: fastdecode runs on the CPU")
        bias = bias.detach().to(torch.float32).contiguous().numpy()
    d["bias"] = bias
    return d


def _embedding(emb: nn.Module) -> Dict[str, Any]:
    from .nn_embedding import QuantEmbedding

    if isinstance(emb, QuantEmbedding):
        s = emb.storage
        if not s.qweight.is_cpu:
            raise ValueError(f"the embedding is on {s.qweight.device}: fastdecode runs on the CPU")
        codes, tables, _ = s._cpu_state()
        return dict(kind="lut", qweight=codes, tables=tables, bits=s.bits, axis="row",
                    sparse=None, bias=None)
    if type(emb) is nn.Embedding:
        return dict(kind="dense", weight=_f32(emb.weight, "embed_tokens.weight"), bias=None)
    raise ValueError("fastdecode runs nn.Embedding or QuantEmbedding token embeddings, got "
                     f"{type(emb).__name__}")


def _norm(mod: nn.Module, name: str) -> np.ndarray:
    w = getattr(mod, "weight", None)
    if w is None or type(mod).__name__ != "LlamaRMSNorm":
        raise ValueError(f"{name}: expected LlamaRMSNorm, got {type(mod).__name__}")
    return _f32(w, f"{name}.weight")


class FastDecoder:
    """The C++ decoder over ``model``'s weights, with a KV cache of ``capacity`` positions.

    Parameters
    ----------
    model : transformers LlamaForCausalLM (fp32, CPU; see the module doc)
    capacity : int
        Positions the KV cache holds (prompt + new tokens - 1 for :meth:`generate`).
    num_threads : int
        OpenMP threads (0: OpenMP's default, i.e. ``OMP_NUM_THREADS``).
    kernel : {"auto", "scalar", "avx2", "avx512"}
        The LUT kernel path (``sqllm._C.cpu_kernels()`` lists this CPU's).

    The decoder reads the model's buffers in place: do not modify or move the
    model while it is in use (build a new one after any change).
    """

    def __init__(self, model: nn.Module, capacity: int, num_threads: int = 0,
                 kernel: str = "auto") -> None:
        cfg = _check_model(model)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        inner = model.model
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        emb = model.get_input_embeddings()
        embed = _embedding(emb)
        vocab = int(embed["qweight" if embed["kind"] == "lut" else "weight"].shape[0])
        layers: List[Dict[str, Any]] = []
        for i, blk in enumerate(inner.layers):
            a, m = blk.self_attn, blk.mlp
            p = f"model.layers.{i}"
            layers.append(dict(
                input_norm=_norm(blk.input_layernorm, f"{p}.input_layernorm"),
                post_norm=_norm(blk.post_attention_layernorm, f"{p}.post_attention_layernorm"),
                q=_linear(a.q_proj, f"{p}.self_attn.q_proj"),
                k=_linear(a.k_proj, f"{p}.self_attn.k_proj"),
                v=_linear(a.v_proj, f"{p}.self_attn.v_proj"),
                o=_linear(a.o_proj, f"{p}.self_attn.o_proj"),
                gate=_linear(m.gate_proj, f"{p}.mlp.gate_proj"),
                up=_linear(m.up_proj, f"{p}.mlp.up_proj"),
                down=_linear(m.down_proj, f"{p}.mlp.down_proj")))
            if getattr(a, "scaling", head_dim ** -0.5) != head_dim ** -0.5:
                raise ValueError(f"{p}.self_attn: attention scaling {a.scaling} is not "
                                 "head_dim**-0.5")
        lm_head = _linear(model.get_output_embeddings(), "lm_head")
        # cos/sin of every cache position from the model's own rotary module
        # (transformers' inv_freq and attention scaling for this rope type).
        with torch.no_grad():
            pos = torch.arange(capacity, dtype=torch.int64).unsqueeze(0)
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
        self.config = dict(hidden=int(cfg.hidden_size), intermediate=int(cfg.intermediate_size),
                           heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=vocab,
                           capacity=int(capacity), rms_eps=float(cfg.rms_norm_eps))
        self._dec = _C.LlamaDecoder(
            self.config, embed, layers, _norm(inner.norm, "model.norm"), lm_head,
            cos[0].to(torch.float32).contiguous().numpy(),
            sin[0].to(torch.float32).contiguous().numpy(), int(num_threads), str(kernel))
        self.vocab_size = vocab

    @property
    def capacity(self) -> int:
        return int(self._dec.capacity)

    @property
    def position(self) -> int:
        """Tokens in the cache."""
        return int(self._dec.position)

    @property
    def threads(self) -> int:
        return int(self._dec.threads)

    @property
    def kernel(self) -> str:
        return str(self._dec.kernel)

    def reset(self) -> None:
        """Start a new sequence."""
        self._dec.reset()

    def forward(self, ids: Union[Tensor, List[int]]) -> Tensor:
        """Run ``ids`` (1-D) at the next positions; the float32 logits [vocab] of the last."""
        return torch.from_numpy(self._dec.forward(_ids_1d(ids)))

    def generate(self, input_ids: Union[Tensor, List[int]], max_new_tokens: int,
                 output_logits: bool = False, eos_token_id: Optional[int] = None
                 ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Greedy decoding from a fresh cache; see :func:`generate`."""
        ids = _ids_1d(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if eos_token_id is not None and (isinstance(eos_token_id, bool) or
                                         not isinstance(eos_token_id, int) or eos_token_id < 0):
            raise ValueError(f"eos_token_id must be None or an int >= 0, got {eos_token_id!r}")
        toks, logits = self._dec.generate(ids, max_new_tokens, bool(output_logits),
                                          -1 if eos_token_id is None else eos_token_id)
        seq = torch.cat([torch.from_numpy(ids), torch.from_numpy(toks)]).unsqueeze(0)
        if output_logits:
            return seq, torch.from_numpy(logits)
        return seq


def _ids_1d(ids: Union[Tensor, List[int], np.ndarray]) -> np.ndarray:
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"input ids must be integers, got {ids.dtype}")
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"fastdecode decodes one sequence (batch 1), got input_ids of "
                                 f"shape {tuple(ids.shape)}")
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"input ids must be [n] or [1, n], got shape {tuple(ids.shape)}")
        arr = ids.detach().cpu().to(torch.int64).contiguous().numpy()
    else:
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"input ids must be integers, got {arr.dtype}")
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise ValueError(f"input ids must be [n] or [1, n], got shape {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size == 0:
        raise ValueError("input ids are empty")
    return arr


def generate(model: nn.Module, input_ids: Union[Tensor, List[int]], max_new_tokens: int,
             output_logits: bool = False, eos_token_id: Optional[int] = None,
             num_threads: int = 0, kernel: str = "auto",
             attention_mask: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Greedy decoding of ``model`` in C++ (prefill and every step).

    Parameters
    ----------
    model : a transformers LlamaForCausalLM on the CPU in float32 (quantized by sqllm or not)
    input_ids : LongTensor [1, prompt] (or [prompt])
    max_new_tokens : int
        Tokens to generate (exactly that many unless ``eos_token_id`` comes first).
    output_logits : bool
        Also return the float32 logits [new, vocab] each new token was chosen from.
    eos_token_id : int, optional
        Stop after this token (default: never, as ``min_new_tokens=max_new_tokens``).
    num_threads, kernel :
        See :class:`FastDecoder`.
    attention_mask : optional
        Only all-ones (no padding) is accepted.

    Returns
    -------
    LongTensor [1, prompt + new] (like ``model.generate``), and the logits when asked.
    """
    ids = _ids_1d(input_ids)
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        raise ValueError("fastdecode decodes one unpadded sequence: attention_mask must be all ones")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    dec = FastDecoder(model, capacity=len(ids) + max_new_tokens - 1, num_threads=num_threads,
                      kernel=kernel)
    return dec.generate(ids, max_new_tokens, output_logits=output_logits,
                        eos_token_id=eos_token_id)
