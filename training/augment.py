"""Augmentations that turn one image into MoCo's two random views.

Two paths to the same recipes:

* Per image, on PIL images in DataLoader workers: ``moco_v1_transform`` and
  ``moco_v2_transform`` are the reference ``main_moco.py`` pipelines, written
  with ``torchvision.transforms.v2`` (``small_transform`` is ``batch_small``'s
  recipe); ``TwoCropsTransform`` makes the two views.
* Per batch, on the training device: ``BatchAugment`` takes a uint8 or float
  ``(N, C, H, W)`` batch and gives every sample its own crop, flip, colour
  jitter, grayscale and blur in a few batched ops, so a couple of CPU cores
  never starve a GPU. ``batch_moco_v1``, ``batch_moco_v2`` and ``batch_small``
  build the recipes; ``two_views`` makes the two views.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn
from torchvision.transforms import v2

from mocohub.errors import ConfigError, InputError
from mocohub.preprocessing import IMAGENET_MEAN, IMAGENET_STD, match_channels

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentParams",
    "BatchAugment",
    "PILGaussianBlur",
    "TwoCropsTransform",
    "batch_moco_v1",
    "batch_moco_v2",
    "batch_small",
    "moco_v1_transform",
    "moco_v2_transform",
    "small_transform",
    "two_views",
]


_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before a centre crop
_MAX_SUPERSAMPLE = 4  # antialiasing averages at most 4 x 4 bilinear samples a pixel


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
        self.sigma = _check_range("sigma", sigma, low=0.0, open_low=True)

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


def moco_v1_transform(
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """MoCo v1's augmentation for PIL images (reference ``main_moco.py`` without ``--aug-plus``).

    Crop 20-100% of the area at a ratio in [3/4, 4/3] resized to ``size``,
    grayscale with p 0.2, colour jitter (0.4, 0.4, 0.4, 0.4) always, flip with
    p 0.5, then a normalised float tensor.

    Example:
        >>> moco_v1_transform(64)(Image.new("RGB", (80, 80))).shape
        torch.Size([3, 64, 64])
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0)),
            v2.RandomGrayscale(p=0.2),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
            v2.RandomHorizontalFlip(),
            *_normalised_tensor(mean, std),
        ]
    )


def moco_v2_transform(
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """MoCo v2's augmentation for PIL images (reference ``main_moco.py --aug-plus``).

    Crop 20-100% of the area resized to ``size``, colour jitter (0.4, 0.4, 0.4,
    0.1) with p 0.8, grayscale with p 0.2, PIL Gaussian blur with sigma in
    [0.1, 2] with p 0.5, flip with p 0.5, then a normalised float tensor.

    Example:
        >>> moco_v2_transform(64)(Image.new("RGB", (80, 80))).shape
        torch.Size([3, 64, 64])
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0)),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
            *_normalised_tensor(mean, std),
        ]
    )


def small_transform(
    size: int = 32,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
) -> v2.Compose:
    """``batch_small``'s recipe for PIL images of 28-32 pixels (gray or RGB).

    Crop 20-100% of the area resized to ``size``, flip with p 0.5, brightness
    and contrast jitter 0.4 with p 0.8, grayscale with p 0.2 (a no-op on gray
    images), then a normalised float tensor. Not a reference recipe: MoCo's
    small-image demos use the v2 one without blur.

    Example:
        >>> small_transform(28, (0.286,), (0.353,))(Image.new("L", (28, 28))).shape
        torch.Size([1, 28, 28])
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0)),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            *_normalised_tensor(mean, std),
        ]
    )


def _normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    # ToImage + ToDtype(scale=True) is ToTensor; ToPureTensor returns a plain Tensor like it.
    mean, std = _check_stats(mean, std)
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
        v2.ToPureTensor(),
    ]


# --- per batch: the same recipes on the training device ------------------------------------------


