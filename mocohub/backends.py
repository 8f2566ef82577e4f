"""Embedding backends by name: ``torch`` (in-process PyTorch) or ``onnxruntime``.

A backend is a function that opens an :class:`~mocohub.features.Embedder` for
a model path. :data:`BACKENDS` names each as "module:function", so that
``mocohub`` imports ``mocohub.export`` (and onnxruntime) only when the
``onnxruntime`` backend is asked for.

Example:
    >>> open_backend("torch").__name__
    'open_torch_embedder'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from mocohub.errors import ConfigError

__all__ = ["BACKENDS", "open_backend"]

# name -> "module:function"; the function opens an Embedder for a model path.
BACKENDS: dict[str, str] = {
    "torch": "mocohub.features:open_torch_embedder",
    "onnxruntime": "mocohub.export.onnx_embedder:open_embedder",
}


def open_backend(name: str) -> Callable[..., Any]:
    """The embedder-opening function of backend ``name``."""
    module_name, attribute = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"The {name} backend needs {module_name} ({e}); install mocohub with its export "
            "part and onnxruntime, or use --backend torch."
        ) from e
