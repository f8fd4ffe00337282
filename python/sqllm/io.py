"""Saving and loading quantized models.

A saved model is an ordinary transformers model folder (``config.json``,
``model.safetensors`` or shards with an index, ``generation_config.json``,
tokenizer files) whose ``config.json`` carries ``quantization_config`` with
``quant_method: "sqllm"`` and one entry per quantized layer.  The layers'
buffers (docs/formats.md) are ordinary safetensors tensors.

Writes are atomic: everything is written to a fresh folder beside the target,
which then replaces the target in one rename; a failed save leaves the
previous contents in place.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import torch
from torch import nn

from .api import set_module
from .config import LayerFormat, QuantizationConfig, QuantizationConfigError
from .nn import QuantLinearBase

__all__ = ["save_quantized", "load_quantized", "read_quantization_config", "ShardWriter"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def save_quantized(model: nn.Module, path: PathLike, tokenizer: Any = None,
                   max_shard_size: str = "5GB") -> Path:
    """Save a model quantized by :func:`sqllm.quantize` (atomically) and return the folder."""
    qc = QuantizationConfig.from_model(model)
    if not any(isinstance(m, QuantLinearBase) for m in model.modules()):
        raise ValueError("model has no quantized layers")
    on_meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if on_meta:
        raise ValueError(f"model has tensors on the meta device ({on_meta[:3]}): a model streamed "
                         "with sqllm.quantize(..., out=folder) was already saved there")
    # The layer table is rebuilt from the modules so that it always matches the weights.
    qc.layers = {n: LayerFormat.from_layer(m) for n, m in model.named_modules()
                 if isinstance(m, QuantLinearBase)}
    model.config.quantization_config = qc.to_dict()
    target = _target_folder(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _check_saved(tmp)
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved quantized model to %s", target)
    return target


def _target_folder(path: PathLike) -> Path:
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder")
    return target


def _replace_folder(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target`` (replacing it) in one rename."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "B": 1}
    s = str(size).strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            try:
                return int(float(s[:-len(u)]) * units[u])
            except ValueError:
                break
    raise ValueError(f"max_shard_size must be bytes or like '2GB', got {size!r}")


class ShardWriter:
    """Write a quantized model folder tensor by tensor, shard by shard, atomically.

    Used by the block streamer: each finished block's tensors go into a shard
    file at once (:meth:`flush`), so the model never needs to be in memory as a
    whole; a shard is also written before the buffered tensors would exceed
    ``max_shard_size``.  Everything is written to a temporary folder beside ``path``, which
    :meth:`finish` moves into place in one rename (as :func:`save_quantized`);
    :meth:`abort` (or leaving the ``with`` block by an exception) removes it.
    The result is the layout :func:`save_quantized` writes and
    :func:`load_quantized` reads: ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
    """

    def __init__(self, path: PathLike, max_shard_size: Union[int, str] = "1GB") -> None:
        self.target = _target_folder(path)
        self.max_shard_bytes = _parse_size(max_shard_size)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        self._buf: Dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list = []
        self._weight_map: Dict[str, int] = {}
        self.total_bytes = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._weight_map or name in self._buf:
            raise ValueError(f"tensor {name!r} was already written")
        if tensor.is_meta:
            raise ValueError(f"tensor {name!r} is on the meta device (not loaded)")
        t = tensor.detach().to("cpu").contiguous()
        self.reserve(t.numel() * t.element_size())
        self._buf[name] = t
        self._buf_bytes += t.numel() * t.element_size()

    def reserve(self, nbytes: int) -> None:
        """Write the buffered tensors out first if ``nbytes`` more would overflow the shard."""
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self.flush()

    def add_many(self, tensors: Dict[str, torch.Tensor]) -> None:
        for n, t in tensors.items():
            self.add(n, t)

    def flush(self) -> None:
        """Write the buffered tensors as one shard file and drop them from memory."""
        from safetensors.torch import save_file

        if not self._buf:
            return
        k = len(self._shards)
        fname = f"shard-{k:05d}.safetensors"
        save_file(self._buf, str(self.tmp / fname), metadata={"format": "pt"})
        self._shards.append(fname)
        for n in self._buf:
            self._weight_map[n] = k
        self.total_bytes += self._buf_bytes
        self._buf = {}
        self._buf_bytes = 0

    def finish(self, model: nn.Module, tokenizer: Any = None) -> Path:
        """Write config.json (with ``quantization_config``), generation config, tokenizer
        and the index, then move the folder into place.  Returns the folder."""
        try:
            self.flush()
            if not self._shards:
                raise ValueError("no tensors were written")
            n = len(self._shards)
            if n == 1:
                names = ["model.safetensors"]
            else:
                names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            for old, new in zip(self._shards, names):
                os.replace(self.tmp / old, self.tmp / new)
            if n > 1:
                index = {"metadata": {"total_size": self.total_bytes},
                         "weight_map": {k: names[v] for k, v in sorted(self._weight_map.items())}}
                (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            config = model.config
            config.architectures = [type(model).__name__]
            config.save_pretrained(self.tmp)
            gen = getattr(model, "generation_config", None)
            if gen is not None and getattr(model, "can_generate", lambda: False)():
                gen.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
            _check_saved(self.tmp)
            _replace_folder(self.tmp, self.target)
        except BaseException:
            self.abort()
            raise
        log.info("saved quantized model to %s (%d shards)", self.target, len(self._shards))
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _check_saved(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("quantization_config", {}).get("quant_method") != "sqllm":
        raise RuntimeError("config.json was written without the quantization_config")
    QuantizationConfig.from_dict(cfg["quantization_config"])


def read_quantization_config(path: PathLike) -> QuantizationConfig:
    """The :class:`~sqllm.QuantizationConfig` of a saved folder (format version 1 or 2).

    Raises FileNotFoundError without ``config.json`` and ValueError
    (:class:`~sqllm.config.QuantizationConfigError`) when it is not valid JSON,
    has no sqllm ``quantization_config``, or that config is invalid or newer
    than this sqllm reads.
    """
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} does not exist")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(q, dict) or q.get("quant_method") != "sqllm":
        raise ValueError(f"{cfg_file} has no sqllm quantization_config")
    try:
        return QuantizationConfig.from_dict(q)
    except QuantizationConfigError as e:
        raise QuantizationConfigError(f"{cfg_file}: {e}") from None


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory), buffers as usual.

    Buffers such as rotary ``inv_freq`` are computed in ``__init__`` and not
    saved, so they must be real; parameters all come from the checkpoint.
    """
    orig = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        orig(self, name, param)
        if param is not None:
            p = self._parameters[name]
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = orig  # type: ignore[method-assign]


