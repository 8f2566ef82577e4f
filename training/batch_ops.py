"""Batched image operations with per-sample parameters, for :mod:`~mocohub.training.batch_augment`.

Each works on a float ``(N, C, H, W)`` batch in one or a few ops with no loop
over samples: a crop-and-flip per sample as one ``grid_sample``, grayscale,
an HSV hue rotation, and Pillow's ``GaussianBlur`` (three fractional box passes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mocohub.preprocessing import match_channels

__all__ = [
    "grayscale",
    "pil_box_radius",
    "pil_gaussian_blur",
    "resized_crop",
    "shift_hue",
    "solarize",
]


def resized_crop(
    x: torch.Tensor, crops: torch.Tensor, flip: torch.Tensor, out_h: int, out_w: int, k: int
) -> torch.Tensor:
    """Sample each crop (flipped where asked) onto an out_h x out_w grid, k x k samples a pixel.

    ``crops`` holds (top, left, height, width) rows in input pixels, ``flip`` one bool a sample.

    Example:
        >>> x = torch.rand(2, 3, 8, 8)
        >>> whole = torch.tensor([[0, 0, 8, 8], [0, 0, 8, 8]])
        >>> out = resized_crop(x, whole, torch.tensor([False, True]), 8, 8, 1)
        >>> torch.allclose(out[1], x[1].flip(-1), atol=1e-6)
        True
    """
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


def grayscale(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The luma of the ``chosen`` samples of RGB ``x`` in all 3 channels; the others as they are.

    Example:
        >>> out = grayscale(torch.rand(2, 3, 4, 4), torch.tensor([True, False]))
        >>> bool((out[0, 0] == out[0, 2]).all())
        True
    """
    return torch.where(chosen.view(-1, 1, 1, 1), match_channels(x, 1).expand_as(x), x)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB ``x`` by ``shift`` (in turns, broadcast over (N, 1, 1, 1)).

    Example:
        >>> red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
        >>> shift_hue(red, torch.tensor([1 / 3])).flatten().tolist()  # a third turn: green
        [0.0, 1.0, 0.0]
    """
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
    # (5, 3, 1) made on the device: torch.tensor(..., device=) would be a blocking copy.
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)
    k = (offsets + 6 * hue[:, None]) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value[:, None] - (value * saturation)[:, None] * ramp


def pil_box_radius(sigma: torch.Tensor) -> torch.Tensor:
    """Pillow's fractional box radius: three box passes of it have the variance sigma**2.

    Example:
        >>> round(float(pil_box_radius(torch.tensor(2.0))), 4)
        1.375
    """
    variance = sigma**2 / 3  # per pass
    whole = torch.floor((torch.sqrt(12 * variance + 1) - 1) / 2)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance)
    return whole + fraction / (6 * (variance - (whole + 1) ** 2))


def pil_gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, reach: int) -> torch.Tensor:
    """Pillow's ``GaussianBlur(radius=sigma)`` per sample (sigma 0: untouched), in float.

    Pillow blurs with three passes of a box with fractional ends along each
    axis, extending edge pixels at each pass; here each pass is a grouped
    convolution with one box per sample (``reach`` taps either side).

    Example:
        >>> x = torch.rand(2, 1, 16, 16)
        >>> out = pil_gaussian_blur(x, torch.tensor([0.0, 2.0]), reach=3)
        >>> torch.equal(out[0], x[0]), bool(out[1].std() < x[1].std())
        (True, True)
    """
    n, c, height, width = x.shape
    radius = pil_box_radius(sigma)[:, None]
    offsets = torch.arange(-reach, reach + 1, device=x.device, dtype=x.dtype)
    # Weight 1 inside the radius, its fractional part just outside, 0 beyond;
    # radius 0 is an exact delta, so unblurred samples pass unchanged.
    box = (radius + 1 - offsets.abs()).clamp(0, 1) / (2 * radius + 1)
    # (N*C, K): sample i, channel j -> group i*C + j (an expand: no host-side size count)
    box = box[:, None].expand(-1, c, -1).reshape(n * c, -1)
    planes = x.reshape(1, n * c, height, width)
    for pad, weight in (
        ((reach, reach, 0, 0), box.view(n * c, 1, 1, -1)),
        ((0, 0, reach, reach), box.view(n * c, 1, -1, 1)),
    ):
        for _ in range(3):
            planes = F.conv2d(F.pad(planes, pad, mode="replicate"), weight, groups=n * c)
    return planes.view(n, c, height, width)


def solarize(x: torch.Tensor, which: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert (``1 - x``) the values at or above ``threshold`` in the samples where ``which``
    is True: PIL's ``ImageOps.solarize`` on [0, 1] floats.

    Example:
        >>> x = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2).repeat(2, 1, 1, 1)
        >>> solarize(x, torch.tensor([True, False]), 0.5).flatten().tolist()
        [0.25, 0.25, 0.25, 0.75]
    """
    flipped = torch.where(x >= threshold, 1 - x, x)
    return torch.where(which.view(-1, 1, 1, 1), flipped, x)
