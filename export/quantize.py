"""int8 quantization of a plain graph with onnxruntime, and the image folders it calibrates on.

Static (calibration images given): QDQ format, per-channel int8 weights,
uint8 activations, MinMax ranges from the calibration images. ``reduce_range``
(7-bit weights) is on: on x86 CPUs without VNNI (AVX2 only) it lets
onnxruntime's U8S8 kernels multiply-add without saturating and ran ~1.6x faster
than full-range weights (ResNet-50, 2-core Zen 3), for a cosine loss well
inside the verification bound. Dynamic (no calibration images): weights
quantized ahead of time (uint8: onnxruntime's ``ConvInteger`` has no int8-weight
kernel), activation ranges computed per batch at run time.

``quant_pre_process`` (symbolic shape inference + graph optimisation) runs
first, as onnxruntime's quantization guide advises.

Example:
    >>> images = load_image_folder("calib/", prep, limit=128)
    >>> int8 = quantize_int8(export_onnx(model), calibration=images.tensors.numpy())
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from mocohub.errors import InputError
from mocohub.imageio import IMAGE_EXTENSIONS, DecodeError, decode_image, scan_inputs
from mocohub.preprocessing import Preprocessing

__all__ = ["VIT_OP_TYPES", "ImageSet", "load_image_folder", "quantize_int8"]

#: What a ViT's int8 graph quantizes: the patch projection and the matrix products
#: (attention's and the MLPs'), where nearly all its time goes. LayerNorm, Softmax,
#: GELU and the residual Adds stay float, as onnxruntime's transformer guidance
#: advises: quantizing them too (the default) cost parity on a vit_mini (see
#: tests/test_vit_export.py) and leaves no int8 kernel to gain speed from.
VIT_OP_TYPES = ("Conv", "MatMul", "Gemm")


@dataclass
class ImageSet:
    """Decoded images, in both of the exported graphs' input forms.

    ``tensors``: float32 (N, C, S, S), exactly what ``mocohub embed`` and
    :meth:`~mocohub.features.FeatureExtractor.prepare` feed the model for each
    file; ``pixels``: uint8 (N, S, S, 3), the same crops before normalisation
    (gray ones repeated to three channels), for graphs with the preprocessing
    inside; ``names``: the files, relative to the folder; ``skipped``: files
    that could not be decoded.
    """

    tensors: torch.Tensor
    pixels: np.ndarray
    names: list[str]
    skipped: list[str]


def load_image_folder(
    folder: str | os.PathLike[str], prep: Preprocessing, *, limit: int = 256
) -> ImageSet:
    """The first ``limit`` images of ``folder`` (sorted by path, subfolders included).

    Files are found and decoded as ``mocohub embed`` finds and decodes them
    (:func:`~mocohub.imageio.scan_inputs`, :func:`~mocohub.imageio.decode_image`:
    EXIF orientation, mode conversion, pixel limit) and cropped by the same
    :class:`~mocohub.features.CropToTensor`. Files that cannot be decoded are
    skipped and listed in ``skipped``; a folder with no decodable image is an
    :class:`~mocohub.errors.InputError`.

    Example:
        >>> load_image_folder("samples/fashion-mnist", prep, limit=64).tensors.shape
        torch.Size([64, 1, 28, 28])
    """
    from mocohub.features import CropToTensor

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; pass a folder of images.")
    crop = CropToTensor(prep)
    crops: list[torch.Tensor] = []
    names: list[str] = []
    skipped: list[str] = []
    for path in scan_inputs([root]):
        if len(names) >= limit:
            break
        name = str(Path(path).relative_to(root))
        try:
            image = decode_image(path, mode=crop.mode, min_size=prep.resize_size)
        except DecodeError:
            skipped.append(name)
            continue
        crops.append(crop(image))
        names.append(name)
    if not names:
        raise InputError(
            f"{root} holds no image mocohub can decode ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "point it at a folder of images."
        )
    stacked = torch.stack(crops)
    pixels = stacked.permute(0, 2, 3, 1).numpy()
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return ImageSet(prep.batch()(stacked), np.ascontiguousarray(pixels), names, skipped)


class _Batches(CalibrationDataReader):
    """onnxruntime's CalibrationDataReader protocol over an array of inputs."""

    def __init__(self, input_name: str, data: np.ndarray, batch_size: int = 16) -> None:
        self.input_name, self.data, self.batch_size = input_name, data, batch_size
        self._iter: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = (
            {self.input_name: np.ascontiguousarray(self.data[i : i + self.batch_size])}
            for i in range(0, len(self.data), self.batch_size)
        )


def quantize_int8(
    proto: onnx.ModelProto,
    *,
    calibration: np.ndarray | None = None,
    op_types: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """The int8 version of a plain fp32 graph: static QDQ with ``calibration`` inputs, else dynamic.

    Args:
        proto: a plain graph (input ``images``), as :func:`export_onnx` returns.
        calibration: float32 (N, C, S, S) preprocessed images; None quantizes dynamically.
        op_types: the operators to quantize; None: every one onnxruntime can (right for
            ResNets). For a ViT, :data:`VIT_OP_TYPES` (see there).

    Example:
        >>> int8 = quantize_int8(proto, calibration=images.tensors.numpy())
    """
    input_name = proto.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="mocohub-int8-") as tmp:
        source, prepared, target = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "q.onnx"))
        onnx.save(proto, str(source))
        quantizer_log = logging.getLogger()
        level = quantizer_log.level
        quantizer_log.setLevel(logging.ERROR)  # the quantizer logs advice at INFO/WARNING
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(str(source), str(prepared))
                if calibration is None:
                    quantize_dynamic(
                        str(prepared),
                        str(target),
                        per_channel=True,
                        weight_type=QuantType.QUInt8,
                        op_types_to_quantize=None if op_types is None else list(op_types),
                    )
                else:
                    reader = _Batches(input_name, calibration.astype(np.float32, copy=False))
                    quantize_static(
                        str(prepared),
                        str(target),
                        reader,
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        reduce_range=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        op_types_to_quantize=None if op_types is None else list(op_types),
                    )
        finally:
            quantizer_log.setLevel(level)
        return onnx.load(str(target))
