"""Backbones from MoCo checkpoints: each foreign format is a small key map.

:func:`backbone_from_checkpoint` turns a MoCo pre-training checkpoint into a
torchvision-style :class:`~mocohub.backbones.ResNet` whose ``fc`` is
``nn.Identity()`` (so it returns pooled features) and an info dict that says
how to feed it (its preprocessing). It understands

- a **mocohub run folder** (its newest ``checkpoint_*.pt``, else
  ``checkpoint_last.pt``) or one **mocohub training checkpoint** file: the
  ``model`` entry holds MoCo's state (``encoder_q.*``, ``encoder_k.*``,
  ``queue``, ``queue_ptr``) and ``config`` the run's settings (arch, image
  size, mean/std ...);
- a **reference MoCo v1/v2 checkpoint** (facebookresearch/moco
  ``main_moco.py``'s ``.pth.tar``): ``state_dict`` with
  ``module.encoder_q.*`` keys, ``arch`` (ResNet-50 when absent), trained with
  ImageNet's preprocessing (224 px crops of images resized to 256, ImageNet
  mean/std).

In both, the backbone is the query encoder, ``encoder_q.*`` minus its
projection head ``fc.*`` (one linear layer in v1, an MLP in v2). Files are read
with ``torch.load(weights_only=True)``, so reading one never runs its code.

This module must not import ``mocohub.training``: ``training/`` imports from
``mocohub``, never the other way round. The few facts it needs about
mocohub's checkpoint format are repeated here.

Example:
    >>> backbone, info = backbone_from_checkpoint("runs/fmnist")
    >>> info["arch"], info["feature_dim"], info["image_size"]
    ('resnet18', 512, 28)
    >>> features = backbone(torch.randn(2, 1, 28, 28))  # 2 x 512
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mocohub.backbones import ARCHITECTURES, ResNet, build_backbone
from mocohub.errors import InputError
from mocohub.preprocessing import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "backbone_from_checkpoint",
    "backbone_state_from_moco",
    "find_checkpoint_file",
]


# Facts about mocohub's training checkpoints (training/checkpoint.py writes them).
_NATIVE_FORMAT = "mocohub.training-checkpoint"
_NATIVE_VERSION = 1
_NUMBERED = re.compile(r"checkpoint_(\d+)_(\d+)\.pt")
_LAST = "checkpoint_last.pt"

_QUERY_ENCODER = "encoder_q."
_HEAD = "fc."


def find_checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file ``path`` names: itself, or a run folder's newest checkpoint.

    In a folder the newest ``checkpoint_{epoch}_{step}.pt`` wins (highest
    epoch, then step); without one, ``checkpoint_last.pt``.

    Example:
        >>> find_checkpoint_file("runs/fmnist")
        PosixPath('runs/fmnist/checkpoint_0200_00000000.pt')
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise InputError(f"No model at {path}; pass a mocohub run folder or a checkpoint file.")
    numbered = []
    for entry in path.iterdir():
        match = _NUMBERED.fullmatch(entry.name)
        if match and entry.is_file():
            numbered.append(((int(match[1]), int(match[2])), entry))
    if numbered:
        return max(numbered)[1]
    if (path / _LAST).is_file():
        return path / _LAST
    raise InputError(
        f"The folder {path} holds no checkpoint_*.pt; pass the run folder of a "
        "`mocohub train` run, or a checkpoint file."
    )


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and unsafe:
            raise InputError(
                f"{path} holds a {unsafe[1]} object, which safe (weights_only) loading "
                "refuses; save the checkpoint with tensors and plain values only."
            ) from e
        raise InputError(
            f"Cannot read {path} as a PyTorch checkpoint ({type(e).__name__}); "
            "it is truncated, corrupt or not a checkpoint, so pass another file."
        ) from e


def backbone_state_from_moco(
    state: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The backbone's state dict from a MoCo state dict: ``encoder_q.*`` minus ``fc.*``.

    ``prefix`` is stripped from every key first (``"module."`` for the
    reference code's DDP-wrapped model).

    Example:
        >>> state = {"module.encoder_q.conv1.weight": w, "module.encoder_q.fc.0.weight": h,
        ...          "module.encoder_k.conv1.weight": w, "module.queue": q}
        >>> list(backbone_state_from_moco(state, prefix="module."))
        ['conv1.weight']
    """
    backbone = {}
    for key, value in state.items():
        key = key.removeprefix(prefix)
        if key.startswith(_QUERY_ENCODER):
            name = key[len(_QUERY_ENCODER) :]
            if not name.startswith(_HEAD):
                backbone[name] = value
    return backbone


def _per_channel(values: Any, channels: int, what: str, path: Path) -> tuple[float, ...]:
    """``values`` (mean or std) as one float per channel: one value is repeated,
    colour statistics are averaged for a grayscale model."""
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        values = ()
    if not values:
        raise InputError(f"The config in {path} has no usable {what}; it is damaged.")
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    return (sum(values) / len(values),) * channels


