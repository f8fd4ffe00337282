"""Quantized token embeddings, sharing their packed storage with a tied ``lm_head``.

On a small model the token embedding and the output projection (tied to it in
SmolLM2, LLaMA-style models with ``tie_word_embeddings``) dominate the bytes
read per generated token: SmolLM2-135M's 49152×576 fp32 matrix is 113 MB, the
30 decoder blocks together 4× less once quantized.  :func:`quantize_embeddings`
stores that matrix once in the ``lut`` format (a :class:`~sqllm.nn.QuantLinear`,
one 2^b-entry table per vocabulary row; codes from 1-D k-means per row up to
4 bits, a uniform grid over each row's range above):

* the output projection becomes that :class:`QuantLinear` (a normal
  quantized layer, ``lm_head`` in ``quantization_config.layers``);
* the input embedding becomes a :class:`QuantEmbedding`, which gathers the
  codes and table of each requested token and decodes those rows only.

With tied weights the embedding holds no tensors of its own: it reads the
``lm_head`` layer's buffers (one copy in memory and on disk).  An untied
embedding owns its storage as a child layer ``<name>.rows``.  Which module
reads which storage is recorded under ``quantization_config["embeddings"]``
(docs/formats.md) and rebuilt by :func:`sqllm.load_quantized`.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import _C
from . import compiled as _compiled
from .nn import QuantLinear, _u32

__all__ = ["QuantEmbedding", "quantize_embeddings", "attach_embeddings", "EMBEDDINGS_KEY"]

log = logging.getLogger(__name__)

#: Top-level key of ``quantization_config`` that lists the quantized embeddings.
EMBEDDINGS_KEY = "embeddings"
#: Name of an untied embedding's own storage layer, under the embedding's name.
OWN_STORAGE = "rows"


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` replacement whose rows are the codes of a ``lut`` layer.

    Parameters
    ----------
    storage : QuantLinear
        Row-grouped ``lut`` layer of shape (num_embeddings, embedding_dim)
        without a sparse part: row ``t`` of its weight is the vector of token ``t``.
    tied : bool
        True: ``storage`` is another module of the model (the tied ``lm_head``)
        and is *not* registered here (its buffers are saved once, under that
        module).  False: it is registered as the child ``rows``.
    padding_idx : int, optional
        Kept for ``nn.Embedding`` compatibility (not used at inference).
    dtype : torch.dtype
        dtype of the returned vectors (the model's activations).
    """

    def __init__(self, storage: QuantLinear, tied: bool, padding_idx: Optional[int] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(storage, QuantLinear):
            raise TypeError(f"storage must be a QuantLinear, got {type(storage).__name__}")
        if storage.group_axis != "row":
            raise ValueError("an embedding's storage must use row grouping (one table per token)")
        if storage.bias is not None:
            raise ValueError("an embedding's storage must have no bias")
        if storage.nnz != 0:
            raise ValueError("an embedding's storage must have no sparse part (nnz=0), "
                             f"got nnz={storage.nnz}")
        self.tied = bool(tied)
        if self.tied:
            # A plain attribute: the module is owned (and saved) elsewhere.
            self.__dict__["_storage"] = storage
        else:
            self.add_module(OWN_STORAGE, storage)
        self.num_embeddings = storage.out_features
        self.embedding_dim = storage.in_features
        self.padding_idx = padding_idx
        self.out_dtype = dtype

    @property
    def storage(self) -> QuantLinear:
        if self.tied:
            return self.__dict__["_storage"]
        return self._modules[OWN_STORAGE]  # type: ignore[return-value]

    @property
    def bits(self) -> int:
        return self.storage.bits

    def storage_bits(self) -> int:
        """Bits of the packed rows (0 when tied: counted under the storage layer)."""
        return 0 if self.tied else self.storage.storage_bits()

    def dequantize(self) -> torch.Tensor:
        """The (num_embeddings, embedding_dim) fp32 matrix these codes represent."""
        return self.storage.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"input ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"input ids must be an integer tensor, got {ids.dtype}")
        if torch.compiler.is_compiling() and ids.is_cpu:
            # traced by torch.compile: the row decode as a torch custom op
            return _compiled.quant_embedding_forward(self, ids)
        s = self.storage
        qweight = s._buffers["qweight"]
        flat = ids.reshape(-1)
        if flat.numel() == 0:
            return torch.zeros(*ids.shape, self.embedding_dim, dtype=self.out_dtype,
                               device=ids.device)
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= self.num_embeddings:
            raise IndexError(f"token ids must be in [0, {self.num_embeddings}), got values in "
                             f"[{lo}, {hi}]")
        flat = flat.to(qweight.device, torch.int64)
        codes = qweight.index_select(0, flat)
        tables = s._buffers["lookup_table"].index_select(0, flat)
        if qweight.is_cpu:
            w = torch.from_numpy(_C.nuq_dequantize(
                _u32(codes), tables.to(torch.float32).numpy(), self.embedding_dim, s.bits, "row"))
        else:  # decode the gathered rows on the CPU (a few rows per step)
            w = torch.from_numpy(_C.nuq_dequantize(
                _u32(codes.cpu()), tables.cpu().to(torch.float32).numpy(), self.embedding_dim,
                s.bits, "row")).to(qweight.device)
        w = w.to(self.out_dtype)
        return w.view(*ids.shape, self.embedding_dim).to(ids.device)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
                f"tied={self.tied}")


