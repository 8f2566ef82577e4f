"""Batched augmentation: MoCo's recipes on a whole batch, on the training device.

``BatchAugment`` takes a uint8 or float ``(N, C, H, W)`` batch and gives every
sample its own crop, flip, colour jitter, grayscale and blur in a few batched
ops, so a couple of CPU cores never starve a GPU. ``BatchAugment.from_recipe``
builds one from a recipe of :data:`~mocohub.training.recipes.RECIPES` (the
table the per-image pipelines of :mod:`~mocohub.training.augment` read too);
``batch_moco_v1``, ``batch_moco_v2`` and ``batch_small`` are the named ones,
and ``two_views`` makes the query and key views.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mocohub.errors import ConfigError, InputError
from mocohub.preprocessing import IMAGENET_MEAN, IMAGENET_STD, match_channels

from .batch_ops import (
    grayscale,
    pil_box_radius,
    pil_gaussian_blur,
    resized_crop,
    shift_hue,
    solarize,
)
from .recipes import AugmentRecipe, check_probability, check_range, check_stats, factor_range
from .recipes import recipe as named_recipe

__all__ = [
    "AugmentParams",
    "BatchAugment",
    "PairAugment",
    "SolarizeParams",
    "augment_views",
    "batch_moco_v1",
    "batch_moco_v2",
    "batch_small",
    "move_params",
    "two_views",
]


_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes before a centre crop
_MAX_SUPERSAMPLE = 4  # antialiasing averages at most 4 x 4 bilinear samples a pixel
_PACKED_COLUMNS = [4, 1, 4, 1, 1]  # AugmentParams.pack: crops, flip, jitter, grayscale, sigma
_SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize: pixels >= 128 of 255 inverted


@dataclass(frozen=True)
class AugmentParams:
    """The random choices of one ``BatchAugment`` call, one row per sample.

    ``crops`` holds (top, left, height, width) in input pixels; ``jitter`` holds
    brightness, contrast and saturation factors and the hue shift (1, 1, 1, 0
    where a sample is not jittered); ``blur_sigma`` is 0 where it is not blurred.
    An augmentation that can solarize gives :class:`SolarizeParams`.
    """

    crops: torch.Tensor  # (N, 4) int64
    flip: torch.Tensor  # (N,) bool
    jitter: torch.Tensor  # (N, 4) float64
    grayscale: torch.Tensor  # (N,) bool
    blur_sigma: torch.Tensor  # (N,) float64

    def to(self, device: torch.device) -> AugmentParams:
        """The same parameters on ``device``, in one copy (see :func:`move_params`)."""
        return move_params([self], device)[0]

    def pack(self) -> torch.Tensor:
        """All the parameters as one float64 ``(N, 11)`` tensor (exact: crops are whole pixels).

        Columns: crops (4), flip (1), jitter (4), grayscale (1), blur_sigma (1), and
        solarize (1) when there is one: ``(N, 12)``.

        Example:
            >>> params = BatchAugment(8).sample_params(3, 10, 10)
            >>> AugmentParams.unpack(params.pack()).crops.equal(params.crops)
            True
        """
        return torch.cat(
            [
                self.crops.to(torch.float64),
                self.flip.to(torch.float64)[:, None],
                self.jitter.to(torch.float64),
                self.grayscale.to(torch.float64)[:, None],
                self.blur_sigma.to(torch.float64)[:, None],
                *[extra.to(torch.float64)[:, None] for extra in self._extra_columns()],
            ],
            1,
        )

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> AugmentParams:
        """The parameters :meth:`pack` packed, on ``packed``'s device."""
        if packed.shape[1] > sum(_PACKED_COLUMNS):
            packed, solarized = packed.split([sum(_PACKED_COLUMNS), 1], 1)
            base = AugmentParams.unpack(packed)
            return SolarizeParams(**vars(base), solarize=solarized[:, 0] != 0)
        crops, flip, jitter, gray, sigma = packed.split(_PACKED_COLUMNS, 1)
        return AugmentParams(crops.long(), flip[:, 0] != 0, jitter, gray[:, 0] != 0, sigma[:, 0])

    def _extra_columns(self) -> list[torch.Tensor]:
        return []