def _read_state_dict(folder: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is corrupt: {e}") from None
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors (or index)")
    sd: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(folder / f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read {folder / f}: the file is corrupt or truncated ({e})") from None
    return sd


def load_quantized(path: PathLike, device: Union[str, torch.device] = "cpu",
                   dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load a folder written by :func:`save_quantized` into a transformers model.

    The model skeleton is built from ``config.json`` without allocating its
    weights; quantized layers are rebuilt from ``quantization_config`` and all
    tensors come from the safetensors files.  Raises ValueError for a corrupt,
    truncated or inconsistent checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import _dtype_kwargs

    folder = Path(path)
    qcfg = read_quantization_config(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype or torch.float32))
    for name, entry in qcfg.layers.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantization_config names layer {name!r}, which the model "
                             "does not have") from None
        set_module(model, name, entry.build())
    sd = _read_state_dict(folder)
    try:
        result = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint in {folder} does not match its config: {e}") from None
    if result.unexpected_keys:
        raise ValueError(f"checkpoint has unexpected tensors: {result.unexpected_keys[:5]}")
    model.tie_weights()
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p.is_meta]
    if meta:
        raise ValueError(f"checkpoint lacks tensors: {meta[:5]}")
    for name, m in model.named_modules():
        if isinstance(m, QuantLinearBase):
            try:
                m.validate()
            except ValueError as e:
                raise ValueError(f"layer {name}: {e}") from None
    model.config.quantization_config = qcfg.to_dict()
    model.eval()
    if dtype is not None:
        # assign=True keeps the checkpoint's dtypes: convert the parameters (as
        # from_pretrained(dtype=) does; buffers such as rotary tables stay fp32).
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model.to(device)
