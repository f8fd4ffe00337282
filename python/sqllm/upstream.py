"""Reading (and writing) upstream SqueezeLLM packed checkpoints.

Upstream layout (a ``torch.save``'d state dict, plus ``quant_config.json`` =
``{"wbits": N}``), per quantized module ``<m>``:

* ``<m>.qweight`` int32 ``[in*bits/32, out]``: column ``o`` holds the codes
  of output row ``o`` packed down the input dimension, least significant bits
  first; for 3 bits each 32 inputs take 3 words with codes straddling words.
  That is exactly sqllm's per-row little-endian bit stream, transposed, so
  the conversion is ``qweight.T``.
* ``<m>.lookup_table`` float32 ``[out, 2^bits]`` (one table per output row);
  the row-grouping variant (seed 002) stores ``[in, 2^bits]``: one table per
  input column, sqllm's ``group_axis="column"``.
* ``<m>.bias`` (optional).
* Dense-and-Sparse: ``<m>.rows`` int32 ``[out+1]``, ``<m>.cols`` int32
  ``[nnz]``, ``<m>.vals`` float32 ``[nnz]``, a CSR matrix added to the dense
  product (upstream's ``vals`` are the weight minus the centroid its dense code
  decodes to, so dense + sparse is the weight, as in sqllm).  sqllm stores the
  values in fp16.  Top-level ``sparse_threshold.<m>`` keys (nnz) are ignored,
  as are ``<m>.startrows`` and the unused ``full_rows``/``full_row_indices``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .api import set_module
from .config import CalibrationConfig, QuantizationConfig
from .nn import QuantLinear

__all__ = ["load_squeezellm_checkpoint", "save_squeezellm_checkpoint"]

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = (".startrows", ".full_rows", ".full_row_indices")


def _wbits(path: Path, wbits: Optional[int]) -> int:
    if wbits is not None:
        return int(wbits)
    cfg = path.parent / "quant_config.json"
    if cfg.is_file():
        try:
            return int(json.loads(cfg.read_text())["wbits"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{cfg} is malformed: {e}") from None
    raise ValueError(f"bit width unknown: pass wbits= or put quant_config.json beside {path}")


def load_squeezellm_checkpoint(checkpoint: Union[str, os.PathLike], model: nn.Module,
                               wbits: Optional[int] = None, include_sparse: bool = True,
                               group_axis: Optional[str] = None) -> nn.Module:
    """Load an upstream SqueezeLLM ``.pt`` into ``model`` (the base fp model), in place.

    Parameters
    ----------
    checkpoint : path to the ``.pt`` file.
    model : the base transformers model; its Linear layers named in the
        checkpoint are replaced by :class:`~sqllm.QuantLinear`, and any other
        tensors the checkpoint holds (newer checkpoints hold the whole model)
        are loaded into it.
    wbits : bit width; default from ``quant_config.json`` beside the file.
    include_sparse : load the Dense-and-Sparse part when present.
    group_axis : "row" or "column"; default from the lookup-table shape, which
        cannot tell them apart for a square layer: pass ``"column"`` for
        checkpoints of the row-grouping variant (seed 002).
    """
    path = Path(checkpoint)
    bits = _wbits(path, wbits)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported SqueezeLLM bit width {bits} (upstream packs 2, 3, 4 or 8)")
    try:
        state: Dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many types for corrupt files
        raise ValueError(f"cannot read {path}: corrupt or not a torch checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("sparse_threshold.")
             and not k.endswith(_IGNORED_SUFFIXES)}
    modules = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not modules:
        raise ValueError(f"{path} has no '<module>.qweight' tensors: not a SqueezeLLM checkpoint")
    layer_cfgs = {}
    for name in modules:
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint module {name!r} is not in the model") from None
        if not isinstance(target, nn.Linear):
            raise ValueError(f"checkpoint module {name!r} is a {type(target).__name__}, not Linear")
        q = _convert_module(name, state, bits, target, include_sparse, group_axis)
        set_module(model, name, q.to(target.weight.device))
        layer_cfgs[name] = q.layer_config()
    rest = {k: v for k, v in state.items() if not k.startswith(tuple(m + "." for m in modules))}
    if rest:
        result = model.load_state_dict(rest, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"checkpoint has tensors the model lacks: {result.unexpected_keys[:5]}")
    if hasattr(model, "config"):
        first = next(iter(layer_cfgs.values()))
        qc = QuantizationConfig(
            method="squeezellm", options={"bits": bits, "group_axis": first["group_axis"]},
            calibration=CalibrationConfig(source=None),
            extra={"source": f"upstream SqueezeLLM checkpoint {path.name}"})
        for name, lcfg in layer_cfgs.items():
            qc.set_layer(name, lcfg)
        model.config.quantization_config = qc.to_dict()
    log.info("loaded %d SqueezeLLM layers (%d-bit) from %s", len(modules), bits, path)
    return model


def _convert_module(name: str, state: Dict[str, torch.Tensor], bits: int, linear: nn.Linear,
                    include_sparse: bool, group_axis: Optional[str]) -> QuantLinear:
    qweight = state[name + ".qweight"]
    if name + ".lookup_table" not in state:
        raise ValueError(f"{name}: lookup_table is missing")
    lut = state[name + ".lookup_table"]
    out_f, in_f = linear.out_features, linear.in_features
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"{name}.qweight must be a 2-D int32 tensor, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    if in_f % 32 != 0:
        raise ValueError(f"{name}: upstream packing needs in_features % 32 == 0, got {in_f}")
    words = in_f * bits // 32
    if tuple(qweight.shape) != (words, out_f):
        raise ValueError(f"{name}.qweight must have shape ({words}, {out_f}) for a {out_f}x{in_f} "
                         f"layer at {bits} bits, got {tuple(qweight.shape)}")
    k = 2 ** bits
    if lut.dim() != 2 or lut.shape[1] != k or lut.shape[0] not in (out_f, in_f):
        raise ValueError(f"{name}.lookup_table must be ({out_f} or {in_f}, {k}), got "
                         f"{tuple(lut.shape)}")
    axis = group_axis or ("row" if lut.shape[0] == out_f else "column")
    if lut.shape[0] != (out_f if axis == "row" else in_f):
        raise ValueError(f"{name}.lookup_table shape {tuple(lut.shape)} does not fit "
                         f"group_axis={axis!r}")
    if not torch.isfinite(lut).all():
        raise ValueError(f"{name}.lookup_table contains NaN or Inf")
    has_bias = name + ".bias" in state
    sparse = None
    if include_sparse and name + ".vals" in state:
        try:
            rows, cols, vals = (state[name + s] for s in (".rows", ".cols", ".vals"))
        except KeyError as e:
            raise ValueError(f"{name}: incomplete sparse part, missing {e.args[0]}") from None
        sparse = (rows.to(torch.int32).contiguous(), cols.to(torch.int32).contiguous(),
                  vals.to(torch.float16).contiguous())
    q = QuantLinear(in_f, out_f, bits, axis, bias=has_bias,
                    nnz=0 if sparse is None else int(sparse[2].numel()))
    q.qweight.copy_(qweight.T)
    q.lookup_table.copy_(lut.float())
    if has_bias:
        q.bias.copy_(state[name + ".bias"].float())
    if sparse is not None:
        if sparse[0].numel() != out_f + 1:
            raise ValueError(f"{name}.rows must have {out_f + 1} entries, got {sparse[0].numel()}")
        if sparse[1].numel() != sparse[2].numel():
            raise ValueError(f"{name}.cols and .vals must have the same length")
        q.sparse_row_ptr.copy_(sparse[0])
        q.sparse_col_idx.copy_(sparse[1])
        q.sparse_values.copy_(sparse[2])
    try:
        q.validate()
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return q


def save_squeezellm_checkpoint(model: nn.Module, path: Union[str, os.PathLike],
                               full: bool = False) -> Path:
    """Write the model's QuantLinear layers in the upstream SqueezeLLM layout.

    Only layers with in_features % 32 == 0 can be written.  ``full=True`` also
    writes every other tensor of the model (as newer upstream checkpoints do).
    The file and ``quant_config.json`` are written atomically.
    """
    path = Path(path)
    state: Dict[str, torch.Tensor] = {}
    bits_seen = set()
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.in_features % 32:
            raise ValueError(f"{name}: upstream packing needs in_features % 32 == 0")
        bits_seen.add(m.bits)
        state[name + ".qweight"] = m.qweight.T.contiguous().cpu()
        state[name + ".lookup_table"] = m.lookup_table.float().cpu()
        if m.bias is not None:
            state[name + ".bias"] = m.bias.cpu()
        if m.nnz:
            state[name + ".rows"] = m.sparse_row_ptr.cpu()
            state[name + ".cols"] = m.sparse_col_idx.cpu()
            state[name + ".vals"] = m.sparse_values.float().cpu()
            state["sparse_threshold." + name] = torch.tensor(m.nnz)
    if not bits_seen:
        raise ValueError("model has no QuantLinear layers")
    if len(bits_seen) > 1:
        raise ValueError(f"upstream checkpoints have one bit width, the model has {sorted(bits_seen)}")
    if full:
        qnames = {k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")}
        for k, v in model.state_dict().items():
            if k.rsplit(".", 1)[0] not in qnames:
                state[k] = v.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, writer in ((path, lambda f: torch.save(state, f)),
                           (path.parent / "quant_config.json",
                            lambda f: f.write(json.dumps({"wbits": bits_seen.pop()}).encode()))):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
