"""Embeddings from an exported ONNX model with onnxruntime: the ``onnxruntime`` backend.

:class:`OnnxEmbedder` has the interface of :class:`mocohub.features.Embedder`
(``preprocessing``, ``dim``, ``embed_batch``), so ``mocohub embed --backend
onnxruntime`` runs it exactly like the PyTorch backend, and
:meth:`OnnxEmbedder.embed_images` serves decoded images (``mocohub serve``).

Execution providers (``providers="auto"``): TensorRT, then CUDA, then the CPU
when the GPU build of onnxruntime is installed and a CUDA device is present
(TensorRT only when its libraries can be loaded); the CPU alone otherwise.
Inputs and outputs are bound to the device with I/O binding on a GPU (a CUDA
torch tensor is read in place). On the CPU, onnxruntime gets one intra-op
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

import ctypes.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from mocohub.errors import ConfigError, InputError
from mocohub.models import ModelConfig
from mocohub.preprocessing import _LUMA, Preprocessing, ResizeUnlessSize

from .onnx import IMAGES, PIXELS, metadata_from_props

__all__ = ["MODEL_FILES", "OnnxEmbedder", "find_model_file", "open_embedder", "physical_cores"]

#: file name in an export folder -> (precision, preprocessing inside)
MODEL_FILES: dict[str, tuple[str, bool]] = {
    "model.onnx": ("fp32", False),
    "model.fp16.onnx": ("fp16", False),
    "model.int8.onnx": ("int8", False),
    "model.preprocess.onnx": ("fp32", True),
    "model.preprocess.fp16.onnx": ("fp16", True),
    "model.preprocess.int8.onnx": ("int8", True),
}
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_PROVIDER_NAMES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return len(cores) or os.cpu_count() or 1


def _tensorrt_loadable() -> bool:
    for name in ("nvinfer", "nvinfer_10"):
        found = ctypes.util.find_library(name)
        if found:
            try:
                ctypes.CDLL(found)
                return True
            except OSError:
                continue
    return False


def resolve_providers(providers: str | Sequence[str] = "auto") -> list[str]:
    """onnxruntime provider names for ``"auto"``, ``"cpu"``, ``"cuda"``, ``"tensorrt"``, a list."""
    available = ort.get_available_providers()
    if isinstance(providers, str):
        if providers == "auto":
            chosen = []
            if "CUDAExecutionProvider" in available and torch.cuda.is_available():
                if "TensorrtExecutionProvider" in available and _tensorrt_loadable():
                    chosen.append("TensorrtExecutionProvider")
                chosen.append("CUDAExecutionProvider")
            return [*chosen, "CPUExecutionProvider"]
        if providers not in _PROVIDER_NAMES:
            raise ConfigError(
                f"Unknown providers {providers!r}; use auto, cpu, cuda, tensorrt or a list of "
                "onnxruntime provider names."
            )
        providers = _PROVIDER_NAMES[providers]
    missing = [p for p in providers if p not in available]
    if missing:
        raise ConfigError(
            f"onnxruntime here has no {', '.join(missing)} (it has {', '.join(available)}); "
            "install onnxruntime-gpu with a matching CUDA, or use providers='cpu'."
        )
    return list(providers)


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

    Attributes:
        preprocessing, dim, config: from the file's metadata.
        input: ``"images"`` (plain graph) or ``"pixels"`` (preprocessing inside).
        normalised: whether the graph's output rows are L2-normalised.
        precision, providers: the file's precision and the providers in use.

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
    ) -> None:
        self.path = _graph_in(Path(path)) if Path(path).is_dir() else Path(path)
        if not self.path.is_file():
            raise InputError(
                f"{self.path} does not exist; pass an .onnx file or an export folder written "
                "by `mocohub export`."
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or physical_cores()
        options.log_severity_level = 3  # errors only: onnxruntime's advice is not the user's
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=resolve_providers(providers)
            )
        except Exception as e:  # onnxruntime's Fail, InvalidGraph, InvalidProtobuf, NoSuchFile
            raise InputError(f"onnxruntime cannot load {self.path} ({e}).") from e
        meta = metadata_from_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        self.config: ModelConfig = meta["config"]
        self.preprocessing: Preprocessing = self.config.preprocessing
        self.input: str = meta["input"]
        self.normalised: bool = meta["normalised"]
        self.precision: str = meta["precision"]
        self.dim: int = self.config.embedding_dim
        self.providers: list[str] = self.session.get_providers()
        self.on_gpu = self.providers[0] in _GPU_PROVIDERS
        self.io_binding = self.on_gpu if io_binding is None else io_binding
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._resize = ResizeUnlessSize(self.preprocessing)
        if self.input_name not in (IMAGES, PIXELS):
            raise InputError(f"{self.path} is not a mocohub graph (input {self.input_name!r}).")

    def __repr__(self) -> str:
        return (
            f"OnnxEmbedder({str(self.path)!r}, input={self.input}, dim={self.dim}, "
            f"precision={self.precision}, providers={self.providers})"
        )

    def _check(self, shape: Sequence[int]) -> None:
        size, channels = self.preprocessing.image_size, self.preprocessing.channels
        expected = (channels, size, size) if self.input == IMAGES else (size, size, 3)
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
        if isinstance(images, torch.Tensor) and images.is_cuda and self.io_binding:
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
            dtype = torch.float32 if self.input == IMAGES else torch.uint8
            x = x.to(dtype).contiguous()
            self._check(x.shape)
            binding.bind_input(
                self.input_name,
                "cuda",
                x.device.index or 0,
                np.float32 if self.input == IMAGES else np.uint8,
                list(x.shape),
                x.data_ptr(),
            )
        else:
            binding.bind_cpu_input(self.input_name, x)
        binding.bind_output(self.output_name, "cuda" if self.on_gpu else "cpu")
        self.session.run_with_iobinding(binding)
        out: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return out.astype(np.float32, copy=False)

    def pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded images resized and centre-cropped to the crop size, uint8 (N, S, S, 3) RGB."""
        return np.stack(
            [np.asarray(self._resize(im).convert("RGB"), dtype=np.uint8) for im in images]
        )

    def embed_images(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        """L2-normalised ``(N, dim)`` embeddings of PIL images (or of :meth:`pixels`' output).

        The images are resized and cropped as the model's preprocessing says;
        a ``pixels`` graph normalises inside, a plain graph is fed the same
        normalisation computed here (the same maths as ``Preprocessing.batch()``).
        """
        pixels = images if isinstance(images, np.ndarray) else self.pixels(images)
        if self.input == PIXELS:
            return self.embed_batch(pixels)
        prep = self.preprocessing
        x: np.ndarray = pixels.astype(np.float32) / 255.0
        if prep.channels == 1:
            x = x @ np.asarray(_LUMA, np.float32)[:, None]
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


def _graph_in(folder: Path) -> Path:
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


def open_embedder(
    path: str | os.PathLike[str],
    *,
    precision: str | None = None,
    providers: str | Sequence[str] = "auto",
    threads: int | None = None,
) -> OnnxEmbedder:
    """An :class:`OnnxEmbedder` for an ``.onnx`` file or an export folder (plain graph).

    A graph with the preprocessing inside (``model.preprocess*.onnx``, uint8
    pixels in) is refused: it is for ``mocohub serve``.

    Example:
        >>> open_embedder("out/onnx").path.name
        'model.onnx'
        >>> open_embedder("out/onnx", precision="int8").path.name
        'model.int8.onnx'
    """
    source = Path(path)
    if source.is_dir():
        gpu = "CUDAExecutionProvider" in resolve_providers(providers)
        source = find_model_file(source, precision=precision, pixels=False, gpu=gpu)
    elif source.suffix != ".onnx" or not source.is_file():
        raise InputError(
            f"{path} is not an .onnx file or an export folder; create one with "
            "`mocohub export MODEL --out DIR`."
        )
    embedder = OnnxEmbedder(source, providers, threads=threads)
    if embedder.input == PIXELS:
        size = embedder.preprocessing.image_size
        raise InputError(
            f"{source.name} has the preprocessing inside: it takes uint8 images (N, {size}, "
            f"{size}, 3) and is for `mocohub serve` (or OnnxEmbedder.embed_images), while "
            "embedding feeds preprocessed float images; pass the plain graph "
            f"({_plain_name(source.name)}) or the export folder."
        )
    return embedder


def _plain_name(name: str) -> str:
    """``model.preprocess.int8.onnx`` -> ``model.int8.onnx``: the graph without preprocessing."""
    return name.replace(".preprocess", "", 1)
