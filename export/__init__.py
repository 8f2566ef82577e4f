"""mocohub.export: ship a MoCo backbone (safetensors, ONNX, onnxruntime inference and serving).

- :func:`export_model` (``mocohub export``): the published artifact folder
  (``model.safetensors`` + ``config.json`` + model card) and ONNX graphs
  (fp32, fp16, int8; plain or with the preprocessing inside), each verified
  against PyTorch. The folder layout is in :mod:`mocohub.export.pipeline`.
- :class:`OnnxEmbedder` / :func:`open_embedder`: run an exported graph with
  onnxruntime (TensorRT/CUDA when present, else the CPU); the ``onnxruntime``
  backend of ``mocohub embed``.
- ``mocohub serve`` (:mod:`mocohub.export.serve`): an HTTP server of embeddings.

Imports ``mocohub`` only; nothing in ``mocohub`` imports this package. Names
are imported on first use, so ``import mocohub.export`` is cheap.

Example:
    >>> from mocohub.export import export_model, open_embedder
    >>> export_model("runs/fmnist/model", "out/fmnist", int8=True)
    >>> open_embedder("out/fmnist").embed_batch(batch).shape
    (64, 512)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mocohub._lazy import lazy_exports

__all__ = ["OnnxEmbedder", "VerificationError", "export_model", "open_embedder"]

_LAZY = {
    "OnnxEmbedder": "mocohub.export.onnx_embedder",
    "open_embedder": "mocohub.export.onnx_embedder",
    "export_model": "mocohub.export.pipeline",
    "VerificationError": "mocohub.export.verify",
}

if TYPE_CHECKING:
    from .onnx_embedder import OnnxEmbedder, open_embedder
    from .pipeline import export_model
    from .verify import VerificationError


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
