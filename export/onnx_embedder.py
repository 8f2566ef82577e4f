"""Embeddings from an exported ONNX model with onnxruntime: the ``onnxruntime`` backend.

:class:`OnnxEmbedder` has the interface of :class:`mocohub.features.Embedder`
(``preprocessing``, ``dim``, ``embed_batch``), so ``mocohub embed --backend
onnxruntime`` runs it exactly like the PyTorch backend, and
:meth:`OnnxEmbedder.embed_images` serves decoded images (``mocohub serve``).

Execution providers (``providers="auto"``): TensorRT, then CUDA, then the CPU
when the GPU build of onnxruntime is installed and a CUDA device is present
(TensorRT only when its libraries can be loaded); the CPU alone otherwise. On
a GPU the session runs on ``device`` (default: PyTorch's current device, the
process's own GPU), with the options of :func:`.providers.provider_options`
(TensorRT: an engine cache, a profile for batches 1..``max_batch``, fp16 for
fp16 graphs; CUDA: no exhaustive cuDNN search), and inputs and outputs are
bound to the device with I/O binding (a CUDA torch tensor is read in place,
once the PyTorch kernels that produced it are done). A batch larger than
``max_batch`` is run in parts. On the CPU, onnxruntime gets one intra-op
thread per physical core (hyper-threads share a core's vector units and only
add contention).

:func:`open_embedder` takes one ``.onnx`` file, or an export folder in which
it picks a plain graph (``images`` input, raw features): with ``precision``
None, ``model.fp16.onnx`` on a GPU when present, else ``model.onnx`` (fp32).
int8 is never picked on its own: its embeddings differ from PyTorch's more
(cosine >= 0.98 instead of >= 0.9999) and that is the user's call; name the
file, or pass ``precision="int8"``.

Example:
    >>> emb = open_embedder("out/onnx")
    >>> emb.embed_batch(np.zeros((2, 1, 28, 28), np.float32)).shape
    (2, 128)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from mocohub.artifact import ModelConfig
from mocohub.errors import ConfigError, InputError
from mocohub.features import CropToTensor
from mocohub.preprocessing import LUMA_WEIGHTS, Preprocessing
from mocohub.sysinfo import physical_cores

from .model_files import find_model_file, graph_in, plain_name
from .onnx import IMAGES, PIXELS, metadata_from_props, read_metadata
from .providers import (
    DEFAULT_MAX_BATCH,
    GPU_PROVIDERS,
    provider_options,
    resolve_device,
    resolve_providers,
    trt_cache_folder,
)
from .publish import check_graph_folder

__all__ = ["OnnxEmbedder", "open_embedder", "resolve_providers"]


class OnnxEmbedder:
    """An exported mocohub graph in an onnxruntime session.

    Args:
        path: an ``.onnx`` file written by ``mocohub export``, or its export
            folder: then ``model.onnx`` (or the folder's only graph; with
            several and no ``model.onnx``, name one).
        providers: ``"auto"`` (see the module docstring), ``"cpu"``, ``"cuda"``,
            ``"tensorrt"`` or a list of onnxruntime provider names.
        threads: CPU intra-op threads (default: the physical cores).
        io_binding: bind inputs/outputs to the device (default: on a GPU only).
        device: ``None``/``"auto"`` (PyTorch's current CUDA device when the
            providers include a GPU one), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        max_batch: the most rows in one onnxruntime call; larger batches are
            run in parts (TensorRT's optimisation profile spans 1..max_batch).

    Attributes:
        preprocessing, dim, config: from the file's metadata.
        input: ``"images"`` (plain graph) or ``"pixels"`` (preprocessing inside).
        normalised: whether the graph's output rows are L2-normalised.
        precision, providers: the file's precision and the providers in use.
        device_id: the CUDA device the session runs on (None: the CPU).

    Example:
        >>> emb = OnnxEmbedder("out/onnx/model.onnx", providers="cpu")
        >>> emb.embed_images([Image.open("a.png")]).shape
        (1, 128)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: str | Sequence[str] = "auto",
        *,
        threads: int | None = None,
        io_binding: bool | None = None,
        device: str | int | torch.device | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.path = graph_in(Path(path)) if Path(path).is_dir() else Path(path)
        if not self.path.is_file():
            raise InputError(
                f"{self.path} does not exist; pass an .onnx file or an export folder written "
                "by `mocohub export`."
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or physical_cores()
        options.log_severity_level = 3  # errors only: onnxruntime's advice is not the user's
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}.")
        self.max_batch = max_batch
        chosen, device_id = resolve_device(device, providers)
        configured = self._provider_options(chosen, device_id)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=configured)
        except Exception as e:  # onnxruntime's Fail, InvalidGraph, InvalidProtobuf, NoSuchFile
            raise InputError(f"onnxruntime cannot load {self.path} ({e}).") from e
        meta = metadata_from_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        self.config: ModelConfig = meta["config"]
        self.preprocessing: Preprocessing = self.config.preprocessing
        self.input: str = meta["input"]
        self.normalised: bool = meta["normalised"]
        self.precision: str = meta["precision"]
        self.dim: int = self.config.embedding_dim
        self.weights_sha256: str | None = meta["weights_sha256"]
        check_graph_folder(self.path, self.weights_sha256)
        self.providers: list[str] = self.session.get_providers()
        if self.providers[0] != chosen[0]:  # onnxruntime fell back after an error it logged
            warnings.warn(
                f"onnxruntime could not start {chosen[0]}; {self.path.name} runs on "
                f"{self.providers[0]} instead.",
                UserWarning,
                stacklevel=2,
            )
        self.on_gpu = self.providers[0] in GPU_PROVIDERS
        # the device the session really got (a fallback session loses the options)
        used = self.session.get_provider_options().get(self.providers[0], {})
        self.device_id: int | None = int(used.get("device_id", 0)) if self.on_gpu else None
        self.io_binding = self.on_gpu if io_binding is None else io_binding
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._crop = CropToTensor(self.preprocessing)
        #: the mode images are decoded to for this model: "L" (gray) or "RGB"
        self.mode: str = self._crop.mode
        if self.input_name not in (IMAGES, PIXELS):
            raise InputError(f"{self.path} is not a mocohub graph (input {self.input_name!r}).")

    def __repr__(self) -> str:
        return (
            f"OnnxEmbedder({str(self.path)!r}, input={self.input}, dim={self.dim}, "
            f"precision={self.precision}, providers={self.providers})"
        )

    def _provider_options(
        self, chosen: list[str], device_id: int | None
    ) -> list[tuple[str, dict[str, str]]]:
        """:func:`.providers.provider_options` for this graph (TensorRT reads its metadata)."""
        if "TensorrtExecutionProvider" not in chosen:
            return provider_options(chosen, device_id=device_id or 0)
        meta = read_metadata(self.path)
        return provider_options(
            chosen,
            device_id=device_id or 0,
            input_name=meta["input"],
            item_shape=_item_shape(meta["input"], meta["config"].preprocessing),
            max_batch=self.max_batch,
            fp16=meta["precision"] == "fp16",
            trt_cache=trt_cache_folder(self.path, device_id or 0),
        )

    def _check(self, shape: Sequence[int]) -> None:
        expected = _item_shape(self.input, self.preprocessing)
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            layout = "(N, C, H, W) float32" if self.input == IMAGES else "(N, H, W, 3) uint8"
            raise InputError(
                f"{self.path.name} takes a batch of shape (N, {', '.join(map(str, expected))}) "
                f"({layout}), got {tuple(shape)}."
            )

    def embed_batch(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """The graph's output ``(N, dim)`` float32 for one batch.

        For a plain graph, ``images`` are float32 NCHW, already preprocessed,
        and the result is the raw features (as the PyTorch model's); for a
        ``pixels`` graph they are uint8 (N, S, S, 3) and the result is
        L2-normalised.
        """
        if len(images) > self.max_batch:
            parts = range(0, len(images), self.max_batch)
            return np.concatenate([self.embed_batch(images[i : i + self.max_batch]) for i in parts])
        if isinstance(images, torch.Tensor) and images.is_cuda and self.on_gpu and self.io_binding:
            return self._run_bound(images)
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        dtype = np.float32 if self.input == IMAGES else np.uint8
        array = np.ascontiguousarray(array, dtype=dtype)
        self._check(array.shape)
        if self.io_binding:
            return self._run_bound(array)
        out: np.ndarray = self.session.run([self.output_name], {self.input_name: array})[0]
        return out.astype(np.float32, copy=False)

    def _run_bound(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        binding = self.session.io_binding()
        if isinstance(x, torch.Tensor):  # a CUDA tensor: read in place, no host round trip
            device_id = self.device_id if self.device_id is not None else 0
            if x.device.index != device_id:
                raise InputError(
                    f"The batch is on {x.device} but {self.path.name} runs on cuda:"
                    f"{device_id}; open it with device='{x.device}' (mocohub embed "
                    f"--device {x.device}) or move the batch."
                )
            dtype = torch.float32 if self.input == IMAGES else torch.uint8
            x = x.to(dtype).contiguous()
            self._check(x.shape)
            # onnxruntime runs on a CUDA stream of its own, which does not wait for the
            # kernels PyTorch queued on its current stream: the ones that produce `x` (the
            # normalisation, the copy from the host, the cast above) may still be running
            # when the graph reads it. So the host waits for them here. onnxruntime's other
            # way, its `user_compute_stream` option, was not chosen: it fixes one stream when
            # the session is made, while PyTorch's current stream is per thread and may
            # change between calls, and onnxruntime ignores the handle 0 of PyTorch's default
            # stream, so the race would stay in the commonest case. The wait costs little:
            # the run and the copy of the output to the host block anyway.
            torch.cuda.current_stream(x.device).synchronize()
            binding.bind_input(
                self.input_name,
                "cuda",
                device_id,
                np.float32 if self.input == IMAGES else np.uint8,
                list(x.shape),
                x.data_ptr(),
            )
        else:
            binding.bind_cpu_input(self.input_name, x)
        if self.on_gpu:
            binding.bind_output(self.output_name, "cuda", self.device_id or 0)
        else:
            binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        out: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return out.astype(np.float32, copy=False)

    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded images as ``mocohub embed`` crops them, uint8 (N, S, S, C).

        Each image is converted to the model's channels (``C``: 1 for gray
        models, :func:`~mocohub.imageio.to_mode`: transparency on white), then
        resized and centre-cropped by :class:`~mocohub.features.CropToTensor`,
        the crop ``mocohub embed`` and :class:`~mocohub.features.FeatureExtractor`
        use, so every path sees the same pixels.
        """
        if isinstance(images, Image.Image):
            images = [images]
        for image in images:
            if not isinstance(image, Image.Image):
                raise InputError(
                    f"embed_images takes PIL images (or pixels()' array), got a "
                    f"{type(image).__name__}; for file paths, use "
                    "mocohub.FeatureExtractor(embedder)(paths), which decodes them."
                )
        crops = [self._crop(im).permute(1, 2, 0).numpy() for im in images]
        size, channels = self.preprocessing.image_size, self.preprocessing.channels
        return np.stack(crops) if crops else np.zeros((0, size, size, channels), np.uint8)

    def embed_images(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        """L2-normalised ``(N, dim)`` embeddings of PIL images (or of :meth:`pixels`' output).

        The images are cropped by :meth:`pixels` (an array may also hold RGB
        crops, (N, S, S, 3), for a gray model); a ``pixels`` graph normalises
        inside (gray crops repeated to RGB), a plain graph is fed the same
        normalisation computed here (the same maths as ``Preprocessing.batch()``).
        """
        pixels = images if isinstance(images, np.ndarray) else self.pixels(images)
        if self.input == PIXELS:
            return self.embed_batch(np.repeat(pixels, 3, -1) if pixels.shape[-1] == 1 else pixels)
        prep = self.preprocessing
        x: np.ndarray = pixels.astype(np.float32) / 255.0
        if prep.channels == 1 and x.shape[-1] == 3:
            x = x @ np.asarray(LUMA_WEIGHTS, np.float32)[:, None]
        elif prep.channels == 3 and x.shape[-1] == 1:
            x = np.repeat(x, 3, -1)
        x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
        features = self.embed_batch(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        norms = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        return (features / norms).astype(np.float32)

    def info(self) -> dict[str, Any]:
        """What this embedder runs: file, input, dim, precision, providers, preprocessing."""
        return {
            "model": self.path.name,
            "arch": self.config.arch,
            "dim": self.dim,
            "input": self.input,
            "precision": self.precision,
            "normalised": True,
            "providers": self.providers,
            "preprocessing": self.preprocessing.to_dict(),
        }


def _item_shape(graph_input: str, prep: Preprocessing) -> tuple[int, int, int]:
    """One item of the graph's input: (C, S, S) float images, or (S, S, 3) uint8 pixels."""
    size = prep.image_size
    return (prep.channels, size, size) if graph_input == IMAGES else (size, size, 3)


def open_embedder(
    path: str | os.PathLike[str],
    *,
    precision: str | None = None,
    providers: str | Sequence[str] = "auto",
    threads: int | None = None,
    device: str | int | torch.device | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> OnnxEmbedder:
    """An :class:`OnnxEmbedder` for an ``.onnx`` file or an export folder (plain graph).

    A graph with the preprocessing inside (``model.preprocess*.onnx``, uint8
    pixels in) is refused: it is for ``mocohub serve``. ``device`` and
    ``max_batch``: see :class:`OnnxEmbedder` (``mocohub embed --device cuda:1``).

    Example:
        >>> open_embedder("out/onnx").path.name
        'model.onnx'
        >>> open_embedder("out/onnx", precision="int8").path.name
        'model.int8.onnx'
    """
    source = Path(path)
    if source.is_dir():
        gpu = resolve_device(device, providers)[1] is not None
        source = find_model_file(source, precision=precision, pixels=False, gpu=gpu)
    elif source.suffix != ".onnx" or not source.is_file():
        raise InputError(
            f"{path} is not an .onnx file or an export folder; create one with "
            "`mocohub export MODEL --out DIR`."
        )
    embedder = OnnxEmbedder(source, providers, threads=threads, device=device, max_batch=max_batch)
    if embedder.input == PIXELS:
        size = embedder.preprocessing.image_size
        raise InputError(
            f"{source.name} has the preprocessing inside: it takes uint8 images (N, {size}, "
            f"{size}, 3) and is for `mocohub serve` (or OnnxEmbedder.embed_images), while "
            "embedding feeds preprocessed float images; pass the plain graph "
            f"({plain_name(source.name)}) or the export folder."
        )
    return embedder
