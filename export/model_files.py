"""The graph files of an export folder: their names, and which one a caller runs.

An export folder holds up to six graphs (:data:`MODEL_FILES`): fp32, fp16 and
int8, each plain (preprocessed float images in) or with the preprocessing
inside (uint8 pixels in, for ``mocohub serve``). :func:`find_model_file` picks
the one a caller wants.

Example:
    >>> find_model_file("out/onnx", precision="int8").name
    'model.int8.onnx'
    >>> plain_name("model.preprocess.int8.onnx")
    'model.int8.onnx'
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mocohub.errors import ConfigError, InputError

__all__ = ["MODEL_FILES", "find_model_file", "graph_in", "plain_name"]

#: file name in an export folder -> (precision, preprocessing inside)
MODEL_FILES: dict[str, tuple[str, bool]] = {
    "model.onnx": ("fp32", False),
    "model.fp16.onnx": ("fp16", False),
    "model.int8.onnx": ("int8", False),
    "model.preprocess.onnx": ("fp32", True),
    "model.preprocess.fp16.onnx": ("fp16", True),
    "model.preprocess.int8.onnx": ("int8", True),
}


def graph_in(folder: Path) -> Path:
    """The graph :class:`OnnxEmbedder` runs in an export folder: model.onnx, else its only one."""
    present = [folder / name for name in MODEL_FILES if (folder / name).is_file()]
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    if len(present) == 1:
        return present[0]
    if not present:
        raise InputError(
            f"{folder} holds no mocohub ONNX graph ({', '.join(MODEL_FILES)}); export one with "
            "`mocohub export MODEL --out DIR`, or pass the .onnx file itself."
        )
    raise InputError(
        f"{folder} holds several graphs and no model.onnx ({', '.join(p.name for p in present)}); "
        "pass the one to run."
    )


def find_model_file(
    folder: str | os.PathLike[str],
    *,
    precision: str | None = None,
    pixels: bool | None = False,
    gpu: bool | None = None,
) -> Path:
    """The model file :func:`open_embedder` (``pixels=False``) or ``mocohub serve`` would use.

    ``precision`` None: fp16 on a GPU when present, else fp32; ``pixels``
    None: a ``pixels`` graph when the folder has one, else a plain graph.
    """
    root = Path(folder)
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if precision is not None and precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"precision must be fp32, fp16 or int8, got {precision!r}.")
    order = [precision] if precision else (["fp16", "fp32"] if gpu else ["fp32"])
    kinds = [True, False] if pixels is None else [pixels]
    for inside in kinds:
        for wanted in order:
            for name, (file_precision, file_pixels) in MODEL_FILES.items():
                if (file_precision, file_pixels) == (wanted, inside) and (root / name).is_file():
                    return root / name
    present = sorted(n for n in MODEL_FILES if (root / n).is_file())
    raise InputError(
        f"{root} has no {precision or 'fp32'} "
        f"{'graph' if pixels is None else 'pixels graph' if pixels else 'plain graph'} "
        f"(it has: {', '.join(present) or 'no model file'}); "
        "export one with `mocohub export MODEL --out DIR`."
    )


def plain_name(name: str) -> str:
    """``model.preprocess.int8.onnx`` -> ``model.int8.onnx``: the graph without preprocessing."""
    return name.replace(".preprocess", "", 1)