def _embedding_modules(model: nn.Module) -> Tuple[str, nn.Embedding, Optional[str]]:
    """(name of the input embedding, the module, name of the tied output layer or None)."""
    try:
        emb = model.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        raise ValueError("quantize_embeddings needs a model with get_input_embeddings() "
                         "(a transformers model)") from None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"the input embedding is {type(emb).__name__}, not nn.Embedding "
                         "(already quantized?)")
    names = {id(m): n for n, m in model.named_modules()}
    emb_name = names[id(emb)]
    head_name = None
    try:
        head = model.get_output_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        head = None
    if isinstance(head, nn.Linear) and head.weight is emb.weight:
        head_name = names[id(head)]
    return emb_name, emb, head_name


#: Widths up to this use per-row k-means; wider ones a uniform grid per row.
KMEANS_MAX_BITS = 4


def _quantize_rows(weight: torch.Tensor, bits: int, num_threads: int = 0) -> QuantLinear:
    """The (vocab, dim) matrix as a row-grouped ``lut`` layer.

    Up to :data:`KMEANS_MAX_BITS` bits: per-row 1-D k-means (Lloyd from a
    near-optimal start, unweighted), SqueezeLLM's quantizer.  Wider: the
    table of each row is the uniform grid ``lo + j*(hi - lo)/(2^bits - 1)``
    over the row's range and each value takes its nearest grid point (error
    at most half a step); k-means with 256 centres per row would cost minutes
    on a 49152-row vocabulary for a gain 8 bits do not need.
    """
    from .methods import SqueezeLLM

    if bits <= KMEANS_MAX_BITS:
        return SqueezeLLM(bits=bits, kmeans="lloyd", weighted=False).quantize_weight(
            weight, num_threads=num_threads)
    w = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("the embedding contains NaN or Inf")
    levels = (1 << bits) - 1
    lo = w.min(dim=1, keepdim=True).values
    hi = w.max(dim=1, keepdim=True).values
    step = (hi - lo) / levels  # 0 for a constant row: every entry is its value
    codes = torch.round((w - lo) / torch.where(step > 0, step, torch.ones_like(step)))
    codes = codes.clamp_(0, levels).to(torch.uint8)
    table = (lo + step * torch.arange(levels + 1, dtype=torch.float64)).to(torch.float32)
    packed = _C.pack_codes(codes.numpy(), bits)
    return QuantLinear.from_packed(packed, table, bits, w.shape[1], "row")


