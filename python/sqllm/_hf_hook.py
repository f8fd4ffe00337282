"""Register sqllm with transformers when transformers loads its quantizer registry.

``import sqllm`` runs :func:`install_transformers_integration`: if
``transformers.quantizers.auto`` is already imported, :mod:`sqllm.hf_integration`
is imported (which registers) at once; otherwise a one-shot import hook does it
right after transformers executes that module (transformers imports it with its
modeling code, so before any ``from_pretrained``).  This keeps ``import sqllm``
from paying for transformers' quantizer imports (seconds).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any, Optional

__all__ = ["install_transformers_integration"]

log = logging.getLogger(__name__)

_AUTO = "transformers.quantizers.auto"


def _register() -> None:
    try:
        importlib.import_module("sqllm.hf_integration")
    except Exception as e:  # never break transformers' own import
        log.warning("could not register sqllm with transformers: %s", e)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """One shot: wrap the loader of ``transformers.quantizers.auto`` so that sqllm
    registers right after the module executes."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _AUTO:
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _register()

        loader.exec_module = exec_and_register
        return spec


_hook: Optional[_RegisterOnImport] = None


def _remove_hook() -> None:
    global _hook
    if _hook is not None and _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
    _hook = None


def install_transformers_integration() -> None:
    """Make ``from_pretrained`` read sqllm folders: now, or when transformers loads its
    quantizers.  Does nothing without transformers."""
    global _hook
    if _AUTO in sys.modules:
        _register()
        return
    if importlib.util.find_spec("transformers") is None:
        return
    if _hook is None:
        _hook = _RegisterOnImport()
        sys.meta_path.insert(0, _hook)
