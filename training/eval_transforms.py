"""Preprocessing and augmentation for evaluating a frozen backbone (k-NN, linear).

A backbone's :class:`Preprocessing` (crop size, evaluation resize, mean/std,
channels) is its ``mocohub_config.preprocessing`` (:func:`mocohub.load` attaches it).
Each recipe exists twice, with the same meaning: batched, for uint8 images
already in memory (on the training device, a few batched ops per batch), and
per image, for image folders decoded in DataLoader workers.

With ``size`` the backbone's ``image_size`` (or an override):

============  ==================================  ===========================================
recipe        training (linear classifier)        evaluation
============  ==================================  ===========================================
reference     RandomResizedCrop(size) + flip      Resize(size * 256 / 224) + CenterCrop(size)
small         RandomCrop(size, padding 4) + flip  CenterCrop(size): none at the stored size
auto          (evaluation only)                   none for size x size images, else reference
============  ==================================  ===========================================

Images are converted to the backbone's channels (gray repeated to RGB, RGB to
luma with torchvision's weights) and normalised with its mean/std.

Example:
    >>> prep = Preprocessing(28, 32, (0.286,), (0.353,), channels=1)
    >>> BatchEvalTransform(prep, "auto")(torch.zeros(4, 1, 28, 28, dtype=torch.uint8)).shape
    torch.Size([4, 1, 28, 28])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from mocohub.errors import ConfigError
from mocohub.imageio import to_mode
from mocohub.preprocessing import (
    BatchPreprocess,
    Preprocessing,
    ResizeUnlessSize,
    eval_resize_size,
    match_channels,
)

__all__ = [
    "BatchEvalTransform",
    "BatchPadCropFlip",
    "BatchRandomResizedCrop",
    "EvalResize",
    "Preprocessing",
    "Recipe",
    "batch_train_transform",
    "per_image_transform",
    "preprocessing_at",
]

Recipe = Literal["reference", "small"]
EvalResize = Literal["reference", "small", "auto"]

_CROP_PADDING = 4  # the small recipe's RandomCrop padding (CIFAR convention)


def preprocessing_at(prep: Preprocessing, image_size: int | None) -> Preprocessing:
    """``prep`` with its crop changed to ``image_size`` (None: unchanged).

    The evaluation resize follows the crop as in the reference
    (:func:`~mocohub.preprocessing.eval_resize_size`); mean, std, channels and
    interpolation stay.

    Example:
        >>> preprocessing_at(Preprocessing.imagenet(), 160).resize_size
        183
    """
    if image_size is None or image_size == prep.image_size:
        return prep
    if image_size < 1:
        raise ConfigError(f"The image size must be positive, got {image_size}.")
    return replace(prep, image_size=image_size, resize_size=eval_resize_size(image_size))


# --- batched (in-memory) transforms --------------------------------------------------------------

BatchEvalTransform = BatchPreprocess  # evaluation preprocessing of a uint8 batch


class BatchRandomResizedCrop:
    """The reference training transform, batched: RandomResizedCrop(size) + flip."""

    def __init__(self, prep: Preprocessing, generator: torch.Generator) -> None:
        from .batch_augment import BatchAugment

        self.prep = prep
        # torchvision's RandomResizedCrop defaults: scale (0.08, 1), ratio (3/4, 4/3).
        self.augment = BatchAugment(
            prep.image_size,
            scale=(0.08, 1.0),
            flip_p=0.5,
            mean=prep.mean,
            std=prep.std,
            generator=generator,
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = match_channels(images.float().div(255), self.prep.channels)
        return self.augment(x)


class BatchPadCropFlip:
    """The small training transform, batched: RandomCrop(size, padding=4) + flip."""

    def __init__(self, prep: Preprocessing, generator: torch.Generator) -> None:
        self.prep, self.generator, self.normalise = prep, generator, BatchPreprocess(prep).normalise

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size, pad = self.prep.image_size, _CROP_PADDING
        x = match_channels(images.float().div(255), self.prep.channels)
        n, _, height, width = x.shape
        # Zero (black) padding before normalisation, as torchvision's RandomCrop;
        # images smaller than the crop are padded up to it (pad_if_needed).
        extra_h, extra_w = max(0, size - height - 2 * pad), max(0, size - width - 2 * pad)
        x = F.pad(
            x,
            (
                pad + extra_w // 2,
                pad + extra_w - extra_w // 2,
                pad + extra_h // 2,
                pad + extra_h - extra_h // 2,
            ),
        )
        height, width = x.shape[-2:]
        device = self.generator.device
        top = torch.randint(0, height - size + 1, (n,), generator=self.generator, device=device)
        left = torch.randint(0, width - size + 1, (n,), generator=self.generator, device=device)
        flip = torch.rand(n, generator=self.generator, device=device) < 0.5
        offsets = torch.arange(size, device=device)
        rows = (top[:, None] + offsets).to(x.device)
        cols = (left[:, None] + offsets).to(x.device)
        flip = flip.to(x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return self.normalise(x)


# --- per-image transforms (image folders, in workers) --------------------------------------------


def _to_model_tensor(prep: Preprocessing) -> list[Any]:
    gray = [v2.Grayscale(1)] if prep.channels == 1 else []
    return [
        v2.ToImage(),
        *gray,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(prep.mean, prep.std),
        v2.ToPureTensor(),
    ]


def batch_train_transform(
    prep: Preprocessing, recipe: Recipe, generator: torch.Generator
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batched training transform of ``recipe``, drawing from ``generator`` (on the device).

    Example:
        >>> augment = batch_train_transform(prep, "small", torch.Generator().manual_seed(0))
        >>> augment(torch.zeros(4, 1, 28, 28, dtype=torch.uint8)).shape
        torch.Size([4, 1, 28, 28])
    """
    if recipe == "reference":
        return BatchRandomResizedCrop(prep, generator)
    return BatchPadCropFlip(prep, generator)


def per_image_transform(prep: Preprocessing, recipe: Recipe | None, resize: EvalResize) -> Any:
    """The per-image transform (PIL in, tensor out): training with ``recipe``, else evaluation.

    Example:
        >>> per_image_transform(prep, None, "reference")(Image.new("RGB", (40, 30))).shape
        torch.Size([1, 28, 28])
    """
    size = prep.image_size
    first: list[Any]
    if recipe == "reference":
        first = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
    elif recipe == "small":
        first = [
            v2.RandomCrop(size, padding=_CROP_PADDING, pad_if_needed=True),
            v2.RandomHorizontalFlip(),
        ]
    elif resize == "reference":
        first = [v2.Resize(prep.resize_size), v2.CenterCrop(size)]
    elif resize == "small":
        first = [v2.CenterCrop(size)]
    else:
        first = [ResizeUnlessSize(prep)]
    if recipe is None:  # evaluation: gray as mocohub embed makes it (before resizing)
        first.insert(0, partial(to_mode, mode="L" if prep.channels == 1 else "RGB"))
    return v2.Compose([*first, *_to_model_tensor(prep)])
