"""Saving and loading quantized models.

A saved model is an ordinary transformers model folder (``config.json``,
``model.safetensors`` or shards with an index, ``generation_config.json``,
tokenizer files) whose ``config.json`` carries ``quantization_config`` with
``quant_method: "sqllm"`` and one entry per quantized layer.  The layers'
buffers (docs/formats.md) are ordinary safetensors tensors.

Writes are atomic: everything is written to a fresh folder beside the target,
which then takes the target's place by an atomic exchange (``renameat2``
``RENAME_EXCHANGE`` on Linux); where that is unavailable the old folder is
kept under ``.<name>.old-<pid>`` until the new one is in place, and a later
save or load puts it back if the process died in between.  So the target path
always holds the old or the new model.  A folder that is not an sqllm model
folder is never replaced unless ``overwrite=True``.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .api import set_module
from .config import LayerFormat, QuantizationConfig, QuantizationConfigError
from .nn import QuantLinearBase

__all__ = ["save_quantized", "load_quantized", "read_quantization_config", "ShardWriter",
           "check_output_folder", "is_sqllm_folder"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def save_quantized(model: nn.Module, path: PathLike, tokenizer: Any = None,
                   max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Save a model quantized by :func:`sqllm.quantize` (atomically) and return the folder.

    An existing sqllm model folder at ``path`` is replaced; any other non-empty
    folder is refused (ValueError) unless ``overwrite=True``.  At every instant
    ``path`` holds the old or the new model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = check_output_folder(path, overwrite=overwrite)
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
    tmp = _make_tmp(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_upstream_keys(tmp)
        _check_saved(tmp)
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved quantized model to %s", target)
    return target


def is_sqllm_folder(path: PathLike) -> bool:
    """Whether ``path`` is a folder whose config.json carries an sqllm quantization_config."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    q = _sqllm_view(cfg.get("quantization_config") if isinstance(cfg, dict) else None)
    return isinstance(q, dict) and q.get("quant_method") == "sqllm"


def check_output_folder(path: PathLike, overwrite: bool = False,
                        source: Optional[PathLike] = None) -> Path:
    """Check that a model can be saved at ``path`` before any long work; return the folder.

    Raises ValueError when ``path`` (or, through a symlink, the folder it points
    to) is a file, is a non-empty folder that is not an sqllm model folder and
    ``overwrite`` is false, or is (or contains) the ``source`` model folder;
    NotADirectoryError/PermissionError when it cannot be created.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the output path must be a str or path, got {type(path).__name__}")
    target = Path(path).resolve()
    if source is not None:
        src = Path(source).resolve()
        if src == target or target in src.parents:
            raise ValueError(f"the output folder {path} is (or contains) the source model {source}; "
                             "choose another output folder")
    _recover(target)
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot create {target}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write in {ancestor}")
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"{target} exists and is not a folder")
        if not overwrite and any(target.iterdir()) and not is_sqllm_folder(target):
            raise ValueError(f"{path} exists and is not an sqllm model folder; refusing to replace "
                             "it and its contents (pass overwrite=True, or --overwrite)")
    return target


def _target_folder(path: PathLike, overwrite: bool = False) -> Path:
    target = check_output_folder(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _make_tmp(target: Path) -> Path:
    """A fresh folder beside ``target`` named ``.<name>.tmp-<pid>-*`` with the
    permissions of an ordinary new folder (mkdtemp's are 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path, kind: str) -> Iterator[Tuple[Path, Optional[int]]]:
    """``.<name>.<kind>-<pid>...`` siblings of ``target`` with the pid that made them."""
    prefix = f".{target.name}.{kind}-"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for p in entries:
        if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink():
            head = p.name[len(prefix):].split("-", 1)[0]
            yield p, int(head) if head.isdigit() else None


def _recover(target: Path) -> None:
    """Put back the model a save interrupted between its two renames left in
    ``.<name>.old-<pid>`` (only when nothing is at ``target``), and remove the
    temporary and old folders of saves whose process is gone."""
    if not target.parent.is_dir():
        return
    if not target.exists() and not target.is_symlink():
        olds = [p for p, pid in _leftovers(target, "old")
                if (pid is None or not _pid_alive(pid)) and is_sqllm_folder(p)]
        if olds:
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            os.rename(newest, target)
            log.warning("recovered %s from %s, left by an interrupted save", target, newest.name)
    for kind in ("tmp", "old"):
        for p, pid in _leftovers(target, kind):
            if pid is not None and not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)
                log.info("removed %s, left by an interrupted save", p)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_folder(tmp: Path, target: Path) -> None:
    """Put the finished folder ``tmp`` at ``target``: ``target`` holds the old or
    the new folder at every instant (see the module docstring)."""
    if not target.exists():
        os.replace(tmp, target)  # one rename onto nothing: atomic
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    # No exchange: keep the old folder until the new one is in place; a process
    # killed in between leaves it in .old-<pid>, which _recover() puts back.
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
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

    def __init__(self, path: PathLike, max_shard_size: Union[int, str] = "1GB",
                 overwrite: bool = False) -> None:
        self.target = _target_folder(path, overwrite=overwrite)
        self.max_shard_bytes = _parse_size(max_shard_size)
        self.tmp = _make_tmp(self.target)
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
            _write_upstream_keys(self.tmp)
            _check_saved(self.tmp)
            _replace_folder(self.tmp, self.target)
        except BaseException:
            self.abort()
            raise
        log.info("saved quantized model to %s (%d shards)", self.target, len(self._shards))
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _sqllm_view(q: Any) -> Any:
    from .vptq import sqllm_view

    return sqllm_view(q)


