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
        if isinstance(wbits, bool) or not isinstance(wbits, int):
            raise TypeError(f"wbits must be an int, got {type(wbits).__name__} {wbits!r}")
        return wbits
    cfg = path.parent / "quant_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text())["wbits"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{cfg} is malformed: {type(e).__name__}: {e}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{cfg}: wbits must be an int, got {value!r}")
        return value
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

    Every tensor is checked before the model is touched: a problem raises
    ValueError naming the tensor and leaves ``model`` as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path, got {type(checkpoint).__name__}")
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists()
                                else f"{path} is not a file")
    bits = _wbits(path, wbits)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported SqueezeLLM bit width {bits} (upstream packs 2, 3, 4 or 8)")
    if group_axis is not None and group_axis not in ("row", "column"):
        raise ValueError(f"group_axis must be 'row', 'column' or None, got {group_axis!r}")
    try:
        state: Dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many types for corrupt files
        raise ValueError(f"cannot read {path}: corrupt or not a torch checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries {bad[:3]!r} are not name -> tensor")
    state = {k: v for k, v in state.items() if not k.startswith("sparse_threshold.")
             and not k.endswith(_IGNORED_SUFFIXES)}
    modules = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not modules:
        raise ValueError(f"{path} has no '<module>.qweight' tensors: not a SqueezeLLM checkpoint")
    # 1. Convert and check everything; the model is not touched yet.
    converted: Dict[str, QuantLinear] = {}
    for name in modules:
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint module {name!r} is not in the model") from None
        if not isinstance(target, nn.Linear):
            raise ValueError(f"checkpoint module {name!r} is a {type(target).__name__}, not Linear")
        converted[name] = _convert_module(name, state, bits, target, include_sparse, group_axis)
    rest = {k: v for k, v in state.items() if not k.startswith(tuple(m + "." for m in modules))}
    if rest:
        own = model.state_dict()
        unexpected = [k for k in rest if k not in own]
        if unexpected:
            raise ValueError(f"checkpoint has tensors the model lacks: {unexpected[:5]}")
        for k, v in rest.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, the model's "
                                 f"is {tuple(own[k].shape)}")
            if v.is_floating_point() != own[k].is_floating_point():
                raise ValueError(f"checkpoint tensor {k} is {v.dtype}, the model's is {own[k].dtype}")
    # 2. Swap in (nothing below depends on the file's contents).
    for name, q in converted.items():
        target = model.get_submodule(name)
        set_module(model, name, q.to(target.weight.device))
    if rest:
        model.load_state_dict(rest, strict=False)
    layer_cfgs = {name: q.layer_config() for name, q in converted.items()}
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


_INT32 = (-(2 ** 31), 2 ** 31 - 1)


def _int32(name: str, t: torch.Tensor) -> torch.Tensor:
    """An integer index tensor as int32, refusing values int32 cannot hold (no silent wrap)."""
    if t.dtype in (torch.bool,) or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype != torch.int32 and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < _INT32[0] or hi > _INT32[1]:
            raise ValueError(f"{name} holds {lo if lo < _INT32[0] else hi}, outside the int32 range")
    return t.to(torch.int32).contiguous()


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
    if not lut.is_floating_point():
        raise ValueError(f"{name}.lookup_table must be a float tensor, got {lut.dtype}")
    if lut.dim() != 2 or lut.shape[1] != k or lut.shape[0] not in (out_f, in_f):
        raise ValueError(f"{name}.lookup_table must be ({out_f} or {in_f}, {k}), got "
                         f"{tuple(lut.shape)}")
    axis = group_axis or ("row" if lut.shape[0] == out_f else "column")
    if lut.shape[0] != (out_f if axis == "row" else in_f):
        raise ValueError(f"{name}.lookup_table shape {tuple(lut.shape)} does not fit "
                         f"group_axis={axis!r}")
    if not torch.isfinite(lut).all():
        raise ValueError(f"{name}.lookup_table contains NaN or Inf")
    bias = state.get(name + ".bias")
    if bias is not None:
        if not bias.is_floating_point() or tuple(bias.shape) != (out_f,):
            raise ValueError(f"{name}.bias must be a float tensor of shape ({out_f},), got "
                             f"{bias.dtype} of shape {tuple(bias.shape)}")
        if not torch.isfinite(bias).all():
            raise ValueError(f"{name}.bias contains NaN or Inf")
        bias = bias.float()
    sparse = None
    if include_sparse and any(name + s in state for s in (".rows", ".cols", ".vals")):
        try:
            rows, cols, vals = (state[name + s] for s in (".rows", ".cols", ".vals"))
        except KeyError as e:
            raise ValueError(f"{name}: incomplete sparse part, missing {e.args[0]}") from None
        if not vals.is_floating_point() or vals.dim() != 1:
            raise ValueError(f"{name}.vals must be a 1-D float tensor, got {vals.dtype} "
                             f"{tuple(vals.shape)}")
        if not torch.isfinite(vals).all():
            raise ValueError(f"{name}.vals contains NaN or Inf")
        if rows.numel() != out_f + 1:
            raise ValueError(f"{name}.rows must have {out_f + 1} entries (out_features + 1), "
                             f"got {rows.numel()}")
        if cols.numel() != vals.numel():
            raise ValueError(f"{name}.cols and .vals must have the same length, got "
                             f"{cols.numel()} and {vals.numel()}")
        half = vals.to(torch.float16)
        if not torch.isfinite(half).all():
            big = vals.abs().max().item()
            raise ValueError(f"{name}.vals holds {big:g}, beyond the float16 range (65504) of "
                             "sqllm's sparse values")
        sparse = (_int32(f"{name}.rows", rows), _int32(f"{name}.cols", cols), half.contiguous())
    try:
        # One validation path: shapes, dtypes and the CSR (before any kernel sees it).
        return QuantLinear.from_packed(qweight.T.contiguous(), lut, bits, in_f, axis,
                                       sparse=sparse, bias=bias)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: {e}") from None


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