@dataclass(frozen=True)
class AugmentParams:
    """The random choices of one ``BatchAugment`` call, one row per sample.

    ``crops`` holds (top, left, height, width) in input pixels; ``jitter`` holds
    brightness, contrast and saturation factors and the hue shift (1, 1, 1, 0
    where a sample is not jittered); ``blur_sigma`` is 0 where it is not blurred.
    """

    crops: torch.Tensor  # (N, 4) int64
    flip: torch.Tensor  # (N,) bool
    jitter: torch.Tensor  # (N, 4) float64
    grayscale: torch.Tensor  # (N,) bool
    blur_sigma: torch.Tensor  # (N,) float64

    def to(self, device: torch.device) -> AugmentParams:
        """The same parameters on ``device``."""
        return AugmentParams(
            crops=self.crops.to(device),
            flip=self.flip.to(device),
            jitter=self.jitter.to(device),
            grayscale=self.grayscale.to(device),
            blur_sigma=self.blur_sigma.to(device),
        )


class BatchAugment(nn.Module):
    """Random resized crop, flip, colour jitter, grayscale, blur and normalisation of a batch.

    Every sample draws its own parameters, with torchvision's rules (10 crop
    tries then a centre crop; jitter factors uniform in [1 - s, 1 + s], hue
    shift in [-h, h]); the work is a handful of batched ops with no loop over
    samples. Differences from the per-image pipelines, all deliberate:

    * crop and flip are one ``grid_sample`` (bilinear, edge pixels extended);
      when the batch's largest crop is 1.5x the output or more, every pixel
      averages k x k samples, k that factor rounded (at most 4): a box filter
      against aliasing where PIL's resize uses a triangle;
    * jitter runs in a fixed order (brightness, contrast, saturation, hue) in
      float, not in a random order on uint8;
    * blur is PIL's ``GaussianBlur(radius=sigma)`` (three box passes per axis,
      edges extended) per sample, in float where Pillow rounds to uint8 after
      each pass (within 3/255);
    * for 1-channel images saturation, hue and grayscale do nothing.

    Args:
        size: output height and width; ``None`` keeps the input's size.
        scale, ratio: crop area fraction and aspect-ratio range.
        flip_p: probability of a horizontal flip.
        brightness, contrast, saturation: jitter strength ``s`` (factor in
            [max(0, 1 - s), 1 + s]) or a (min, max) factor range.
        hue: hue shift bound ``h`` (shift in [-h, h], h <= 0.5) or a (min, max) range.
        jitter_p: probability that a sample is jittered at all.
        grayscale_p: probability of grayscale (3 channels of the luma).
        grayscale_first: grayscale before jitter, as MoCo v1 does.
        blur_p, blur_sigma: probability of a Gaussian blur and its sigma range (pixels).
        mean, std: per-channel normalisation (one value for all channels is fine).
        antialias: average k x k samples a pixel when crops are downscaled 1.5x or more.
        generator: draws all random parameters (on its device); the default
            generator on the CPU if ``None``.

    Input: uint8 ``(N, C, H, W)`` in [0, 255] or float in [0, 1], C 1 or 3, any
    memory format. Output: float32 ``(N, C, size, size)``, normalised.

    Example:
        >>> augment = BatchAugment(24, flip_p=0.5, mean=(0.5,), std=(0.5,))
        >>> augment(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)).shape
        torch.Size([8, 1, 24, 24])
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        size: int | None,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        brightness: float | tuple[float, float] = 0.0,
        contrast: float | tuple[float, float] = 0.0,
        saturation: float | tuple[float, float] = 0.0,
        hue: float | tuple[float, float] = 0.0,
        jitter_p: float = 1.0,
        grayscale_p: float = 0.0,
        grayscale_first: bool = False,
        blur_p: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        antialias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"size must be a positive int or None, got {size!r}.")
        self.size = size
        self.scale = _check_range("scale", scale, low=0.0, high=1.0, open_low=True)
        self.ratio = _check_range("ratio", ratio, low=0.0, open_low=True)
        self.flip_p = _check_probability("flip_p", flip_p)
        self.brightness = _factor_range("brightness", brightness)
        self.contrast = _factor_range("contrast", contrast)
        self.saturation = _factor_range("saturation", saturation)
        if isinstance(hue, (int, float)):
            hue = (-float(hue), float(hue))
        self.hue = _check_range("hue", hue, low=-0.5, high=0.5)
        self.jitter_p = _check_probability("jitter_p", jitter_p)
        self.grayscale_p = _check_probability("grayscale_p", grayscale_p)
        self.grayscale_first = grayscale_first
        self.blur_p = _check_probability("blur_p", blur_p)
        self.blur_sigma = _check_range("blur_sigma", blur_sigma, low=0.0, open_low=True)
        mean, std = _check_stats(mean, std)
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)
        self.antialias = antialias
        self.generator = generator

    def sample_params(
        self, n: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> AugmentParams:
        """Draw the random parameters for ``n`` images of ``height`` x ``width`` pixels.

        ``generator`` (on any device) overrides the module's for this call.

        Example:
            >>> BatchAugment(32).sample_params(5, 40, 40).crops.shape
            torch.Size([5, 4])
        """
        generator = generator if generator is not None else self.generator
        device = generator.device if generator is not None else torch.device("cpu")
        # One draw with a fixed layout: the same generator state gives the same parameters.
        u = torch.rand(
            n, 2 * _CROP_TRIES + 11, generator=generator, device=device, dtype=torch.float64
        )
        area_u, ratio_u, rest = u.split([_CROP_TRIES, _CROP_TRIES, 11], dim=1)
        top_u, left_u, flip_u, jitter_u, gray_u, blur_u, sigma_u = rest[:, :7].unbind(1)
        factor_ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        factors = torch.stack([_lerp(r, rest[:, 7 + i]) for i, r in enumerate(factor_ranges)], 1)
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=u.dtype, device=device)
        jittered = (jitter_u < self.jitter_p).unsqueeze(1)
        blurred = blur_u < self.blur_p
        return AugmentParams(
            crops=self._random_crops(area_u, ratio_u, top_u, left_u, height, width),
            flip=flip_u < self.flip_p,
            jitter=torch.where(jittered, factors, identity),
            grayscale=gray_u < self.grayscale_p,
            blur_sigma=torch.where(blurred, _lerp(self.blur_sigma, sigma_u), 0.0),
        )

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Augment and normalise ``images`` with freshly drawn parameters.

        ``generator`` overrides the module's for this call (e.g. one seeded per step).
        """
        _check_images(images)
        n, _, height, width = images.shape
        return self.apply_params(images, self.sample_params(n, height, width, generator))

    def apply_params(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment and normalise ``images`` with the given parameters.

        Example:
            >>> augment = BatchAugment(16, mean=(0.5,), std=(0.5,))
            >>> images = torch.rand(4, 3, 20, 20)
            >>> augment.apply_params(images, augment.sample_params(4, 20, 20)).shape
            torch.Size([4, 3, 16, 16])
        """
        _check_images(images)
        n, channels, height, width = images.shape
        if params.crops.shape != (n, 4):
            raise InputError(
                f"The parameters are for {params.crops.shape[0]} images but the batch has {n}; "
                "draw them with sample_params(len(images), height, width)."
            )
        if len(self.mean) not in (1, channels):
            raise InputError(
                f"mean and std have {len(self.mean)} values but the images have {channels} "
                "channels; give one value per channel, or one for all."
            )
        out_h, out_w = (height, width) if self.size is None else (self.size, self.size)
        # Decisions that shape the work are taken where the parameters live (the
        # CPU by default), so the device never has to report back.
        supersample = 1
        if self.antialias:
            largest = torch.maximum(params.crops[:, 2] / out_h, params.crops[:, 3] / out_w)
            supersample = min(_MAX_SUPERSAMPLE, max(1, round(float(largest.max()))))
        blur_reach = int(_pil_box_radius(params.blur_sigma.max()).floor()) + 1
        blur = bool(params.blur_sigma.gt(0).any())
        params = params.to(images.device)

        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = _resized_crop(x, params.crops, params.flip, out_h, out_w, supersample)
        if channels == 3 and self.grayscale_first:
            x = _grayscale(x, params.grayscale)
        x = self._color_jitter(x, params.jitter.to(x.dtype))
        if channels == 3 and not self.grayscale_first:
            x = _grayscale(x, params.grayscale)
        if blur:
            x = _pil_gaussian_blur(x, params.blur_sigma.to(x.dtype), blur_reach)
        mean = self.mean.to(x.device).view(1, -1, 1, 1)
        std = self.std.to(x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def _random_crops(
        self,
        area_u: torch.Tensor,
        ratio_u: torch.Tensor,
        top_u: torch.Tensor,
        left_u: torch.Tensor,
        height: int,
        width: int,
    ) -> torch.Tensor:
        # torchvision's RandomResizedCrop.get_params, all samples and all tries at once.
        area = height * width * _lerp(self.scale, area_u)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(_lerp(log_ratio, ratio_u))
        w = torch.round(torch.sqrt(area * aspect))
        h = torch.round(torch.sqrt(area / aspect))
        fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # first try that fits
        h, w, found = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], fits.any(1)
        # No try fits: the whole image, cut to the nearest allowed ratio, centred.
        fallback_h, fallback_w = float(height), float(width)
        if width / height < self.ratio[0]:
            fallback_h = float(round(width / self.ratio[0]))
        elif width / height > self.ratio[1]:
            fallback_w = float(round(height * self.ratio[1]))
        h = torch.where(found, h, fallback_h)
        w = torch.where(found, w, fallback_w)
        top = torch.where(found, torch.floor(top_u * (height - h + 1)), (height - h) // 2)
        left = torch.where(found, torch.floor(left_u * (width - w + 1)), (width - w) // 2)
        return torch.stack([top, left, h, w], 1).long()

    def _color_jitter(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        # Identity factors (1, 1, 1, 0) leave a sample exactly as it is.
        brightness, contrast, saturation, hue = factors.view(-1, 4, 1, 1, 1).unbind(1)
        if self.brightness != (1.0, 1.0):
            x = (x * brightness).clamp(0, 1)
        if self.contrast != (1.0, 1.0):
            mean = match_channels(x, 1).mean(dim=(1, 2, 3), keepdim=True)
            x = (contrast * x + (1 - contrast) * mean).clamp(0, 1)
        if x.shape[1] == 3 and self.saturation != (1.0, 1.0):
            x = (saturation * x + (1 - saturation) * match_channels(x, 1)).clamp(0, 1)
        if x.shape[1] == 3 and self.hue != (0.0, 0.0):
            x = torch.where(hue != 0, _shift_hue(x, hue), x)
        return x

    def extra_repr(self) -> str:
        names = ["size", "scale", "ratio", "flip_p", "brightness", "contrast", "saturation"]
        names += ["hue", "jitter_p", "grayscale_p", "grayscale_first", "blur_p", "blur_sigma"]
        settings = [f"{name}={getattr(self, name)}" for name in names]
        settings.append(f"mean={tuple(self.mean.tolist())}, std={tuple(self.std.tolist())}")
        return ", ".join(settings)


def batch_moco_v1(
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    generator: torch.Generator | None = None,
) -> BatchAugment:
    """MoCo v1's recipe as a ``BatchAugment``: the batched ``moco_v1_transform``.

    Crop scale (0.2, 1), ratio (3/4, 4/3) to ``size``; grayscale p 0.2, then
    jitter (0.4, 0.4, 0.4, 0.4) for every sample; flip p 0.5; no blur.

    Example:
        >>> batch_moco_v1(64)(torch.rand(2, 3, 80, 80)).shape
        torch.Size([2, 3, 64, 64])
    """
    return BatchAugment(
        size,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.4,
        jitter_p=1.0,
        grayscale_p=0.2,
        grayscale_first=True,
        mean=mean,
        std=std,
        generator=generator,
    )


def batch_moco_v2(
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    generator: torch.Generator | None = None,
) -> BatchAugment:
    """MoCo v2's recipe as a ``BatchAugment``: the batched ``moco_v2_transform``.

    Crop scale (0.2, 1), ratio (3/4, 4/3) to ``size``; jitter (0.4, 0.4, 0.4,
    0.1) with p 0.8; grayscale p 0.2; Gaussian blur sigma in [0.1, 2] with
    p 0.5; flip p 0.5.

    Example:
        >>> batch_moco_v2(64)(torch.rand(2, 3, 80, 80)).shape
        torch.Size([2, 3, 64, 64])
    """
    return BatchAugment(
        size,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        jitter_p=0.8,
        grayscale_p=0.2,
        blur_p=0.5,
        blur_sigma=(0.1, 2.0),
        mean=mean,
        std=std,
        generator=generator,
    )


def batch_small(
    size: int | None = None,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    *,
    generator: torch.Generator | None = None,
) -> BatchAugment:
    """A recipe for 28-32 pixel images (Fashion-MNIST, CIFAR) as a ``BatchAugment``.

    Crop scale (0.2, 1), ratio (3/4, 4/3) back to ``size`` (``None``: the
    image's own size); flip p 0.5; brightness and contrast jitter 0.4 with
    p 0.8; grayscale p 0.2 (3-channel images only); no blur, which would wipe
    out such small images. The default mean/std map [0, 1] to [-1, 1]: pass
    your data's, e.g. ``(0.286,), (0.353,)`` for Fashion-MNIST.

    Example:
        >>> batch_small(28, (0.286,), (0.353,))(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 1, 28, 28])
    """
    return BatchAugment(
        size,
        brightness=0.4,
        contrast=0.4,
        jitter_p=0.8,
        grayscale_p=0.2,
        mean=mean,
        std=std,
        generator=generator,
    )


def two_views(
    augment: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of ``images``: the query and key batches.

    Example:
        >>> query, key = two_views(batch_small(28), torch.rand(4, 1, 28, 28))
        >>> query.shape == key.shape
        True
    """
    return augment(images), augment(images)


# --- batched image operations ------------------------------------------------------------------


def _resized_crop(
    x: torch.Tensor, crops: torch.Tensor, flip: torch.Tensor, out_h: int, out_w: int, k: int
) -> torch.Tensor:
    """Sample each crop (flipped where asked) onto an out_h x out_w grid, k x k samples a pixel."""
    n, _, height, width = x.shape
    top, left, h, w = crops.to(x.dtype).unbind(1)
    # affine_grid maps output [-1, 1] to input [-1, 1]; a crop is a scale and a shift,
    # and a flip is a negative x scale about the crop's centre.
    scale_x = torch.where(flip, -w / width, w / width)
    shift_x = (2 * left + w) / width - 1
    shift_y = (2 * top + h) / height - 1
    zero = torch.zeros_like(scale_x)
    theta = torch.stack([scale_x, zero, shift_x, zero, h / height, shift_y], 1).view(n, 2, 3)
    grid = F.affine_grid(theta, [n, 1, out_h * k, out_w * k], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, k) if k > 1 else out


def _grayscale(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return torch.where(chosen.view(-1, 1, 1, 1), match_channels(x, 1).expand_as(x), x)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB ``x`` by ``shift`` (in turns, broadcast over (N, 1, 1, 1))."""
    r, g, b = x.unbind(1)
    value, _ = x.max(1)
    chroma = value - x.min(1)[0]
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), 0.0)
    c = torch.where(chroma > 0, chroma, 1.0)
    hue = torch.where(
        value == r, (g - b) / c, torch.where(value == g, 2 + (b - r) / c, 4 + (r - g) / c)
    )
    hue = (hue / 6 + shift.view(-1, 1, 1)) % 1.0
    # HSV to RGB: channel n is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6.
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * hue[:, None]) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value[:, None] - (value * saturation)[:, None] * ramp


def _pil_box_radius(sigma: torch.Tensor) -> torch.Tensor:
    """Pillow's fractional box radius: three box passes of it have the variance sigma**2."""
    variance = sigma**2 / 3  # per pass
    whole = torch.floor((torch.sqrt(12 * variance + 1) - 1) / 2)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance)
    return whole + fraction / (6 * (variance - (whole + 1) ** 2))


def _pil_gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, reach: int) -> torch.Tensor:
    """Pillow's ``GaussianBlur(radius=sigma)`` per sample (sigma 0: untouched), in float.

    Pillow blurs with three passes of a box with fractional ends along each
    axis, extending edge pixels at each pass; here each pass is a grouped
    convolution with one box per sample (``reach`` taps either side).
    """
    n, c, height, width = x.shape
    radius = _pil_box_radius(sigma)[:, None]
    offsets = torch.arange(-reach, reach + 1, device=x.device, dtype=x.dtype)
    # Weight 1 inside the radius, its fractional part just outside, 0 beyond;
    # radius 0 is an exact delta, so unblurred samples pass unchanged.
    box = (radius + 1 - offsets.abs()).clamp(0, 1) / (2 * radius + 1)
    box = box.repeat_interleave(c, 0)  # (N*C, K): sample i, channel j -> group i*C + j
    planes = x.reshape(1, n * c, height, width)
    for pad, weight in (
        ((reach, reach, 0, 0), box.view(n * c, 1, 1, -1)),
        ((0, 0, reach, reach), box.view(n * c, 1, -1, 1)),
    ):
        for _ in range(3):
            planes = F.conv2d(F.pad(planes, pad, mode="replicate"), weight, groups=n * c)
    return planes.view(n, c, height, width)


