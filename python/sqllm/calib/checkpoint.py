"""Reading a model's weights tensor by tensor, and opening a model on the meta device.

:func:`open_on_meta` builds a transformers model from a folder's ``config.json``
with every parameter on the meta device (no memory) and real buffers (rotary
frequencies and other non-persistent buffers are computed in ``__init__`` and
are not in the checkpoint).  :class:`SafetensorsCheckpoint` then reads the
tensors one at a time with ``safetensors.safe_open`` through the folder's
``model.safetensors.index.json`` (or its single ``model.safetensors``), so the
block streamer materialises one decoder block at a time.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["SafetensorsCheckpoint", "open_on_meta", "is_meta_model"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def is_meta_model(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is on the meta device."""
    return any(p.is_meta for p in model.parameters())


class SafetensorsCheckpoint:
    """The tensors of a folder of safetensors files, read lazily by name.

    Checkpoint names are matched to the model's names as they are, or with the
    model's ``base_model_prefix`` added or removed (``layers.0...`` vs
    ``model.layers.0...``), the two spellings transformers writes.
    """

    def __init__(self, folder: PathLike, base_model_prefix: str = "") -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                self.weight_map: Dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                    ValueError) as e:
                raise ValueError(f"{index} is corrupt: {e}") from None
        elif (self.folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.folder / "model.safetensors"), framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder} has no model.safetensors (or "
                                    "model.safetensors.index.json)")
        from ..io import check_inside

        check_inside(self.folder, set(self.weight_map.values()), index)
        for fname in set(self.weight_map.values()):
            if not (self.folder / fname).is_file():
                raise FileNotFoundError(f"{self.folder / fname} (named in the index) is missing")
        self.prefix = base_model_prefix

    def __repr__(self) -> str:
        return f"SafetensorsCheckpoint({str(self.folder)!r}, {len(self.weight_map)} tensors)"

    def key_for(self, name: str) -> Optional[str]:
        """The checkpoint key holding the model tensor ``name`` (None if absent)."""
        if name in self.weight_map:
            return name
        p = self.prefix + "." if self.prefix else ""
        if p and name.startswith(p) and name[len(p):] in self.weight_map:
            return name[len(p):]
        if p and p + name in self.weight_map:
            return p + name
        return None

    def __contains__(self, name: str) -> bool:
        return self.key_for(name) is not None

    def iter_load(self, names: Iterable[str]) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield ``(model name, tensor)`` one tensor at a time.

        ValueError names what is missing (before anything is read) or unreadable.
        """
        from safetensors import SafetensorError, safe_open

        by_file: Dict[str, List[tuple]] = {}
        missing = []
        for n in names:
            k = self.key_for(n)
            if k is None:
                missing.append(n)
            else:
                by_file.setdefault(self.weight_map[k], []).append((n, k))
        if missing:
            raise ValueError(f"checkpoint {self.folder} lacks tensors {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        for fname, pairs in by_file.items():
            for n, k in pairs:
                # One mapping per tensor: the file's pages read so far leave the resident
                # set when it closes (a mapping kept open for the whole file counts them all).
                try:
                    with safe_open(str(self.folder / fname), framework="pt") as f:
                        t = f.get_tensor(k)
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"cannot read {self.folder / fname}: the file is corrupt or "
                                     f"truncated ({e})") from None
                yield n, t

    def load(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """Read the named tensors (model names) into a dict; see :meth:`iter_load`."""
        return dict(self.iter_load(names))


def open_on_meta(folder: PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM from ``folder/config.json`` with its parameters on meta.

    No weight is read or allocated: the block streamer
    (:func:`sqllm.quantize` on this model) loads them block by block from the
    folder's safetensors files, which it finds through the returned model's
    ``sqllm_checkpoint`` attribute (a :class:`SafetensorsCheckpoint`).
    Parameters take ``dtype`` when they are loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..io import _params_on_meta
    from ..models import _dtype_kwargs

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json (not a transformers model folder)")
    checkpoint_probe = SafetensorsCheckpoint(folder)  # fail early without safetensors
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype))
    # Under _params_on_meta every assignment makes a new Parameter, which unties
    # tied weights (lm_head / embeddings); tie them again to one object.
    model.tie_weights()
    model.eval()
    checkpoint_probe.prefix = getattr(model, "base_model_prefix", "") or ""
    model.sqllm_checkpoint = checkpoint_probe
    return model
