"""How to feed a backbone: the one place a weight set's preprocessing lives.

A :class:`Preprocessing` is recorded in each weight set's ``config.json`` (and
in the registry for named weights). The PyTorch feature extractor, the ONNX
graph, the CLI and the evaluation code all read it from there.

Evaluation preprocessing (``transform`` for PIL images, ``batch`` for uint8
tensors): images already ``image_size`` x ``image_size`` are used as they are;
any other size is resized so its short side is ``resize_size`` (with
``interpolation``) and centre-cropped to ``image_size``, as the reference's
validation transform (Resize 256 + CenterCrop 224). Then the images are
converted to the backbone's ``channels`` (gray repeated to RGB, RGB to luma
with torchvision's weights), scaled to [0, 1] and normalised with ``mean`` and
``std``.

Example:
    >>> from PIL import Image
    >>> prep = Preprocessing.imagenet()
    >>> prep.transform()(Image.new("RGB", (320, 240))).shape
    torch.Size([3, 224, 224])
    >>> Preprocessing.from_dict(prep.to_dict()) == prep
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mocohub.errors import ConfigError, InputError

# torch and torchvision are imported where images are transformed, not here: the
# registry and the command line read Preprocessing without loading PyTorch.
if TYPE_CHECKING:
    import torch
    from torchvision.transforms import InterpolationMode, v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATION_NAMES",
    "LUMA_WEIGHTS",
    "BatchPreprocess",
    "Preprocessing",
    "ResizeUnlessSize",
    "eval_resize_size",
    "interpolation_mode",
    "match_channels",
    "per_channel",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: the interpolations a :class:`Preprocessing` may name (torchvision's ``InterpolationMode`` values)
INTERPOLATION_NAMES: tuple[str, ...] = ("nearest", "bilinear", "bicubic")
#: RGB -> gray weights for 1-channel backbones (torchvision's rgb_to_grayscale)
LUMA_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's ``InterpolationMode`` for one of :data:`INTERPOLATION_NAMES`.

    Example:
        >>> interpolation_mode("bicubic")
        <InterpolationMode.BICUBIC: 'bicubic'>
    """
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def eval_resize_size(image_size: int) -> int:
    """The evaluation resize for a crop of ``image_size``: the reference's 256 for 224, scaled.

    Example:
        >>> eval_resize_size(224), eval_resize_size(32)
        (256, 37)
    """
    return round(image_size * 256 / 224)


