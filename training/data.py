"""Training data: turn what a user names into a data set of uint8 images and labels.

:func:`resolve_dataset` is the one entry point of ``mocohub train`` / ``knn`` /
``lincls``. It accepts

- an ImageFolder tree: ``DATA/`` with one subfolder per class, or ``DATA/train``
  and ``DATA/val`` like ImageNet (decoded per sample, in DataLoader workers, by
  :func:`mocohub.imageio.decode_image`: EXIF orientation, mode conversion, pixel limit);
- a folder of MNIST-format IDX files (``train-images-idx3-ubyte.gz`` ...), or
  ``"fashion-mnist"`` for the files of Debian's ``dataset-fashion-mnist``;
- a flat folder of images with a ``labels.csv`` (columns ``file,label`` and
  optionally ``class``), like the repository's ``samples/fashion-mnist``;
- in memory: a :class:`TensorImageDataset`, an ``(images, labels)`` tuple, or a
  bare uint8 tensor.

Small data sets come back as a :class:`TensorImageDataset` (every image in one
N x C x H x W uint8 tensor, for batched augmentation on the training device),
ImageFolder trees as a torchvision ``ImageFolder``; a :class:`DatasetInfo` says
which, with the number of samples, the classes and the image shape.

The readers for each format are in :mod:`~mocohub.training.readers`, the two
data set classes in :mod:`~mocohub.training.datasets`; all are importable from here.

Example:
    >>> dataset, info = resolve_dataset("samples/fashion-mnist")
    >>> print(info)
    labels-csv samples/fashion-mnist: 300 images, 1 x 28 x 28, 10 classes, in memory
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import ImageFolder

from mocohub.errors import InputError

from .datasets import DatasetInfo, Kind, Split, TensorImageDataset, Transform
from .readers import (
    decode_file,
    existing_folder,
    load_idx_folder,
    load_image_folder,
    load_labelled_folder,
    normalise_split,
    read_idx,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "DatasetInfo",
    "TensorImageDataset",
    "decode_file",
    "load_idx_folder",
    "load_image_folder",
    "load_labelled_folder",
    "read_idx",
    "resolve_dataset",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)

_IDX_NAME = re.compile(r"idx\d-ubyte(\.gz)?$")


Source = str | os.PathLike[str] | TensorImageDataset | torch.Tensor | np.ndarray | tuple[Any, Any]


def resolve_dataset(
    source: Source,
    split: str = "train",
    transform: Transform | None = None,
) -> tuple[TensorImageDataset | ImageFolder, DatasetInfo]:
    """The data set that ``source`` names, and a :class:`DatasetInfo` describing it.

    ``source`` is a folder (ImageFolder tree, IDX files, or images with a
    ``labels.csv``), ``"fashion-mnist"`` (:data:`FASHION_MNIST_DIR`; write
    ``./fashion-mnist`` for a local folder of that name), a
    :class:`TensorImageDataset`, an ``(images, labels)`` tuple or a uint8
    tensor. ``split`` is ``"train"`` or ``"val"`` (``"test"`` is an alias); a
    labels.csv folder or a tensor is the same data for every split.
    ``transform`` is applied per sample (``dataset[i]``).

    Example:
        >>> dataset, info = resolve_dataset("fashion-mnist", "val")
        >>> info.num_samples, info.channels, info.image_size, info.in_memory
        (10000, 1, (28, 28), True)
    """
    split_ = normalise_split(split)
    if isinstance(source, TensorImageDataset | torch.Tensor | np.ndarray | tuple):
        if isinstance(source, TensorImageDataset):
            data = source
        elif isinstance(source, tuple):
            if len(source) != 2:
                raise InputError(f"got a tuple of {len(source)} items; pass (images, labels).")
            data = TensorImageDataset(*source)
        else:
            data = TensorImageDataset(source)
        data = TensorImageDataset(
            data.images, data.labels, classes=data.classes, transform=transform
        )
        return data, _tensor_info(data, "tensor", "tensor", split_)
    if not isinstance(source, str | os.PathLike):
        raise InputError(
            f"cannot use a {type(source).__name__} as a data set; pass a folder, 'fashion-mnist', "
            "a TensorImageDataset or a uint8 tensor."
        )
    if source == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise InputError(
                f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}; run "
                "`apt-get install dataset-fashion-mnist`, or pass the folder holding its IDX files."
            )
        data = load_idx_folder(FASHION_MNIST_DIR, split_, classes=FASHION_MNIST_CLASSES)
        data.transform = transform
        return data, _tensor_info(data, "idx", "fashion-mnist", split_)
    folder = existing_folder(source)
    files = [p for p in folder.iterdir() if p.name[0] != "."]
    if (folder / "labels.csv").is_file():
        data = load_labelled_folder(folder)
        data.transform = transform
        return data, _tensor_info(data, "labels-csv", str(source), split_)
    if any(_IDX_NAME.search(p.name) for p in files):
        data = load_idx_folder(folder, split_)
        data.transform = transform
        return data, _tensor_info(data, "idx", str(source), split_)
    if any(p.is_dir() for p in files):
        tree = load_image_folder(folder, split_, transform)
        info = DatasetInfo(
            "image-folder",
            str(source),
            split_,
            len(tree.samples),
            tuple(tree.classes),
            channels=3,
            image_size=None,
            in_memory=False,
        )
        return tree, info
    if not files:
        raise InputError(f"{folder} is empty; put images in one subfolder per class, or IDX files.")
    raise InputError(
        f"{folder} has no class subfolders, IDX files or labels.csv; put the images in one "
        "subfolder per class, or add a labels.csv with the columns file,label."
    )


def _tensor_info(data: TensorImageDataset, kind: Kind, source: str, split: Split) -> DatasetInfo:
    _, channels, height, width = data.images.shape
    return DatasetInfo(
        kind, source, split, len(data), data.classes, channels, (height, width), in_memory=True
    )