def _write_upstream_keys(folder: Path) -> None:
    """An all-``vq`` model's config.json also in upstream VPTQ's layout (sqllm.vptq)."""
    from .vptq import add_upstream_keys

    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    q = cfg.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "sqllm":
        new = add_upstream_keys(q)
        if new is not q:
            cfg["quantization_config"] = new
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check_saved(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    q = _sqllm_view(cfg.get("quantization_config", {}))
    if q.get("quant_method") != "sqllm":
        raise RuntimeError("config.json was written without the quantization_config")
    QuantizationConfig.from_dict(q)


def read_quantization_config(path: PathLike) -> QuantizationConfig:
    """The :class:`~sqllm.QuantizationConfig` of a saved folder (format version 1 or 2),
    or of a folder in upstream VPTQ's published layout (``quant_method: "vptq"``).

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
    q = _sqllm_view(cfg.get("quantization_config") if isinstance(cfg, dict) else None)
    if isinstance(q, dict) and q.get("quant_method") == "vptq":
        from .vptq import upstream_config

        try:
            return upstream_config(q)
        except QuantizationConfigError as e:
            raise QuantizationConfigError(f"{cfg_file}: {e}") from None
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


def check_inside(folder: PathLike, names: Any, source: PathLike) -> None:
    """Raise ValueError unless every file name read from ``source`` is a plain
    relative path inside ``folder`` (no absolute path, no ``..``, no symlink out)."""
    root = Path(folder).resolve()
    for f in names:
        rel = Path(f) if isinstance(f, str) else None
        if rel is None or not f or rel.is_absolute() or ".." in rel.parts or \
                root not in (root / rel).resolve().parents:
            raise ValueError(f"{source} names the file {f!r}, which is not inside {folder}")


def _checkpoint_files(folder: Path) -> List[str]:
    """The safetensors files of a saved folder; every name read from the index
    must be a plain relative path inside the folder (no absolute path, no ``..``,
    no symlink out of it)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is corrupt: {type(e).__name__}: {e}") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError(f"{index}: weight_map must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        check_inside(folder, files, index)
        if not files:
            raise ValueError(f"{index} lists no files")
        return files
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"{folder} has no model.safetensors (or index)")


def _read_headers(folder: Path, files: List[str]) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """tensor name -> (file, shape), from the safetensors headers only (no data read).
    A tensor in two files is an error."""
    from safetensors import SafetensorError, safe_open

    where: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    for f in files:
        path = folder / f
        if not path.is_file():
            raise FileNotFoundError(f"{path} (listed in the index) does not exist")
        try:
            with safe_open(str(path), framework="pt") as st:
                for k in st.keys():
                    if k in where:
                        raise ValueError(f"tensor {k!r} is in both {where[k][0]} and {f}")
                    where[k] = (f, tuple(int(d) for d in st.get_slice(k).get_shape()))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"cannot read {path}: the file is corrupt or truncated ({e})") from None
    return where