def per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Mean or std ``values`` for ``channels`` channels.

    One value per channel is kept as it is; a single value is repeated (gray
    statistics for a colour model); other counts are averaged into one value
    per channel (colour statistics for a grayscale model).

    Example:
        >>> per_channel((0.5,), 3), per_channel((0.25, 0.5, 0.75), 1)
        ((0.5, 0.5, 0.5), (0.5,))
    """
    values = tuple(float(v) for v in values)
    if not values or channels < 1:
        raise ConfigError(f"Need at least one value and one channel, got {values} for {channels}.")
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    return (sum(values) / len(values),) * channels


@dataclass(frozen=True)
class Preprocessing:
    """A backbone's input: crop size, evaluation resize, interpolation, mean/std, channels.

    Args:
        image_size: the square crop the backbone takes (224 for ImageNet models).
        resize_size: the short side images are resized to before the centre crop.
        mean, std: per-channel normalisation of [0, 1] pixels (one value per channel).
        channels: input channels of the backbone: 3 (RGB) or 1 (gray).
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
    """

    image_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.resize_size < self.image_size:
            raise ConfigError(
                f"Preprocessing needs 0 < image_size <= resize_size, got image_size "
                f"{self.image_size} and resize_size {self.resize_size}."
            )
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}.")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"mean and std need one value per channel ({self.channels}), got "
                f"{len(self.mean)} and {len(self.std)}."
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}.")
        if self.interpolation not in INTERPOLATION_NAMES:
            raise ConfigError(
                f"Unknown interpolation {self.interpolation!r}; use one of "
                f"{', '.join(INTERPOLATION_NAMES)}."
            )

    @classmethod
    def imagenet(cls, image_size: int = 224) -> Preprocessing:
        """Reference ImageNet evaluation: Resize(size * 256/224), CenterCrop, ImageNet mean/std."""
        return cls(image_size, eval_resize_size(image_size), IMAGENET_MEAN, IMAGENET_STD)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``preprocessing`` entry of ``config.json``)."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Read :meth:`to_dict`'s output; a missing ``resize_size`` is ``image_size * 256/224``."""
        try:
            size = int(data["image_size"])
            return cls(
                image_size=size,
                resize_size=int(data.get("resize_size") or eval_resize_size(size)),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                channels=int(data.get("channels", 3)),
                interpolation=str(data.get("interpolation", "bilinear")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"Malformed preprocessing entry {dict(data)!r} ({e}); it needs image_size, "
                "mean and std, and may have resize_size, channels and interpolation."
            ) from e

    def transform(self) -> v2.Compose:
        """The evaluation transform for one PIL image (or uint8 CHW tensor), float CHW out.

        Example:
            >>> from PIL import Image
            >>> Preprocessing(28, 32, (0.5,), (0.25,), channels=1).transform()(
            ...     Image.new("RGB", (28, 28))).shape
            torch.Size([1, 28, 28])
        """
        import torch
        from torchvision.transforms import v2

        gray = [v2.Grayscale(1)] if self.channels == 1 else [_ToRGB()]
        return v2.Compose(
            [
                ResizeUnlessSize(self),
                v2.ToImage(),
                *gray,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
                v2.ToPureTensor(),
            ]
        )

    def batch(self) -> BatchPreprocess:
        """The same evaluation preprocessing for a uint8 batch (N, C, H, W), on its device."""
        return BatchPreprocess(self)


class _ToRGB:
    """Gray (1-channel) image tensors repeated to 3 channels; RGB left alone."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.expand(3, -1, -1) if image.shape[-3] == 1 else image


class ResizeUnlessSize:
    """Resize + CenterCrop, skipped for images that are already ``image_size`` square."""

    def __init__(self, prep: Preprocessing) -> None:
        from torchvision.transforms import v2

        self.size = prep.image_size
        self.resize = v2.Compose(
            [
                v2.Resize(prep.resize_size, interpolation_mode(prep.interpolation), antialias=True),
                v2.CenterCrop(prep.image_size),
            ]
        )

    def __call__(self, image: Any) -> Any:
        from PIL import Image

        if isinstance(image, Image.Image):
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            size = image.size
        else:
            size = tuple(image.shape[-1:-3:-1])
        return image if size == (self.size, self.size) else self.resize(image)


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Float images (N, C, H, W) with ``channels`` channels: gray repeated to RGB, RGB to luma."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if x.shape[1] == 3 and channels == 1:
        r, g, b = x.unbind(1)
        luma = LUMA_WEIGHTS
        return (luma[0] * r + luma[1] * g + luma[2] * b).unsqueeze(1)
    raise InputError(
        f"The images have {x.shape[1]} channels but the backbone takes {channels}; "
        "use gray or RGB images."
    )


class BatchPreprocess:
    """Evaluation preprocessing of a uint8 batch; see :meth:`Preprocessing.batch`.

    ``resize`` as in ``mocohub.training``'s evaluation recipes: ``"auto"``
    (resize + crop unless the images are already ``image_size`` square),
    ``"reference"`` (always resize + crop) or ``"small"`` (centre crop or pad
    to ``image_size``, never resize).
    """

    def __init__(self, prep: Preprocessing, resize: str = "auto") -> None:
        import torch

        self.prep, self.resize = prep, resize
        self.mean = torch.tensor(prep.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(prep.std).view(1, -1, 1, 1)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` for float images in [0, 1]."""
        if self.mean.device != x.device:  # once, not a blocking copy every batch
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        size = self.prep.image_size
        x = match_channels(images.float().div(255), self.prep.channels)
        stored = tuple(x.shape[-2:]) == (size, size)
        if self.resize == "reference" or (self.resize == "auto" and not stored):
            x = TF.resize(
                x,
                [self.prep.resize_size],
                interpolation_mode(self.prep.interpolation),
                antialias=True,
            )
            x = TF.center_crop(x, [size])
        elif not stored:
            x = TF.center_crop(x, [size])
        return self.normalise(x)
