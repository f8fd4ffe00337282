"""Finding the decoder blocks of a model, and moving their tensors in and out of memory.

Architecture-generic: the decoder-block list is the ``nn.ModuleList`` whose
children all have one class and which holds the most parameters (LLaMA's
``model.layers``, OPT's ``model.decoder.layers``, GPT-2's ``transformer.h``);
no per-model tables.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

__all__ = ["find_decoder_blocks", "block_linears", "materialize", "release", "tensor_names"]

log = logging.getLogger(__name__)


def _numel(module: nn.Module) -> int:
    seen = set()
    n = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def find_decoder_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The qualified name and the ``nn.ModuleList`` of the model's decoder blocks.

    Among the ModuleLists whose children are all of one class, the one holding
    the most parameters (meta parameters count by shape).  ValueError if the
    model has none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    best: Optional[Tuple[int, str, nn.ModuleList]] = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        classes = {type(child) for child in mod}
        if len(classes) != 1:
            continue
        n = _numel(mod)
        if n > 0 and (best is None or n > best[0]):
            best = (n, name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of identical blocks "
                         "(nn.ModuleList of one class) to stream")
    total = _numel(model)
    log.debug("decoder blocks: %s (%d x %s, %.0f%% of parameters)", best[1], len(best[2]),
              type(best[2][0]).__name__, 100.0 * best[0] / max(total, 1))
    return best[1], best[2]


def block_linears(block: nn.Module, prefix: str,
                  exclude: Iterable[str] = ()) -> Dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``block`` by full name (``prefix.`` + local name).

    A Linear is left out when its full name, local name or last name component
    is in ``exclude``.
    """
    excl = set(exclude)
    out: Dict[str, nn.Linear] = {}
    for local, mod in block.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        full = f"{prefix}.{local}" if prefix else local
        if full in excl or local in excl or local.rsplit(".", 1)[-1] in excl:
            continue
        out[full] = mod
    return out


def tensor_names(module: nn.Module, prefix: str, persistent_only: bool = True) -> Dict[str, Tuple[nn.Module, str, bool]]:
    """Full name -> (owning module, attribute, is_parameter) of the module's own tensors."""
    out: Dict[str, Tuple[nn.Module, str, bool]] = {}
    for mname, mod in module.named_modules():
        base = f"{prefix}.{mname}" if prefix and mname else (prefix or mname)
        for pname, p in mod._parameters.items():
            if p is not None:
                out[f"{base}.{pname}" if base else pname] = (mod, pname, True)
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for bname, b in mod._buffers.items():
            if b is None or (persistent_only and bname in non_persistent):
                continue
            out[f"{base}.{bname}" if base else bname] = (mod, bname, False)
    return out


def materialize(module: nn.Module, prefix: str, checkpoint, device: torch.device,
                names: Optional[Dict[str, Tuple[nn.Module, str, bool]]] = None) -> int:
    """Load every meta tensor of ``module`` (full names under ``prefix``) from ``checkpoint``.

    Each tensor takes the dtype of its meta placeholder (the model's dtype) and
    goes to ``device``.  Returns the number of bytes loaded.  A meta tensor the
    checkpoint lacks raises ValueError (non-persistent buffers cannot be loaded:
    open the model with :func:`sqllm.open_on_meta`, which keeps them real).
    """
    if names is None:
        names = tensor_names(module, prefix, persistent_only=False)
    todo = {n: v for n, v in names.items() if getattr(v[0], v[1]).is_meta}
    if not todo:
        return 0
    if checkpoint is None:
        raise ValueError(f"{prefix or 'the model'} has tensors on the meta device "
                         f"({sorted(todo)[:3]}) and no checkpoint to load them from; open the model "
                         "with sqllm.open_on_meta(folder) or pass checkpoint=folder")
    for n, (mod, attr, is_param) in todo.items():
        if not is_param and attr in getattr(mod, "_non_persistent_buffers_set", set()):
            raise ValueError(f"buffer {n} is on the meta device and is not saved in checkpoints; "
                             "open the model with sqllm.open_on_meta(folder), which keeps "
                             "buffers real")
    nbytes = 0
    for n, t in checkpoint.iter_load(todo.keys()):  # one tensor in its file dtype at a time
        mod, attr, is_param = todo[n]
        ref = getattr(mod, attr)
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"checkpoint tensor {n} has shape {tuple(t.shape)}, the model "
                             f"expects {tuple(ref.shape)}")
        t = t.to(device=device, dtype=ref.dtype)
        nbytes += t.numel() * t.element_size()
        if is_param:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t
    return nbytes


def release(module: nn.Module) -> None:
    """Put every parameter and persistent buffer of ``module`` back on the meta device."""
    for mod in module.modules():
        for pname, p in mod._parameters.items():
            if p is not None and not p.is_meta:
                mod._parameters[pname] = nn.Parameter(p.detach().to("meta"), requires_grad=False)
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for bname, b in mod._buffers.items():
            if b is not None and not b.is_meta and bname not in non_persistent:
                mod._buffers[bname] = b.to("meta")
        # Quantized layers cache views of their buffers (kernel operands, device
        # plans): without this the released block's packed weights stay alive
        # through the cache, ~a quantized block of resident memory per block.
        if isinstance(getattr(mod, "_cache", None), dict):
            mod._cache = {}
