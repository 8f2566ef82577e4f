"""The two in-memory descriptions of a data set: the images themselves and what was found.

:class:`TensorImageDataset` holds small data sets as one N x C x H x W uint8
tensor (for batched augmentation on the training device);
:class:`DatasetInfo` is what :func:`~mocohub.training.data.resolve_dataset`
reports about any data set it resolves.

Example:
    >>> ds = TensorImageDataset(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4))
    >>> ds.num_classes
    4
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from mocohub.errors import InputError

__all__ = ["DatasetInfo", "Kind", "Split", "TensorImageDataset", "Transform", "align_classes"]

Split = Literal["train", "val"]
Transform = Callable[[Any], Any]
Kind = Literal["image-folder", "idx", "labels-csv", "tensor"]


class TensorImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """In-memory images (N x C x H x W uint8) and labels (int64), item ``(image, label)``.

    The training loop takes whole batches at once with :meth:`batch` (or
    ``.images[idx]`` and ``.labels[idx]``) and augments them on the device; the
    optional per-sample ``transform`` only applies to ``dataset[i]``. A 3-D
    tensor is taken as N x H x W grayscale. Without labels every item's label
    is -1.

    Example:
        >>> ds = TensorImageDataset(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4))
        >>> images, labels = ds.batch(torch.tensor([0, 2]))
        >>> images.shape, labels.tolist(), ds.num_classes
        (torch.Size([2, 1, 28, 28]), [0, 2], 4)
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        *,
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
    ) -> None:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8:
            raise InputError(
                f"images must be uint8 (0-255), not {images.dtype}; "
                "convert them with (x * 255).round().to(torch.uint8)."
            )
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4 or len(images) == 0:
            raise InputError(
                f"images must be a non-empty N x C x H x W (or N x H x W) tensor, "
                f"not of shape {tuple(images.shape)}; stack them into one."
            )
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
                raise InputError(
                    f"labels must be a 1-D integer tensor, not {labels.dtype} of shape "
                    f"{tuple(labels.shape)}; pass one class index per image."
                )
            if len(labels) != len(images):
                raise InputError(
                    f"there are {len(images)} images but {len(labels)} labels; "
                    "pass exactly one label per image."
                )
            labels = labels.to(torch.int64)
            if int(labels.min()) < 0:
                raise InputError("labels must be class indices 0, 1, ...; shift negative labels.")
        self.images = images
        self.labels: torch.Tensor | None = labels
        num_classes = 0 if labels is None else int(labels.max()) + 1
        self.classes = (
            tuple(str(i) for i in range(num_classes)) if classes is None else tuple(classes)
        )
        if len(self.classes) < num_classes:
            raise InputError(
                f"labels go up to {num_classes - 1} but only {len(self.classes)} class names "
                "were given; pass one name per class index."
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, -1 if self.labels is None else int(self.labels[index])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels (-1 where there are none) at ``index``, untransformed."""
        images = self.images[index.to(self.images.device)]
        if self.labels is None:
            return images, torch.full((len(images),), -1, dtype=torch.int64, device=images.device)
        return images, self.labels[index.to(self.labels.device)]

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """The same data set with its tensors on ``device`` (for on-device augmentation)."""
        labels = None if self.labels is None else self.labels.to(device)
        return TensorImageDataset(
            self.images.to(device), labels, classes=self.classes, transform=self.transform
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"TensorImageDataset({n} x {c} x {h} x {w} uint8, {self.num_classes} classes)"


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`resolve_dataset` found: enough to choose the augmentation path and to log.

    ``channels`` and ``image_size`` describe the images as stored, before any
    transform; ``image_size`` is ``(height, width)``, or None where the images
    may differ in size (ImageFolder trees). ``in_memory`` means the data set is a
    :class:`TensorImageDataset` (augment whole batches on the device); otherwise
    images are decoded per sample in DataLoader workers.

    Example:
        >>> info = DatasetInfo("tensor", "tensor", "train", 60000, ("0", "1"), 1, (28, 28), True)
        >>> info.num_classes
        2
    """

    kind: Kind
    source: str
    split: Split
    num_samples: int
    classes: tuple[str, ...]
    channels: int
    image_size: tuple[int, int] | None
    in_memory: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __str__(self) -> str:
        if self.image_size is None:
            shape = f"{self.channels} channels, sizes vary"
        else:
            shape = f"{self.channels} x {self.image_size[0]} x {self.image_size[1]}"
        where = "in memory" if self.in_memory else "decoded per sample"
        split = "" if self.kind in ("labels-csv", "tensor") else f" ({self.split})"
        return (
            f"{self.kind} {self.source}{split}: {self.num_samples} images, {shape}, "
            f"{self.num_classes} classes, {where}"
        )


def _named(info: DatasetInfo) -> bool:
    """Whether ``info``'s classes have names: an image folder's always do (its folders);
    other data sets' do unless they are the "0", "1", ... that labels alone are given."""
    numbers = tuple(str(i) for i in range(len(info.classes)))
    return info.kind == "image-folder" or info.classes != numbers


def align_classes(
    train_info: DatasetInfo, val: Any, val_info: DatasetInfo, *, task: str
) -> tuple[Any, DatasetInfo]:
    """``val`` (a :class:`TensorImageDataset` or an ImageFolder) labelled with the training
    split's class indices, or an :class:`InputError` where it cannot be.

    Each split numbers its own classes: an ImageFolder ``val/`` without one of
    ``train/``'s class folders numbers the rest differently (torchvision indexes each
    split's sorted folder names), so a label would name another class in each split and
    every score would be silently wrong. Where both splits name their classes, ``val``
    is relabelled by name; a validation class the training split lacks is refused, since
    nothing trained or voting on ``train`` can predict it. ``task`` names the caller in
    that message.

    Example:
        >>> train = DatasetInfo("tensor", "t", "train", 4, ("bag", "coat", "shirt"), 1, None, True)
        >>> val = TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), [0, 1],
        ...                          classes=("bag", "shirt"))
        >>> val_info = DatasetInfo("tensor", "v", "val", 2, val.classes, 1, None, True)
        >>> align_classes(train, val, val_info, task="k-NN")[0].labels.tolist()
        [0, 2]
    """
    train_classes, val_classes = train_info.classes, val_info.classes
    if val_classes == train_classes:
        return val, val_info
    by_name = _named(train_info) and _named(val_info)  # else the indices are all there is
    if by_name:
        unknown = [name for name in val_classes if name not in train_classes]
    else:
        unknown = list(val_classes[len(train_classes) :])
    if unknown:
        listed = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise InputError(
            f"The validation images ({val_info.source}) hold {len(unknown)} class(es) that "
            f"the training images ({train_info.source}) lack: {listed}. {task} can only "
            "predict classes it has training images of; add those classes to the training "
            "split, or leave them out of the validation split."
        )
    mapping = (
        [train_classes.index(name) for name in val_classes]
        if by_name
        else list(range(len(val_classes)))
    )
    if isinstance(val, TensorImageDataset):
        labels = None if val.labels is None else torch.tensor(mapping)[val.labels]
        val = TensorImageDataset(val.images, labels, classes=train_classes, transform=val.transform)
    else:  # a torchvision ImageFolder
        val.samples = [(path, mapping[label]) for path, label in val.samples]
        val.imgs, val.targets = val.samples, [label for _, label in val.samples]
        val.classes = list(train_classes)
        val.class_to_idx = {name: i for i, name in enumerate(train_classes)}
    return val, dataclasses.replace(val_info, classes=train_classes)
