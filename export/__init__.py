"""mocohub.export: ship a MoCo backbone (safetensors, ONNX, onnxruntime serving).

Imports ``mocohub`` only; nothing in ``mocohub`` imports this package.
"""

from __future__ import annotations

__all__: list[str] = []