def quantize_embeddings(model: nn.Module, bits: int, num_threads: int = 0
                        ) -> Tuple[Dict[str, QuantLinear], Dict[str, Any]]:
    """Replace the input embedding (and the output layer tied to it) in place.

    The matrix is quantized once (:func:`_quantize_rows`: per-row k-means up
    to 4 bits, a uniform per-row grid above; one 2^bits table per token).  Returns the new ``lut`` layers by name (for
    ``quantization_config.layers``) and the ``embeddings`` entry of the config.
    """
    from .api import set_module

    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"embedding bits must be an int in 2..8, got {bits!r}")
    emb_name, emb, head_name = _embedding_modules(model)
    weight = emb.weight.detach()
    if weight.is_meta:
        raise ValueError("quantize_embeddings needs the embedding's weights in memory "
                         "(not a model on the meta device)")
    q = _quantize_rows(weight, int(bits), num_threads)
    q.to(weight.device)
    tied = head_name is not None
    new_emb = QuantEmbedding(q, tied=tied, padding_idx=emb.padding_idx, dtype=weight.dtype)
    if tied:
        set_module(model, head_name, q)
        storage_name = head_name
    else:
        storage_name = f"{emb_name}.{OWN_STORAGE}"
    set_module(model, emb_name, new_emb)
    log.info("quantized the embedding %s (%dx%d) to %d bits%s", emb_name, q.out_features,
             q.in_features, bits, f", tied to {head_name}" if tied else "")
    return {storage_name: q}, {emb_name: {"storage": storage_name, "tied": tied,
                                          "bits": int(bits), "padding_idx": emb.padding_idx}}


def embeddings_entry(qcfg: Any) -> Dict[str, Dict[str, Any]]:
    """The validated ``embeddings`` entry of a QuantizationConfig (empty if none)."""
    raw = qcfg.extra.get(EMBEDDINGS_KEY)
    if raw is None:
        return {}
    where = f"quantization_config.{EMBEDDINGS_KEY}"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be an object, got {type(raw).__name__}")
    out: Dict[str, Dict[str, Any]] = {}
    for name, e in raw.items():
        if not isinstance(e, Mapping) or not isinstance(e.get("storage"), str) or \
                not isinstance(e.get("tied"), bool):
            raise ValueError(f"{where}[{name!r}] must be an object with 'storage' (a string) and "
                             f"'tied' (a bool), got {e!r}")
        pad = e.get("padding_idx")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
            raise ValueError(f"{where}[{name!r}].padding_idx must be an int or null, got {pad!r}")
        if e["storage"] not in qcfg.layers:
            raise ValueError(f"{where}[{name!r}].storage names {e['storage']!r}, which is not "
                             "in quantization_config.layers")
        if not e["tied"] and e["storage"] != f"{name}.{OWN_STORAGE}":
            raise ValueError(f"{where}[{name!r}]: an untied embedding's storage must be "
                             f"{name + '.' + OWN_STORAGE!r}, got {e['storage']!r}")
        out[str(name)] = dict(e)
    return out


def own_storage_layers(entries: Mapping[str, Mapping[str, Any]]) -> set:
    """Layer names that live inside an (untied) QuantEmbedding."""
    return {e["storage"] for e in entries.values() if not e["tied"]}


def attach_embeddings(model: nn.Module, entries: Mapping[str, Mapping[str, Any]],
                      layers: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> None:
    """Loading: replace each listed ``nn.Embedding`` with a QuantEmbedding whose
    storage is the (already built) tied layer, or a new layer built from its
    config entry (untied)."""
    from .api import set_module

    for name, e in entries.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantization_config.{EMBEDDINGS_KEY} names {name!r}, which the "
                             "model does not have") from None
        if not isinstance(old, nn.Embedding):
            raise ValueError(f"quantization_config.{EMBEDDINGS_KEY} names {name!r}, but the "
                             f"model's {name} is {type(old).__name__}, not nn.Embedding")
        entry = layers[e["storage"]]
        if e["tied"]:
            storage = model.get_submodule(e["storage"])
        else:
            storage = entry.build()
        if not isinstance(storage, QuantLinear) or \
                (storage.out_features, storage.in_features) != (old.num_embeddings,
                                                                 old.embedding_dim):
            raise ValueError(f"embedding {name} ({old.num_embeddings}x{old.embedding_dim}) "
                             f"does not match its storage {e['storage']}: {storage!r}")
        set_module(model, name, QuantEmbedding(storage, tied=e["tied"],
                                               padding_idx=e.get("padding_idx"), dtype=dtype))