def _read_state_dict(folder: Path, files: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if files is None:
        files = _checkpoint_files(folder)
        _read_headers(folder, files)  # containment, duplicates

    sd: Dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(folder / f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"cannot read {folder / f}: the file is corrupt or truncated ({e})") from None
    return sd


def _check_depth(config: Any, headers: Dict[str, Tuple[str, Tuple[int, ...]]],
                 folder: Path) -> None:
    """The model's depth from config.json must be backed by tensors (the last
    decoder block's index appears in some tensor name): building the skeleton
    costs time per block, so a huge ``num_hidden_layers`` is refused first."""
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, bool) or not isinstance(n, int):
        return
    if n < 0 or (n > 0 and not any(f".{n - 1}." in k for k in headers)):
        raise ValueError(f"{folder / 'config.json'}: num_hidden_layers={n}, but the checkpoint "
                         f"has no tensors of block {n - 1}")


def _check_layer_tensors(name: str, entry: LayerFormat,
                         headers: Dict[str, Tuple[str, Tuple[int, ...]]]) -> None:
    """The layer's tensors exist with the shapes its config entry implies, checked
    on an empty layer built on the meta device: sizes read from config.json
    (features, nnz) allocate nothing until the files agree with them."""
    with torch.device("meta"):
        try:
            probe = entry.build()
        except (ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"layer {name}: {e}") from None
    for buf, t in probe.named_buffers():
        key = f"{name}.{buf}"
        if key not in headers:
            raise ValueError(f"checkpoint lacks the tensor {key} (layer {name} is "
                             f"{entry.format!r} with bias={entry.bias})")
        if headers[key][1] != tuple(t.shape):
            raise ValueError(f"tensor {key} in {headers[key][0]} has shape {headers[key][1]}, "
                             f"which does not match quantization_config.layers[{name!r}] "
                             f"(it implies {tuple(t.shape)})")


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

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path, got {type(path).__name__}")
    folder = Path(path)
    _recover(folder.resolve())
    qcfg = read_quantization_config(folder)
    files = _checkpoint_files(folder)
    headers = _read_headers(folder, files)
    for name, entry in qcfg.layers.items():
        _check_layer_tensors(name, entry, headers)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{folder / 'config.json'} is not a valid transformers config: "
                         f"{type(e).__name__}: {e}") from None
    _check_depth(config, headers, folder)
    try:
        with _params_on_meta():
            model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype or torch.float32))
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise ValueError(f"cannot build the model of {folder / 'config.json'}: "
                         f"{type(e).__name__}: {e}") from None
    from .nn_embedding import attach_embeddings, embeddings_entry, own_storage_layers

    embeddings = embeddings_entry(qcfg)
    inside_embeddings = own_storage_layers(embeddings)
    for name, entry in qcfg.layers.items():
        if name in inside_embeddings:
            continue  # built by attach_embeddings
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantization_config names layer {name!r}, which the model "
                             "does not have") from None
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != \
                (entry.in_features, entry.out_features):
            raise ValueError(f"quantization_config.layers[{name!r}] is {entry.out_features}x"
                             f"{entry.in_features}, but the model's {name} is {old!r}")
        set_module(model, name, entry.build())
    attach_embeddings(model, embeddings, qcfg.layers, dtype or torch.float32)
    sd = _read_state_dict(folder, files)
    try:
        result = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint in {folder} does not match its config: {e}") from None
    if result.unexpected_keys:
        raise ValueError(f"checkpoint has unexpected tensors: {result.unexpected_keys[:5]}")
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unloaded = [k for k in result.missing_keys if k not in params]
    if unloaded:  # buffers keep their initial values: never load them silently
        raise ValueError(f"checkpoint lacks tensors: {unloaded[:5]}")
    if not embeddings:  # quantized embeddings share their storage already
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
