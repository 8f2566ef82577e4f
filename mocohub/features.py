"""Features from a MoCo backbone: the backend seam, the PyTorch backend, and ``FeatureExtractor``.

An :class:`Embedder` is anything that turns a preprocessed float32 NCHW batch
into an ``(N, dim)`` float32 array of raw (not yet L2-normalised) features and
says how its input must be prepared (``preprocessing``). :class:`TorchEmbedder`
is the PyTorch one; ``mocohub.export``'s ONNX embedder has the same interface,
so the embed pipeline never needs to know which backend runs.

Precision (``precision="auto"``): what :func:`mocohub.precision.resolve_precision`
picks for the device (bf16 on GPUs and on CPUs with bf16 matrix units, fp32
elsewhere). A reduced precision runs a copy of the model whose weights are
stored in that dtype (the same numbers as ``torch.autocast``, without casting
every weight on every batch), and ``"auto"`` checks it once against fp32, on the
first images of the first batch: if any image's cosine similarity to its fp32
features falls under ``min_cosine`` (0.999), the embedder falls back to fp32 for
good and warns.

Speed at any precision: BatchNorm is folded into the convolutions
(:func:`mocohub.fusion.fuse_batchnorm`, on a copy) and the model runs in
channels_last, which oneDNN serves faster even in fp32 on AVX2 CPUs (ResNet-50,
1 thread: 5.5 images/s NCHW, 7.9 fused + channels_last).

Example:
    >>> fx = FeatureExtractor("runs/fmnist/model", batch_size=64)
    >>> feats = fx(["a.png", "b.jpg"])          # (2, 512) float32, rows of unit length
    >>> maps = FeatureExtractor("runs/fmnist/model", output="spatial")(["a.png"])
    >>> maps.shape
    (1, 512, 4, 4)
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mocohub.errors import ConfigError, InputError, MissingHeadError
from mocohub.fusion import fuse_batchnorm
from mocohub.imageio import DEFAULT_MAX_PIXELS, DecodeError, decode_image, to_mode
from mocohub.precision import autocast_dtype, resolve_precision
from mocohub.preprocessing import Preprocessing, ResizeUnlessSize

__all__ = [
    "OUTPUTS",
    "CropToTensor",
    "Embedder",
    "FeatureExtractor",
    "TorchEmbedder",
    "open_torch_embedder",
]

OUTPUTS = ("pooled", "head", "spatial")
# layers that keep float32 statistics in a reduced-precision copy, as under torch.autocast
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@runtime_checkable
class Embedder(Protocol):
    """A backend: preprocessed float32 NCHW batch -> ``(N, dim)`` float32 raw features.

    A backend whose ``takes_uint8`` attribute is True also takes the uint8 crops
    (resized and cropped, not normalised) and normalises them on its device.
    """

    preprocessing: Preprocessing
    dim: int

    def embed_batch(self, images: torch.Tensor) -> np.ndarray:
        """Features of a batch already resized, cropped and normalised (not L2-normalised)."""
        ...


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {device} was asked for but CUDA is not available; use cpu.")
    return resolved


class TorchEmbedder:
    """The PyTorch backend: a mocohub ResNet or ViT on a device, at the fastest accurate precision.

    Args:
        model: a model from :func:`mocohub.load` / ``mocohub.artifact.build_model``
            (it carries ``mocohub_config``).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"`` ...
        precision: ``"auto"`` (see the module docstring), ``"fp32"``, ``"bf16"``
            or ``"fp16"`` (the explicit ones are used as asked, unchecked).
        output: ``"pooled"`` backbone features (a ViT's class token), ``"head"``
            projection-head output (the model must have been loaded with ``head=True``;
            ResNets only) or ``"spatial"`` (the last stage's feature maps, a ViT's
            patch tokens as a width x h x w map; :meth:`forward` only).
        channels_last: run in channels_last memory format (faster on CPUs and GPUs).
        fuse: fold BatchNorm into the convolutions (on a copy of ``model``).
        min_cosine: the lowest cosine to fp32 that ``"auto"`` accepts on the first batch.
        check_images: how many images of the first batch ``"auto"`` also runs in
            fp32 for that check (its whole cost: one fp32 forward of so many images).

    Example:
        >>> emb = TorchEmbedder(mocohub.load("runs/fmnist/model"), device="cpu")
        >>> emb.embed_batch(torch.zeros(2, 1, 28, 28)).shape
        (2, 512)
    """

    #: embed_batch also takes uint8 crops (N, C, S, S) and normalises them on the device
    takes_uint8 = True

    def __init__(
        self,
        model: nn.Module,
        *,
        device: str | torch.device | None = "auto",
        precision: str = "auto",
        output: str = "pooled",
        channels_last: bool = True,
        fuse: bool = True,
        min_cosine: float = 0.999,
        check_images: int = 2,
    ) -> None:
        from mocohub.artifact import get_config

        if output not in OUTPUTS:
            raise ConfigError(f"Unknown output {output!r}; use one of {', '.join(OUTPUTS)}.")
        if check_images < 1:
            raise ConfigError(f"check_images must be at least 1, got {check_images}.")
        config = get_config(model)
        # A ViT (MoCo v3) has no head mocohub keeps; a ResNet has one when fc is not Identity.
        has_head = not config.is_vit and not isinstance(getattr(model, "fc", None), nn.Identity)
        if output == "head" and config.is_vit:
            raise InputError(
                f"output='head' needs a projection head, and mocohub keeps none on a "
                f"{config.arch} (MoCo v3's projector is dropped); use output='pooled' (the "
                "class token) or 'spatial' (the patch tokens)."
            )
        if output == "head" and not has_head:
            raise InputError(
                "output='head' needs the projection head; load the model with head=True "
                "(or `--output head` on the command line), from weights that include it."
            )
        self.device = _device(device)
        self.preprocessing: Preprocessing = config.preprocessing
        self._normalise = config.preprocessing.batch().normalise  # of uint8 crops, on the device
        self.output = output
        self.dim = config.embedding_dim if output == "head" else config.feature_dim
        self.precision = resolve_precision(precision, self.device)
        # only a reduced precision that "auto" chose is checked against fp32
        self.checked = precision != "auto" or self.precision == "fp32"
        self.min_cosine = min_cosine
        self.check_images = check_images
        self.channels_last = channels_last
        self.is_vit = config.is_vit
        # A ViT has no BatchNorm to fold (fuse_batchnorm would only copy it).
        fuse = fuse and not self.is_vit
        self.model = (fuse_batchnorm(model) if fuse else model.eval()).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._reduced: dict[torch.dtype, nn.Module] = {}

    def _model_in(self, dtype: torch.dtype | None) -> nn.Module:
        """``self.model``, or a copy of it with weights in ``dtype`` (made once)."""
        if dtype is None:
            return self.model
        if dtype not in self._reduced:
            # Weights stored in the reduced dtype give the numbers torch.autocast gives,
            # without casting every weight again on every batch. Normalisation layers keep
            # float32 statistics, as under autocast. The copy takes the converted tensors
            # from deepcopy's memo, so the float32 weights are never copied first.
            norms = [m for m in self.model.modules() if isinstance(m, _NORMS)]
            keep = {id(t) for m in norms for t in [*m.parameters(False), *m.buffers(False)]}
            memo: dict[int, Any] = {}
            for t in [*self.model.parameters(), *self.model.buffers()]:
                if id(t) not in keep and t.is_floating_point():
                    low = t.detach().to(dtype)
                    is_param = isinstance(t, nn.Parameter)
                    memo[id(t)] = nn.Parameter(low, requires_grad=False) if is_param else low
            self._reduced[dtype] = copy.deepcopy(self.model, memo)
        return self._reduced[dtype]

    def _run(self, x: torch.Tensor, precision: str, output: str) -> torch.Tensor:
        dtype = autocast_dtype(precision)
        m: Any = self._model_in(dtype)
        with torch.inference_mode():
            if dtype is not None:
                x = x.to(dtype)
            if self.is_vit:  # pooled: the class token; spatial: the patch tokens as a map
                pooled, spatial = m.forward_cls_and_patches(x)
                return (spatial if output == "spatial" else pooled).float()
            x = m.forward_features(x)
            if output != "spatial":
                x = torch.flatten(m.avgpool(x), 1)
                if output == "head":
                    x = m.fc(x)
        return x.float()

    def forward(self, images: torch.Tensor, output: str | None = None) -> torch.Tensor:
        """Raw float32 features of a preprocessed batch, on the CPU (``output``: see __init__)."""
        output = output or self.output
        if output not in OUTPUTS:
            raise ConfigError(f"Unknown output {output!r}; use one of {', '.join(OUTPUTS)}.")
        if images.dtype == torch.uint8:  # crops: normalised on the device, after a 1-byte copy
            x = self._normalise(images.to(self.device, non_blocking=True).float().div_(255))
        else:
            x = images.to(self.device, torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.checked:
            return self._check_precision(x, output).cpu()
        return self._run(x, self.precision, output).cpu()

    def _check_precision(self, x: torch.Tensor, output: str) -> torch.Tensor:
        low = self._run(x, self.precision, output)
        exact = self._run(x[: self.check_images], "fp32", output)
        self.checked = True
        count = len(exact)
        cosine = F.cosine_similarity(low[:count].flatten(1), exact.flatten(1), dim=1, eps=1e-12)
        worst = float(cosine.min()) if count else 1.0
        if worst < self.min_cosine:
            warnings.warn(
                f"{self.precision} features of the first batch reached only cosine {worst:.5f} "
                f"to fp32 (< {self.min_cosine}); using fp32 from now on.",
                RuntimeWarning,
                stacklevel=3,
            )
            self.precision = "fp32"
            self._reduced.clear()
            return self._run(x, "fp32", output)
        return low

    def embed_batch(self, images: torch.Tensor) -> np.ndarray:
        """``(N, dim)`` float32 raw features of a preprocessed float32 NCHW batch
        (or of uint8 crops, normalised here on the device)."""
        if self.output == "spatial":
            raise ConfigError("embed_batch gives one vector per image; use forward() for maps.")
        return self.forward(images).numpy()


def open_torch_embedder(
    model: str | os.PathLike[str] | nn.Module,
    *,
    device: str | torch.device | None = "auto",
    precision: str = "auto",
    output: str = "pooled",
) -> TorchEmbedder:
    """A :class:`TorchEmbedder` for anything :func:`mocohub.load` takes (or a loaded model)."""
    if not isinstance(model, nn.Module):
        from mocohub.loading import load

        try:
            model = load(model, head=output == "head")
        except MissingHeadError as e:
            raise MissingHeadError(
                f"{model} has no projection head, so it has no 'head' output; use the pooled "
                "backbone features (output='pooled', or --output pooled)."
            ) from e
    return TorchEmbedder(model, device=device, precision=precision, output=output)


ImageInput = Image.Image | str | os.PathLike[str] | torch.Tensor


class FeatureExtractor:
    """Embeddings of images, paths and tensors with a model's own preprocessing.

    Args:
        model: anything :func:`mocohub.load` takes, a loaded mocohub model, or an
            :class:`Embedder` (e.g. ``mocohub.export``'s ONNX one).
        device, precision: as :class:`TorchEmbedder`.
        batch_size: images per forward pass.
        output: ``"pooled"`` (default), ``"head"`` or ``"spatial"`` (torch only).
        normalize: L2-normalise each row (pooled and head outputs; default True).
        dtype: ``np.float32`` (default) or ``np.float16`` for the returned array.
        max_pixels: files with more pixels are refused (decompression bombs).

    Calling it with a file path, a PIL image, a uint8 (0-255) or float ([0, 1])
    tensor of shape (N, C, H, W) or (C, H, W), or a list that mixes paths, PIL
    images and (C, H, W) tensors returns a NumPy array with one row per image, in
    order: ``(N, dim)``, or ``(N, C, h, w)`` for ``"spatial"``. A file that cannot
    be decoded raises :class:`~mocohub.errors.InputError`. Files are decoded as
    ``mocohub embed`` decodes them (EXIF orientation applied); a PIL image is
    taken as it is, as torchvision takes it: pass
    ``PIL.ImageOps.exif_transpose(image)`` to apply its EXIF orientation.

    Example:
        >>> fx = FeatureExtractor("runs/fmnist/model", dtype=np.float16)
        >>> fx(["shoe.png", Image.open("b.png"), torch.rand(1, 40, 40)]).shape
        (3, 512)
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | nn.Module | Embedder,
        *,
        device: str | torch.device | None = "auto",
        batch_size: int = 64,
        precision: str = "auto",
        output: str = "pooled",
        normalize: bool = True,
        dtype: Any = np.float32,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise ConfigError(f"dtype must be float32 or float16, got {self.dtype}.")
        if isinstance(model, (str, os.PathLike, nn.Module)):
            self.embedder: Embedder = open_torch_embedder(
                model, device=device, precision=precision, output=output
            )
        elif isinstance(model, Embedder):
            if output != "pooled":
                raise ConfigError(f"output={output!r} needs a PyTorch model, not an Embedder.")
            self.embedder = model
        else:
            raise InputError(
                f"FeatureExtractor cannot use a {type(model).__name__}; pass a model source, "
                "a mocohub model or an Embedder."
            )
        self.output, self.normalize, self.batch_size = output, normalize, batch_size
        self.max_pixels = max_pixels
        self.preprocessing = self.embedder.preprocessing
        self.dim = self.embedder.dim

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        return self.embed_prepared(self.prepare(images))

    def embed_prepared(self, batch: torch.Tensor) -> np.ndarray:
        """Features of a batch made by :meth:`prepare` (in chunks of ``batch_size``)."""
        parts = [
            self._embed(batch[i : i + self.batch_size])
            for i in range(0, len(batch), self.batch_size)
        ]
        if not parts:
            return np.zeros((0, self.dim), self.dtype)
        return np.concatenate(parts).astype(self.dtype, copy=False)

    def _embed(self, x: torch.Tensor) -> np.ndarray:
        if isinstance(self.embedder, TorchEmbedder):
            feats = self.embedder.forward(x, self.output)
        else:
            feats = torch.from_numpy(np.asarray(self.embedder.embed_batch(x), np.float32))
        if self.normalize and self.output != "spatial":
            feats = F.normalize(feats, dim=1)
        return feats.numpy()

    def prepare(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """The preprocessed float32 (N, C, S, S) batch the model will see.

        A list may mix file paths, PIL images and single (C, H, W) tensors; each
        row is the same as preparing that item on its own.
        """
        if isinstance(images, torch.Tensor):
            return self._prepare_tensor(images)
        items = [images] if isinstance(images, (Image.Image, str, os.PathLike)) else list(images)
        prep = self.preprocessing
        crop = CropToTensor(prep)
        rows: list[torch.Tensor | None] = []  # prepared tensors in input order; None: a crop
        crops: list[torch.Tensor] = []
        for item in items:
            if isinstance(item, torch.Tensor):
                if item.ndim != 3:
                    raise InputError(
                        f"A tensor in a list must be one image (C, H, W), got shape "
                        f"{tuple(item.shape)}; pass a batch (N, C, H, W) on its own."
                    )
                rows.append(self._prepare_tensor(item))
                continue
            if isinstance(item, Image.Image):
                image = item
            elif isinstance(item, (str, os.PathLike)):
                try:
                    image = decode_image(
                        item, mode=crop.mode, min_size=prep.resize_size, max_pixels=self.max_pixels
                    )
                except DecodeError as e:
                    raise InputError(f"Cannot use {item} as an image: {e.reason}.") from e
            else:
                raise InputError(
                    f"Cannot embed a {type(item).__name__}; pass file paths, PIL images or "
                    "image tensors ((C, H, W) ones in a list, or one (N, C, H, W) batch)."
                )
            crops.append(crop(image))
            rows.append(None)
        if not rows:
            return torch.zeros(0, prep.channels, prep.image_size, prep.image_size)
        # crops (uint8, all S x S) are normalised together, then put back in input order
        normalised = iter(prep.batch()(torch.stack(crops)) if crops else torch.zeros(0))
        return torch.cat([row if row is not None else next(normalised)[None] for row in rows])

    def _prepare_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 (0-255) or float ([0, 1]) (N, C, H, W) or (C, H, W) tensor, preprocessed."""
        x = images.unsqueeze(0) if images.ndim == 3 else images
        if x.ndim != 4:
            raise InputError(
                f"Image tensors must be (N, C, H, W) or (C, H, W), got {tuple(images.shape)}."
            )
        batch = self.preprocessing.batch()
        if x.dtype == torch.uint8:
            return batch(x)
        if not x.is_floating_point():
            raise InputError(f"Image tensors must be uint8 or float, got {x.dtype}.")
        if len(x) and (float(x.min()) < -0.01 or float(x.max()) > 1.01):
            raise InputError(
                "Float image tensors must hold pixels in [0, 1] (not yet normalised); "
                "pass uint8 tensors for 0-255 pixels."
            )
        # BatchPreprocess scales uint8 by 1/255; x * 255 undoes that for [0, 1] floats.
        return batch(x.float() * 255)


class CropToTensor:
    """A PIL image -> the uint8 (C, S, S) tensor the model sees before normalisation.

    The image is converted to the model's channels (:func:`~mocohub.imageio.to_mode`),
    then resized and centre-cropped as :meth:`Preprocessing.transform` does
    (unless already ``image_size`` square). Normalisation is left to the caller:
    :meth:`Preprocessing.batch` on whole batches, or ``mocohub embed`` per image
    on its decoding threads, from :meth:`hwc` (no transpose).

    Example:
        >>> CropToTensor(Preprocessing.imagenet())(Image.new("RGB", (320, 240))).shape
        torch.Size([3, 224, 224])
    """

    def __init__(self, prep: Preprocessing) -> None:
        self.resize = ResizeUnlessSize(prep)
        self.mode = "L" if prep.channels == 1 else "RGB"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(self.hwc(image).transpose(2, 0, 1), order="C"))

    def hwc(self, image: Image.Image) -> np.ndarray:
        """The same pixels as a uint8 (S, S, C) array, as Pillow lays them out (no transpose).

        A batch of these stacked is the (N, C, S, S) batch in channels_last order,
        the layout the torch backend runs, so it is normalised without reordering.
        The array may be read-only (it can be Pillow's own buffer).

        Example:
            >>> CropToTensor(Preprocessing.imagenet()).hwc(Image.new("RGB", (320, 240))).shape
            (224, 224, 3)
        """
        pixels = np.asarray(self.resize(to_mode(image, self.mode)))
        return pixels[..., None] if pixels.ndim == 2 else pixels