# --- argument checks -----------------------------------------------------------------------------


def _lerp(bounds: tuple[float, float], u: torch.Tensor) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _check_images(images: object) -> None:
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or images.shape[1] not in (1, 3)
        or images.numel() == 0
    ):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(
            f"BatchAugment needs a non-empty (N, C, H, W) tensor with C 1 or 3, got {shape}; "
            "stack the images into one batch with 1 (gray) or 3 (RGB) channels."
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise InputError(
            f"BatchAugment needs uint8 images (0-255) or float images in [0, 1], got "
            f"{images.dtype}; convert them with .to(torch.uint8) or .float() / 255."
        )


def _check_probability(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{name} is a probability and must be in [0, 1], got {p}.")
    return float(p)


def _check_range(
    name: str,
    bounds: Sequence[float],
    low: float = -math.inf,
    high: float = math.inf,
    open_low: bool = False,
) -> tuple[float, float]:
    lo, hi = (float(bounds[0]), float(bounds[1])) if len(bounds) == 2 else (math.nan, math.nan)
    too_low = lo <= low if open_low else lo < low
    if not (lo <= hi) or too_low or hi > high:
        where = f"{'(' if open_low else '['}{low}, {high}]"
        raise ConfigError(
            f"{name} must be a (min, max) pair with min <= max inside {where}, got {tuple(bounds)}."
        )
    return lo, hi


def _factor_range(name: str, strength: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(strength, (int, float)):
        if strength < 0:
            raise ConfigError(f"{name} must be a non-negative strength, got {strength}.")
        strength = (max(0.0, 1.0 - strength), 1.0 + strength)
    return _check_range(name, strength, low=0.0)


def _check_stats(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
        raise ConfigError(
            f"mean and std need 1 or 3 values each, with std > 0, got mean={mean}, std={std}; "
            "use your data's per-channel statistics."
        )
    return mean, std