def _build(
    arch: str, state: Mapping[str, torch.Tensor], path: Path, what: str
) -> tuple[ResNet, dict[str, Any]]:
    """A ResNet of ``arch`` shaped like ``state`` (stem, width, channels), loaded from it."""
    if arch not in ARCHITECTURES:
        raise InputError(
            f"{path} holds a {arch!r} encoder, which mocohub cannot build; "
            f"it builds {', '.join(ARCHITECTURES)}."
        )
    conv1 = state.get("conv1.weight")
    if not isinstance(conv1, torch.Tensor) or conv1.ndim != 4:
        raise InputError(
            f"{path} is a {what} but its query encoder has no conv1.weight; "
            "it is not a ResNet MoCo checkpoint, so pass another file."
        )
    width, channels, kernel = int(conv1.shape[0]), int(conv1.shape[1]), int(conv1.shape[2])
    backbone = build_backbone(
        arch, num_classes=1, small_stem=kernel == 3, width=width, in_channels=channels
    )
    backbone.fc = nn.Identity()  # type: ignore[assignment]
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = str(e).splitlines()[1:2] or [str(e)]
        raise InputError(
            f"The encoder in {path} does not fit a {arch} ({detail[0].strip()[:160]}); "
            "the checkpoint's arch is wrong or the file is damaged."
        ) from e
    backbone.eval()
    info = {
        "arch": arch,
        "feature_dim": backbone.feature_dim,
        "channels": channels,
        "small_stem": kernel == 3,
        "width": width,
    }
    return backbone, info


def backbone_from_checkpoint(path: str | os.PathLike[str]) -> tuple[ResNet, dict[str, Any]]:
    """The pre-trained backbone in a MoCo checkpoint, and how to feed it.

    ``path`` is a mocohub run folder, a mocohub training checkpoint, or a
    reference MoCo v1/v2 ``.pth.tar``. The backbone is a
    :class:`~mocohub.backbones.ResNet` on the CPU in eval mode with
    ``fc = nn.Identity()``: it maps images to pooled ``feature_dim`` features.

    The info dict holds ``arch``, ``feature_dim``, ``channels`` (input
    channels), ``small_stem``, ``width``, the preprocessing (``image_size``:
    the crop the encoder was trained on; ``resize_size``: the resize before an
    evaluation centre crop, ``image_size * 256 / 224`` rounded; ``mean`` and
    ``std`` with one value per channel), ``format`` (``"mocohub"`` or
    ``"reference"``), ``checkpoint`` (the file read) and ``epoch``.

    Example:
        >>> backbone, info = backbone_from_checkpoint("moco_v2_800ep_pretrain.pth.tar")
        >>> info["arch"], info["feature_dim"], info["image_size"], info["resize_size"]
        ('resnet50', 2048, 224, 256)
    """
    file = find_checkpoint_file(path)
    ckpt = _read(file)
    if not isinstance(ckpt, Mapping):
        raise InputError(
            f"{file} holds a {type(ckpt).__name__}, not a checkpoint dict; pass a mocohub "
            "training checkpoint or a reference MoCo .pth.tar."
        )
    if ckpt.get("format") == _NATIVE_FORMAT:
        version = ckpt.get("format_version")
        if not isinstance(version, int) or version > _NATIVE_VERSION:
            raise InputError(
                f"{file} has checkpoint format version {version}, newer than this mocohub "
                f"reads ({_NATIVE_VERSION}); upgrade mocohub."
            )
        model, config = ckpt.get("model"), ckpt.get("config")
        if not isinstance(model, Mapping) or not isinstance(config, Mapping):
            raise InputError(f"{file} lacks its model or config entry; it is damaged.")
        arch = str(config.get("arch", "resnet50"))
        backbone, info = _build(arch, backbone_state_from_moco(model), file, "mocohub checkpoint")
        image_size = int(config.get("image_size", 224))
        mean = _per_channel(config.get("mean", IMAGENET_MEAN), info["channels"], "mean", file)
        std = _per_channel(config.get("std", IMAGENET_STD), info["channels"], "std", file)
        source = "mocohub"
    else:
        state = ckpt.get("state_dict")
        if not isinstance(state, Mapping) or not any(
            isinstance(k, str) and k.removeprefix("module.").startswith(_QUERY_ENCODER)
            for k in state
        ):
            raise InputError(
                f"{file} is neither a mocohub training checkpoint nor a reference MoCo "
                "checkpoint (no encoder_q weights); pass a file written by `mocohub train` "
                "or by the reference main_moco.py."
            )
        arch = str(ckpt.get("arch", "resnet50"))
        backbone_state = backbone_state_from_moco(state, prefix="module.")
        backbone, info = _build(arch, backbone_state, file, "reference MoCo checkpoint")
        image_size = 224
        mean = _per_channel(IMAGENET_MEAN, info["channels"], "mean", file)
        std = _per_channel(IMAGENET_STD, info["channels"], "std", file)
        source = "reference"
    epoch = ckpt.get("epoch")
    info.update(
        image_size=image_size,
        resize_size=round(image_size * 256 / 224),
        mean=mean,
        std=std,
        format=source,
        checkpoint=str(file),
        epoch=int(epoch) if isinstance(epoch, int) else None,
    )
    return backbone, info
