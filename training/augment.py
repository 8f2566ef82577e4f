"""Augmentations that turn one image into MoCo's two random views: the per-image path.

Two paths to the same recipes, both read from one table,
:data:`~mocohub.training.recipes.RECIPES`:

* Per image, on PIL images in DataLoader workers (this module):
  :func:`recipe_transform` builds a recipe with ``torchvision.transforms.v2``;
  ``moco_v1_transform`` and ``moco_v2_transform`` are the reference
  ``main_moco.py`` pipelines and ``small_transform`` the small-image one;
  ``TwoCropsTransform`` makes the two views.
* Per batch, on the training device (:mod:`~mocohub.training.batch_augment`):
  ``BatchAugment`` and ``batch_moco_v1``, ``batch_moco_v2``, ``batch_small``,
  ``two_views``; they are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from .recipes import AugmentRecipe, check_range, check_stats
from .recipes import recipe as named_recipe

__all__ = [
    "PILGaussianBlur",
    "TwoCropsTransform",
    "moco_v1_transform",
    "moco_v2_transform",
    "recipe_transform",
    "small_transform",
]


# --- per image: the reference recipes ----------------------------------------------------------


class PILGaussianBlur:
    """Blur a PIL image with ``ImageFilter.GaussianBlur(radius=sigma)``, sigma uniform in a range.

    The reference MoCo v2 blur, kept as PIL's filter: torchvision's ``GaussianBlur``
    convolves a truncated Gaussian with reflect padding, while PIL approximates the
    Gaussian with repeated box blurs and extends the edges, so the two differ.
    sigma comes from torch's generator (the reference uses Python's ``random``),
    so one ``torch.manual_seed`` fixes the whole pipeline.

    Example:
        >>> blur = PILGaussianBlur((0.1, 2.0))
        >>> blur(Image.new("RGB", (32, 32))).size
        (32, 32)
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = check_range("sigma", sigma, low=0.0, open_low=True)

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


class TwoCropsTransform:
    """Apply ``base_transform`` twice, independently: the query and key views of one image.

    Example:
        >>> two = TwoCropsTransform(moco_v2_transform(32))
        >>> query, key = two(Image.new("RGB", (40, 40)))
        >>> query.shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, base_transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.base_transform = base_transform

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.base_transform(image), self.base_transform(image)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_transform!r})"


def recipe_transform(
    recipe: AugmentRecipe,
    size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """The per-image pipeline of ``recipe`` for PIL images, ending in a normalised tensor.

    The transforms come in ``recipe.steps`` order (which fixes the order of the
    random draws); jitter and blur are wrapped in ``RandomApply`` when their
    probability is below 1. ``mean``/``std`` default to the recipe's.

    Example:
        >>> from mocohub.training.recipes import recipe
        >>> recipe_transform(recipe("v2"), 64)(Image.new("RGB", (80, 80))).shape
        torch.Size([3, 64, 64])
    """
    transforms: list[Callable[[Any], Any]] = []
    for step in recipe.steps:
        if step == "crop":
            transforms.append(v2.RandomResizedCrop(size, scale=recipe.scale, ratio=recipe.ratio))
        elif step == "flip":
            transforms.append(v2.RandomHorizontalFlip(p=recipe.flip_p))
        elif step == "grayscale":
            transforms.append(v2.RandomGrayscale(p=recipe.grayscale_p))
        elif step == "jitter":
            jitter = v2.ColorJitter(
                recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue
            )
            transforms.append(_maybe(jitter, recipe.jitter_p))
        elif step == "blur":
            transforms.append(_maybe(PILGaussianBlur(recipe.blur_sigma), recipe.blur_p))
        else:  # solarize: the reference's ImageOps.solarize (threshold 128), drawn from torch
            transforms.append(v2.RandomSolarize(threshold=128, p=recipe.solarize_p))
    mean = recipe.mean if mean is None else mean
    std = recipe.std if std is None else std
    return v2.Compose([*transforms, *_normalised_tensor(mean, std)])


def _maybe(transform: Callable[[Any], Any], p: float) -> Callable[[Any], Any]:
    # p 1 applies it without RandomApply's draw, as the reference's v1 jitter does.
    return transform if p >= 1.0 else v2.RandomApply([transform], p=p)


def moco_v1_transform(
    size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """MoCo v1's augmentation for PIL images (reference ``main_moco.py`` without ``--aug-plus``).

    ``RECIPES["v1"]``: crop 20-100% of the area at a ratio in [3/4, 4/3]
    resized to ``size``, grayscale with p 0.2, colour jitter (0.4, 0.4, 0.4,
    0.4) always, flip with p 0.5, then a float tensor normalised with
    ``mean``/``std`` (ImageNet's unless given).

    Example:
        >>> moco_v1_transform(64)(Image.new("RGB", (80, 80))).shape
        torch.Size([3, 64, 64])
    """
    return recipe_transform(named_recipe("v1"), size, mean, std)


def moco_v2_transform(
    size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """MoCo v2's augmentation for PIL images (reference ``main_moco.py --aug-plus``).

    ``RECIPES["v2"]``: crop 20-100% of the area resized to ``size``, colour
    jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale with p 0.2, PIL Gaussian
    blur with sigma in [0.1, 2] with p 0.5, flip with p 0.5, then a float
    tensor normalised with ``mean``/``std`` (ImageNet's unless given).

    Example:
        >>> moco_v2_transform(64)(Image.new("RGB", (80, 80))).shape
        torch.Size([3, 64, 64])
    """
    return recipe_transform(named_recipe("v2"), size, mean, std)


def small_transform(
    size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """``batch_small``'s recipe (``RECIPES["small"]``) for PIL images of 28-32 pixels.

    Crop 20-100% of the area resized to ``size``, flip with p 0.5, brightness
    and contrast jitter 0.4 with p 0.8, grayscale with p 0.2 (a no-op on gray
    images), then a float tensor normalised with ``mean``/``std`` (0.5, 0.5
    unless given). Not a reference recipe: MoCo's small-image demos use the v2
    one without blur.

    Example:
        >>> small_transform(28, (0.286,), (0.353,))(Image.new("L", (28, 28))).shape
        torch.Size([1, 28, 28])
    """
    return recipe_transform(named_recipe("small"), size, mean, std)


def _normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    # ToImage + ToDtype(scale=True) is ToTensor; ToPureTensor returns a plain Tensor like it.
    mean, std = check_stats(mean, std)
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
        v2.ToPureTensor(),
    ]
