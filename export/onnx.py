"""A mocohub backbone as an ONNX graph: plain, fp16, with preprocessing inside, with metadata.

Two kinds of graph:

- **plain** (``model.onnx``): input ``images`` float32 ``(batch, C, S, S)``,
  already preprocessed (``Preprocessing.transform()`` / ``.batch()``); output
  ``features`` float32 ``(batch, dim)``, exactly what the PyTorch model returns
  (not L2-normalised).
- **pixels** (``model.preprocess.onnx``, :func:`with_preprocessing`): input
  ``pixels`` uint8 ``(batch, S, S, 3)`` RGB at the crop size ``S``; the graph
  converts to the backbone's channels (RGB to luma with torchvision's weights
  for 1-channel models), scales to [0, 1], normalises with the config's
  mean/std, runs the backbone and returns ``embeddings`` ``(batch, dim)``,
  L2-normalised. A server needs onnxruntime and an image decoder, nothing else.

Every graph carries ``metadata_props``: ``mocohub_config`` (the full
``config.json``), ``arch``, ``embedding_dim``, ``preprocessing`` (JSON),
``input`` (``images`` or ``pixels``), ``normalised``, ``precision``,
``mocohub_version`` and ``weights_sha256`` (the SHA-256 of the
``model.safetensors`` exported with it); :func:`read_metadata` reads them back.

The graph is made by ``torch.onnx.export``'s torch.export-based exporter (the
default since torch 2.9; the TorchScript one is deprecated) at its own opset
(:data:`OPSET`), with a dynamic batch dimension.

Example:
    >>> proto = export_onnx(mocohub.load("out/fmnist"))
    >>> save_onnx(add_metadata(proto, config, precision="fp32"), "out/onnx/model.onnx")
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mocohub.artifact import WEIGHTS_DIGEST_KEY, ModelConfig, get_config
from mocohub.errors import InputError
from mocohub.fileio import atomic_write_bytes
from mocohub.preprocessing import LUMA_WEIGHTS, Preprocessing

__all__ = [
    "FEATURES",
    "IMAGES",
    "OPSET",
    "OUTPUT_EMBEDDINGS",
    "PIXELS",
    "add_metadata",
    "export_onnx",
    "metadata_from_props",
    "read_metadata",
    "save_onnx",
    "to_fp16",
    "with_preprocessing",
]

# Opset 20: what torch 2.14's exporter targets natively (no version conversion
# pass) and what onnxruntime 1.2x-1.3x runs, optimises and quantises without
# falling back (its CPU kernels cover opset 1-23).
OPSET = 20
IMAGES, FEATURES = "images", "features"
PIXELS, OUTPUT_EMBEDDINGS = "pixels", "embeddings"
_BATCH = "batch"


def export_onnx(model: torch.nn.Module, *, opset: int = OPSET) -> onnx.ModelProto:
    """The plain fp32 graph of a mocohub model (``images`` -> ``features``), dynamic batch.

    Example:
        >>> proto = export_onnx(mocohub.load("out/fmnist"))
        >>> [i.name for i in proto.graph.input]
        ['images']
    """
    prep = get_config(model).preprocessing
    example = torch.zeros(2, prep.channels, prep.image_size, prep.image_size)
    model = model.float().eval()
    batch = torch.export.Dim(_BATCH)
    # The exporter narrates its steps on stdout and warns about internals the user
    # cannot act on; keep the CLI's output to the export's own report.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[IMAGES],
                output_names=[FEATURES],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except ImportError as e:  # onnxscript, which the exporter needs, is missing
            raise InputError(
                f"torch.onnx.export needs a package that is not installed ({e}); "
                "run `pip install onnxscript`."
            ) from e
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    _name_batch_dims(proto)
    return proto


def _name_batch_dims(proto: onnx.ModelProto) -> None:
    """Call the first dimension of every graph input and output ``batch``."""
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = _BATCH


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with float16 weights and maths, float32 inputs and outputs (for GPUs)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values truncated to fp16 range": reported by verify
        converted: onnx.ModelProto = convert_float_to_float16(proto, keep_io_types=True)
    # The converter appends the input casts after the nodes that use them; the
    # ONNX spec (and onnx.checker) wants the nodes in topological order.
    OnnxModel(converted).topological_sort()
    return converted


def with_preprocessing(core: onnx.ModelProto, prep: Preprocessing) -> onnx.ModelProto:
    """``pixels`` uint8 (batch, S, S, 3) -> normalise -> ``core`` -> L2-normalised ``embeddings``.

    ``core`` is a plain graph at any precision (fp32, fp16 with float32 I/O,
    int8). The preprocessing is ``x * 1/(255 std) - mean/std`` per channel,
    the same as :meth:`Preprocessing.batch` on images already ``S`` x ``S``.

    Example:
        >>> pixels_graph = with_preprocessing(export_onnx(model), config.preprocessing)
    """
    opset = _default_opset(core)
    size, channels = prep.image_size, prep.channels
    std, mean = np.asarray(prep.std, np.float32), np.asarray(prep.mean, np.float32)
    scale = (1.0 / (255.0 * std.astype(np.float64))).astype(np.float32)
    inits = [
        numpy_helper.from_array(scale, "mocohub_pre_scale"),
        numpy_helper.from_array((-mean / std).astype(np.float32), "mocohub_pre_bias"),
        numpy_helper.from_array(np.array([1e-12], np.float32), "mocohub_post_eps"),
    ]
    nodes = [helper.make_node("Cast", [PIXELS], ["mocohub_pre_float"], to=TensorProto.FLOAT)]
    last = "mocohub_pre_float"
    if channels == 1:
        inits.append(
            numpy_helper.from_array(np.array(LUMA_WEIGHTS, np.float32)[:, None], "mocohub_luma")
        )
        nodes.append(helper.make_node("MatMul", [last, "mocohub_luma"], ["mocohub_pre_gray"]))
        last = "mocohub_pre_gray"
    nodes += [
        helper.make_node("Mul", [last, "mocohub_pre_scale"], ["mocohub_pre_scaled"]),
        helper.make_node("Add", ["mocohub_pre_scaled", "mocohub_pre_bias"], ["mocohub_pre_nhwc"]),
        helper.make_node("Transpose", ["mocohub_pre_nhwc"], [IMAGES], perm=[0, 3, 1, 2]),
    ]
    core_input = core.graph.input[0].name
    if core_input != IMAGES:
        raise InputError(f"The graph's input is {core_input!r}, not {IMAGES!r}; export it again.")
    post: list[onnx.NodeProto] = []
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "mocohub_post_axes"))
        post.append(
            helper.make_node("ReduceL2", [FEATURES, "mocohub_post_axes"], ["mocohub_post_norm"])
        )
    else:
        post.append(helper.make_node("ReduceL2", [FEATURES], ["mocohub_post_norm"], axes=[1]))
    post += [
        helper.make_node("Max", ["mocohub_post_norm", "mocohub_post_eps"], ["mocohub_post_den"]),
        helper.make_node("Div", [FEATURES, "mocohub_post_den"], [OUTPUT_EMBEDDINGS]),
    ]
    merged = onnx.ModelProto()
    merged.CopyFrom(core)
    graph = merged.graph
    all_nodes = [*nodes, *graph.node, *post]
    del graph.node[:]
    graph.node.extend(all_nodes)
    graph.initializer.extend(inits)
    dim = core.graph.output[0].type.tensor_type.shape.dim[1]
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, [_BATCH, size, size, 3])
    )
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(
            OUTPUT_EMBEDDINGS, TensorProto.FLOAT, [_BATCH, dim.dim_value or None]
        )
    )
    return merged


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return OPSET


def add_metadata(
    proto: onnx.ModelProto,
    config: ModelConfig,
    *,
    precision: str,
    weights_sha256: str | None = None,
) -> onnx.ModelProto:
    """Write mocohub's ``metadata_props`` (see the module docstring) into ``proto``; returns it.

    ``weights_sha256``: the SHA-256 of the ``model.safetensors`` the graph was
    made from, so that loaders can refuse a folder mixing two exports.

    Example:
        >>> proto = add_metadata(export_onnx(model), config, precision="fp32",
        ...                      weights_sha256=file_sha256("out/model.safetensors"))
    """
    from mocohub import __version__

    pixels = proto.graph.input[0].name == PIXELS
    values = {
        "mocohub_config": json.dumps(config.to_dict()),
        "mocohub_version": __version__,
        "arch": config.arch,
        "embedding_dim": str(config.embedding_dim),
        "preprocessing": json.dumps(config.preprocessing.to_dict()),
        "input": PIXELS if pixels else IMAGES,
        "normalised": "true" if pixels else "false",
        "precision": precision,
    }
    if weights_sha256 is not None:
        values[WEIGHTS_DIGEST_KEY] = weights_sha256
    kept = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in kept}, **values})
    proto.producer_name = "mocohub"
    proto.producer_version = __version__
    proto.doc_string = (
        f"mocohub {config.arch} embeddings ({config.embedding_dim}-d, {precision}); "
        f"input {'uint8 pixels (batch, S, S, 3)' if pixels else 'preprocessed images'}."
    )
    return proto


def read_metadata(source: str | os.PathLike[str] | onnx.ModelProto) -> dict[str, Any]:
    """mocohub's metadata of an ONNX file: ``config`` (ModelConfig), ``input``, ``normalised``...

    Example:
        >>> read_metadata("out/onnx/model.onnx")["config"].embedding_dim
        512
    """
    if isinstance(source, onnx.ModelProto):
        return metadata_from_props({p.key: p.value for p in source.metadata_props}, "The graph")
    try:
        proto = onnx.load(os.fspath(source), load_external_data=False)
    except Exception as e:  # onnx raises OSError, DecodeError or its own errors
        raise InputError(f"{source} is not a readable ONNX file ({e}).") from e
    return metadata_from_props({p.key: p.value for p in proto.metadata_props}, str(source))


def metadata_from_props(props: Mapping[str, str], source: str) -> dict[str, Any]:
    """Parse mocohub's ``metadata_props`` (e.g. onnxruntime's ``custom_metadata_map``)."""
    if "mocohub_config" not in props:
        raise InputError(f"{source} has no mocohub metadata; export it with `mocohub export`.")
    try:
        config = ModelConfig.from_dict(json.loads(props["mocohub_config"]))
    except json.JSONDecodeError as e:
        raise InputError(f"{source} has damaged mocohub metadata ({e}); export it again.") from e
    return {
        "config": config,
        "input": props.get("input", IMAGES),
        "normalised": props.get("normalised") == "true",
        "precision": props.get("precision", "fp32"),
        "mocohub_version": props.get("mocohub_version"),
        "weights_sha256": props.get(WEIGHTS_DIGEST_KEY),
    }


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Check ``proto`` with ``onnx.checker`` and write it atomically as one file."""
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
