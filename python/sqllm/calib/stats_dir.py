"""A directory of calibration statistics, one safetensors file per (collector, layer).

Layout::

    STATS_DIR/manifest.json                 what the statistics were computed from
    STATS_DIR/<collector>/<layer>.safetensors

The manifest records the model (architecture config digest, parameter count,
the shapes of the quantized layers), the calibration data (number and length of
the windows and a SHA-256 of the token ids) and, per collector, what its inputs
depended on (block statistics gathered from the outputs of quantized blocks
depend on the method and its options).  Opening an existing directory with a
different identity raises ValueError naming the first field that differs, so
statistics are never silently reused for another model or data set.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

__all__ = ["StatsDir", "model_identity", "calibration_identity"]

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1

# config fields that do not change the model's function
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
             "quantization_config", "_commit_hash", "use_cache", "architectures",
             "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
             "return_dict"}


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        return repr(v)


def model_identity(model: nn.Module, layers: Dict[str, Any]) -> Dict[str, Any]:
    """What identifies a model for reusing its statistics (no weights are read)."""
    cfg = getattr(model, "config", None)
    cfg_dict = {}
    if cfg is not None and hasattr(cfg, "to_dict"):
        cfg_dict = {k: _jsonable(v) for k, v in sorted(cfg.to_dict().items())
                    if k not in _VOLATILE}
    digest = hashlib.sha256(json.dumps(cfg_dict, sort_keys=True).encode()).hexdigest()
    seen = set()
    n_params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    shapes = {n: [int(m.out_features), int(m.in_features)] for n, m in sorted(layers.items())}
    return {"class": type(model).__name__, "model_type": cfg_dict.get("model_type"),
            "config_sha256": digest, "num_parameters": n_params, "layer_shapes": shapes}


def calibration_identity(batches: Optional[torch.Tensor]) -> Dict[str, Any]:
    if batches is None:
        return {"nsamples": 0, "seqlen": 0, "tokens_sha256": None}
    ids = batches.detach().to("cpu", torch.int64).contiguous()
    return {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
            "tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}


def _first_difference(old: Any, new: Any, path: str) -> Optional[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            if k not in old or k not in new:
                return f"{path}.{k}"
            d = _first_difference(old[k], new[k], f"{path}.{k}")
            if d:
                return d
        return None
    return None if old == new else path


def _lookup(d: Any, path: str) -> Any:
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return "<absent>"
        d = d[k]
    return d


class StatsDir:
    """Read/write per-layer statistics under ``path``, validated against an identity.

    Parameters
    ----------
    path : folder (created if missing)
    model : dict from :func:`model_identity`
    calibration : dict from :func:`calibration_identity`
    """

    def __init__(self, path: Union[str, os.PathLike], model: Dict[str, Any],
                 calibration: Dict[str, Any]) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"stats dir {self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self._manifest_file = self.path / "manifest.json"
        new = {"version": MANIFEST_VERSION, "model": model, "calibration": calibration,
               "collectors": {}}
        if self._manifest_file.is_file():
            try:
                old = json.loads(self._manifest_file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{self._manifest_file} is not valid JSON: {e}") from None
            for key in ("version", "model", "calibration"):
                diff = _first_difference(old.get(key), new[key], key)
                if diff:
                    raise ValueError(
                        f"stats dir {self.path} was collected for a different {key} "
                        f"({diff}: recorded {_lookup(old, diff)!r}, now {_lookup(new, diff)!r}); "
                        "use another stats dir or delete this one")
            self.manifest = old
            self.manifest.setdefault("collectors", {})
        else:
            self.manifest = new
            self._write_manifest()

    def _write_manifest(self) -> None:
        tmp = self._manifest_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True))
        os.replace(tmp, self._manifest_file)

    def use_collector(self, name: str, depends_on: Dict[str, Any]) -> None:
        """Record (or check) what collector ``name``'s statistics depend on."""
        rec = self.manifest["collectors"].get(name)
        if rec is None:
            self.manifest["collectors"][name] = depends_on
            self._write_manifest()
            return
        diff = _first_difference(rec, depends_on, name)
        if diff:
            raise ValueError(
                f"stats dir {self.path}: the {name!r} statistics were collected with different "
                f"inputs ({diff}: recorded {_lookup({name: rec}, diff)!r}, now "
                f"{_lookup({name: depends_on}, diff)!r}); use another stats dir or delete "
                f"{self.path / name}")

    def _file(self, collector: str, layer: str) -> Path:
        return self.path / collector / f"{layer}.safetensors"

    def has(self, collector: str, layer: str) -> bool:
        return self._file(collector, layer).is_file()

    def save(self, collector: str, layer: str, tensors: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        f = self._file(collector, layer)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f.name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, f)

    def load(self, collector: str, layer: str) -> Dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        f = self._file(collector, layer)
        try:
            return load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"stats file {f} is unreadable ({e}); delete it to recollect") from None