@dataclass(frozen=True)
class SolarizeParams(AugmentParams):
    """:class:`AugmentParams` and which samples are solarized (packed as a 12th column).

    Example:
        >>> params = BatchAugment(8, solarize_p=0.5).sample_params(3, 10, 10)
        >>> type(params).__name__, params.pack().shape
        ('SolarizeParams', torch.Size([3, 12]))
    """

    solarize: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.bool)
    )

    def _extra_columns(self) -> list[torch.Tensor]:
        return [self.solarize]


def move_params(params: Sequence[AugmentParams], device: torch.device) -> list[AugmentParams]:
    """``params`` on ``device`` with a single host-to-device copy, which does not block.

    They are packed into one tensor, pinned when it goes to a GPU (a copy from
    pageable memory would wait for the GPU's queue: a stream synchronisation)
    and copied with ``non_blocking=True``: the host goes on queueing work. A
    training step draws its query and key parameters and moves both at once.

    Example:
        >>> augment = BatchAugment(8)
        >>> pair = [augment.sample_params(2, 10, 10) for _ in range(2)]
        >>> [p.crops.device.type for p in move_params(pair, torch.device("cpu"))]
        ['cpu', 'cpu']
    """
    if all(p.crops.device == device for p in params):
        return list(params)
    if len({type(p) for p in params}) > 1:  # one packed block needs one width
        return [move_params([p], device)[0] for p in params]
    packed = torch.cat([p.pack() for p in params])
    if device.type == "cuda" and packed.device.type == "cpu":
        packed = packed.pin_memory()
    # Safe without waiting: the pinned block is not reused until the copy is done
    # (PyTorch's host allocator records the copy's stream event on it).
    packed = packed.to(device, non_blocking=True)
    return [AugmentParams.unpack(part) for part in packed.split([len(p.flip) for p in params])]


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
        solarize_p: probability of solarizing (PIL's ``ImageOps.solarize``: values of
            128/255 and above inverted), after the blur, as MoCo v3's second view.
        mean, std: per-channel normalisation (one value for all channels is fine).
        antialias: average k x k samples a pixel when crops are downscaled 1.5x or more.
        generator: draws all random parameters (on its device); the default
            generator on the CPU if ``None``. Parameters drawn on the CPU reach
            a GPU in one pinned, non-blocking copy per call (per pair of views
            with :meth:`views`), and the host never waits for the GPU.

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
        solarize_p: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        antialias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"size must be a positive int or None, got {size!r}.")
        self.size = size
        self.scale = check_range("scale", scale, low=0.0, high=1.0, open_low=True)
        self.ratio = check_range("ratio", ratio, low=0.0, open_low=True)
        self.flip_p = check_probability("flip_p", flip_p)
        self.brightness = factor_range("brightness", brightness)
        self.contrast = factor_range("contrast", contrast)
        self.saturation = factor_range("saturation", saturation)
        if isinstance(hue, (int, float)):
            hue = (-float(hue), float(hue))
        self.hue = check_range("hue", hue, low=-0.5, high=0.5)
        self.jitter_p = check_probability("jitter_p", jitter_p)
        self.grayscale_p = check_probability("grayscale_p", grayscale_p)
        self.grayscale_first = grayscale_first
        self.blur_p = check_probability("blur_p", blur_p)
        self.blur_sigma = check_range("blur_sigma", blur_sigma, low=0.0, open_low=True)
        self.solarize_p = check_probability("solarize_p", solarize_p)
        mean, std = check_stats(mean, std)
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)
        self.antialias = antialias
        self.generator = generator

    @classmethod
    def from_recipe(
        cls,
        recipe: AugmentRecipe,
        size: int | None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> BatchAugment:
        """The batched form of ``recipe``; ``mean``/``std`` default to the recipe's.

        Example:
            >>> from mocohub.training.recipes import recipe
            >>> BatchAugment.from_recipe(recipe("v2"), 32).blur_p
            0.5
        """
        return cls(
            size,
            scale=recipe.scale,
            ratio=recipe.ratio,
            flip_p=recipe.flip_p,
            brightness=recipe.brightness,
            contrast=recipe.contrast,
            saturation=recipe.saturation,
            hue=recipe.hue,
            jitter_p=recipe.jitter_p,
            grayscale_p=recipe.grayscale_p,
            grayscale_first=recipe.grayscale_first,
            blur_p=recipe.blur_p,
            blur_sigma=recipe.blur_sigma,
            solarize_p=recipe.solarize_p,
            mean=recipe.mean if mean is None else mean,
            std=recipe.std if std is None else std,
            generator=generator,
        )

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
        # A solarizing augmentation draws one more column (last), so the others draw
        # exactly what they drew before solarize existed.
        extra = 1 if self.solarize_p > 0 else 0
        u = torch.rand(
            n, 2 * _CROP_TRIES + 11 + extra, generator=generator, device=device, dtype=torch.float64
        )
        area_u, ratio_u, rest = u.split([_CROP_TRIES, _CROP_TRIES, 11 + extra], dim=1)
        top_u, left_u, flip_u, jitter_u, gray_u, blur_u, sigma_u = rest[:, :7].unbind(1)
        factor_ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        factors = torch.stack([_lerp(r, rest[:, 7 + i]) for i, r in enumerate(factor_ranges)], 1)
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=u.dtype, device=device)
        jittered = (jitter_u < self.jitter_p).unsqueeze(1)
        blurred = blur_u < self.blur_p
        kind, extra_params = AugmentParams, {}
        if extra:
            kind, extra_params = SolarizeParams, {"solarize": rest[:, 11] < self.solarize_p}
        return kind(
            crops=self._random_crops(area_u, ratio_u, top_u, left_u, height, width),
            flip=flip_u < self.flip_p,
            jitter=torch.where(jittered, factors, identity),
            grayscale=gray_u < self.grayscale_p,
            blur_sigma=torch.where(blurred, _lerp(self.blur_sigma, sigma_u), 0.0),
            **extra_params,
        )

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Augment and normalise ``images`` with freshly drawn parameters.

        ``generator`` overrides the module's for this call (e.g. one seeded per step).
        """
        return self.views(images, 1, generator)[0]

    def views(
        self, images: torch.Tensor, count: int = 2, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, ...]:
        """``count`` independently augmented views of ``images`` (MoCo's query and key).

        The same as ``count`` calls of the module (the parameters are drawn in
        the same order), but the parameters of all views reach the images'
        device in one non-blocking copy (:func:`move_params`).

        Example:
            >>> query, key = BatchAugment(16).views(torch.rand(4, 3, 20, 20))
            >>> query.shape
            torch.Size([4, 3, 16, 16])
        """
        return augment_views([self] * count, images, generator)

    def apply_params(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment and normalise ``images`` with the given parameters.

        Give the parameters where :meth:`sample_params` draws them (the CPU by
        default): the sizes of the work are read from them on the host, which
        for parameters on a GPU would wait for it.

        Example:
            >>> augment = BatchAugment(16, mean=(0.5,), std=(0.5,))
            >>> images = torch.rand(4, 3, 20, 20)
            >>> augment.apply_params(images, augment.sample_params(4, 20, 20)).shape
            torch.Size([4, 3, 16, 16])
        """
        _check_images(images)
        shape = self._work_shape(images, params)
        return self._augment(images, params.to(images.device), shape)

    def _work_shape(self, images: torch.Tensor, params: AugmentParams) -> tuple[int, int]:
        """Check ``params`` against ``images``; return the supersampling factor and the
        blur's reach (0: no blur), both read from the parameters on the host."""
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
        out_h, out_w = self._out_size(height, width)
        supersample = 1
        if self.antialias:
            largest = torch.maximum(params.crops[:, 2] / out_h, params.crops[:, 3] / out_w)
            supersample = min(_MAX_SUPERSAMPLE, max(1, round(float(largest.max()))))
        blur_reach = 0
        if bool(params.blur_sigma.gt(0).any()):
            blur_reach = int(pil_box_radius(params.blur_sigma.max()).floor()) + 1
        return supersample, blur_reach

    def _out_size(self, height: int, width: int) -> tuple[int, int]:
        return (height, width) if self.size is None else (self.size, self.size)

    def _augment(
        self, images: torch.Tensor, params: AugmentParams, shape: tuple[int, int]
    ) -> torch.Tensor:
        """The augmentation itself, on ``params`` already on the images' device."""
        supersample, blur_reach = shape
        if self.mean.device != images.device:
            self.to(images.device)  # once: the statistics follow the images
        channels = images.shape[1]
        out_h, out_w = self._out_size(*images.shape[-2:])
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = resized_crop(x, params.crops, params.flip, out_h, out_w, supersample)
        if channels == 3 and self.grayscale_first:
            x = grayscale(x, params.grayscale)
        x = self._color_jitter(x, params.jitter.to(x.dtype))
        if channels == 3 and not self.grayscale_first:
            x = grayscale(x, params.grayscale)
        if blur_reach:
            x = pil_gaussian_blur(x, params.blur_sigma.to(x.dtype), blur_reach)
        if isinstance(params, SolarizeParams):
            x = solarize(x, params.solarize, _SOLARIZE_THRESHOLD)
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

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
            x = torch.where(hue != 0, shift_hue(x, hue), x)
        return x

    def extra_repr(self) -> str:
        names = ["size", "scale", "ratio", "flip_p", "brightness", "contrast", "saturation"]
        names += ["hue", "jitter_p", "grayscale_p", "grayscale_first", "blur_p", "blur_sigma"]
        names += ["solarize_p"]
        settings = [f"{name}={getattr(self, name)}" for name in names]
        settings.append(f"mean={tuple(self.mean.tolist())}, std={tuple(self.std.tolist())}")
        return ", ".join(settings)


def batch_moco_v1(
    size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> BatchAugment:
    """MoCo v1's recipe (``RECIPES["v1"]``) as a ``BatchAugment``: the batched
    ``moco_v1_transform``.

    Crop scale (0.2, 1), ratio (3/4, 4/3) to ``size``; grayscale p 0.2, then
    jitter (0.4, 0.4, 0.4, 0.4) for every sample; flip p 0.5; no blur;
    ImageNet mean/std unless given.

    Example:
        >>> batch_moco_v1(64)(torch.rand(2, 3, 80, 80)).shape
        torch.Size([2, 3, 64, 64])
    """
    return BatchAugment.from_recipe(named_recipe("v1"), size, mean, std, generator=generator)


def batch_moco_v2(
    size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> BatchAugment:
    """MoCo v2's recipe (``RECIPES["v2"]``) as a ``BatchAugment``: the batched
    ``moco_v2_transform``.

    Crop scale (0.2, 1), ratio (3/4, 4/3) to ``size``; jitter (0.4, 0.4, 0.4,
    0.1) with p 0.8; grayscale p 0.2; Gaussian blur sigma in [0.1, 2] with
    p 0.5; flip p 0.5; ImageNet mean/std unless given.

    Example:
        >>> batch_moco_v2(64)(torch.rand(2, 3, 80, 80)).shape
        torch.Size([2, 3, 64, 64])
    """
    return BatchAugment.from_recipe(named_recipe("v2"), size, mean, std, generator=generator)


def batch_small(
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> BatchAugment:
    """The recipe for 28-32 pixel images (``RECIPES["small"]``: Fashion-MNIST, CIFAR)
    as a ``BatchAugment``.

    Crop scale (0.2, 1), ratio (3/4, 4/3) back to ``size`` (``None``: the
    image's own size); flip p 0.5; brightness and contrast jitter 0.4 with
    p 0.8; grayscale p 0.2 (3-channel images only); no blur, which would wipe
    out such small images. The default mean/std (0.5, 0.5) map [0, 1] to
    [-1, 1]: pass your data's, e.g. ``(0.286,), (0.353,)`` for Fashion-MNIST.

    Example:
        >>> batch_small(28, (0.286,), (0.353,))(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 1, 28, 28])
    """
    return BatchAugment.from_recipe(named_recipe("small"), size, mean, std, generator=generator)


def augment_views(
    augments: Sequence[BatchAugment],
    images: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """One view of ``images`` per augmentation of ``augments``, in that order.

    The parameters are drawn view after view (from ``generator``, else each
    augmentation's own) and reach the images' device in one non-blocking copy
    (:func:`move_params`); ``BatchAugment.views`` is this with one augmentation
    repeated.

    Example:
        >>> pair = [batch_small(16), batch_small(16)]
        >>> first, second = augment_views(pair, torch.rand(4, 1, 20, 20))
        >>> first.shape
        torch.Size([4, 1, 16, 16])
    """
    _check_images(images)
    n, _, height, width = images.shape
    drawn = [augment.sample_params(n, height, width, generator) for augment in augments]
    shapes = [augment._work_shape(images, p) for augment, p in zip(augments, drawn, strict=True)]
    moved = move_params(drawn, images.device)
    return tuple(
        augment._augment(images, params, shape)
        for augment, params, shape in zip(augments, moved, shapes, strict=True)
    )


class PairAugment(nn.Module):
    """Two batched augmentations, one per view: MoCo v3's asymmetric pair.

    ``views(images)`` gives view 1 from ``first`` and view 2 from ``second``,
    their parameters drawn in that order from one generator and moved in one
    copy (:func:`augment_views`).

    Example:
        >>> from mocohub.training.recipes import view_recipes
        >>> pair = PairAugment.from_recipes(view_recipes("v3"), 16)
        >>> (pair.first.blur_p, pair.second.blur_p, pair.second.solarize_p)
        (1.0, 0.1, 0.2)
        >>> [v.shape[-1] for v in pair.views(torch.rand(2, 3, 20, 20))]
        [16, 16]
    """

    def __init__(
        self, first: BatchAugment, second: BatchAugment, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.first, self.second, self.generator = first, second, generator

    @classmethod
    def from_recipes(
        cls,
        recipes: tuple[AugmentRecipe, AugmentRecipe],
        size: int | None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> PairAugment:
        """The batched form of a (view 1, view 2) pair of recipes."""
        first, second = (
            BatchAugment.from_recipe(r, size, mean, std, generator=generator) for r in recipes
        )
        return cls(first, second, generator)

    def views(
        self, images: torch.Tensor, count: int = 2, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, ...]:
        """View 1 and view 2 of ``images`` (``count`` must be 2)."""
        if count != 2:
            raise ConfigError(f"A PairAugment makes exactly 2 views, not {count}.")
        return augment_views([self.first, self.second], images, generator)


def two_views(
    augment: Callable[[torch.Tensor], torch.Tensor] | PairAugment, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of ``images``: the query and key batches
    (with a :class:`PairAugment`, view 1 and view 2 by their own recipes).

    Example:
        >>> query, key = two_views(batch_small(28), torch.rand(4, 1, 28, 28))
        >>> query.shape == key.shape
        True
    """
    if isinstance(augment, BatchAugment | PairAugment):
        query, key = augment.views(images, 2)  # both views' parameters in one copy
        return query, key
    return augment(images), augment(images)


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
