"""mocohub backbones out, in other libraries' layouts: each a small key map.

- **torchvision**: the backbone's state dict as it is (mocohub's ResNets keep
  torchvision's key names), saved with ``torch.save``; it loads into
  ``torchvision.models.resnet50()`` strictly apart from the missing ``fc``.
- **detectron2**: the key renaming of the reference MoCo
  ``detection/convert-pretrain-to-detectron2.py`` (stem layers under
  ``stem.``, ``layerN`` -> ``res{N+1}``, ``bnK`` -> ``convK.norm``,
  ``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm``), values as numpy
  arrays, pickled as ``{"model": ..., "__author__": ..., "matching_heuristics": True}``:
  the ``.pkl`` detectron2's ``MODEL.WEIGHTS`` takes. Unlike the reference
  script, the projection head is left out (detectron2 never uses it).

Both need a standard torchvision ResNet (7x7 stem, width 64, 3 channels).
For a ViT (MoCo v3), detectron2 is refused; instead:

- **timm**: the ViT's state dict as it is (:class:`mocohub.vit.ViT` keeps
  timm's key names), with ``torch.save``; it loads strictly into timm's
  ``VisionTransformer`` of the same shape built with ``num_classes=0``. A
  standard ResNet's timm state dict is its torchvision one (timm's ResNets
  use torchvision's names).
- **deit**: what the reference moco-v3 ``convert_to_deit.py`` writes,
  ``{"model": state}`` with ``head.*`` dropped, for DeiT's fine-tuning code
  (``main.py --finetune``).

Example:
    >>> model = mocohub.load("moco_v2_r50_800ep")
    >>> save_torchvision(model, "r50_moco.pth")
    >>> torchvision.models.resnet50().load_state_dict(torch.load("r50_moco.pth"), strict=False)
    _IncompatibleKeys(missing_keys=['fc.weight', 'fc.bias'], unexpected_keys=[])
    >>> save_detectron2(model, "r50_moco.pkl")
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from mocohub.artifact import get_config
from mocohub.errors import InputError
from mocohub.fileio import atomic_writer

__all__ = [
    "FORMATS",
    "deit_checkpoint",
    "detectron2_key",
    "detectron2_state",
    "save_deit",
    "save_detectron2",
    "save_timm",
    "save_torchvision",
    "timm_state",
    "torchvision_state",
]

#: ``mocohub convert --to`` targets besides the artifact folder, with their file suffix
FORMATS = {"torchvision": ".pth", "detectron2": ".pkl", "timm": ".pth", "deit": ".pth"}
_AUTHOR = "mocohub (MoCo)"


def _plain_state(model: nn.Module, drop: str) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(drop)
    }


def _standard_backbone(model: nn.Module, target: str) -> dict[str, torch.Tensor]:
    config = get_config(model)
    if config.is_vit:
        others = "timm or deit" if target == "detectron2" else "timm (or deit)"
        raise InputError(
            f"{target} has no layout for a Vision Transformer ({config.arch}); convert it "
            f"--to {others}, or publish it as a mocohub folder."
        )
    if config.small_stem or config.width != 64 or config.in_channels != 3:
        raise InputError(
            f"{target} has no layout for this {config.arch} (small stem {config.small_stem}, "
            f"width {config.width}, {config.in_channels} channels); only standard ResNets "
            "(7x7 stem, width 64, RGB) convert, so publish it as a mocohub folder instead."
        )
    return _plain_state(model, "fc.")


def _vit(model: nn.Module, target: str) -> dict[str, torch.Tensor]:
    config = get_config(model)
    if not config.is_vit:
        raise InputError(
            f"The {target} checkpoint format holds a Vision Transformer, not a {config.arch}; "
            "convert a ResNet --to torchvision, timm or detectron2."
        )
    return _plain_state(model, "head.")


def timm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict for timm, without a classifier head.

    A ViT's loads strictly into timm's ``VisionTransformer`` of its shape with
    ``num_classes=0``; a standard ResNet's is its torchvision state dict, which
    timm's ``resnetNN(num_classes=0)`` loads strictly.

    Example:
        >>> vit = timm.models.vision_transformer.VisionTransformer(
        ...     embed_dim=384, num_heads=12, num_classes=0)
        >>> vit.load_state_dict(timm_state(mocohub.load("moco_v3_vit_s")))
        <All keys matched successfully>
    """
    if get_config(model).is_vit:
        return _vit(model, "timm")
    return _standard_backbone(model, "timm")


def deit_checkpoint(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """A ViT as moco-v3's ``convert_to_deit.py`` writes it: ``{"model": state}``, no ``head.*``.

    Example:
        >>> sorted(deit_checkpoint(mocohub.load("moco_v3_vit_b"))["model"])[:2]
        ['blocks.0.attn.proj.bias', 'blocks.0.attn.proj.weight']
    """
    return {"model": _vit(model, "deit")}


def torchvision_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's ``torchvision.models.resnetNN`` state dict, without ``fc``.

    Example:
        >>> torchvision.models.resnet50().load_state_dict(torchvision_state(model), strict=False)
        _IncompatibleKeys(missing_keys=['fc.weight', 'fc.bias'], unexpected_keys=[])
    """
    return _standard_backbone(model, "torchvision")


def detectron2_key(key: str) -> str:
    """A torchvision ResNet key in detectron2's names (the reference conversion's renaming).

    Example:
        >>> detectron2_key("layer1.0.downsample.1.running_mean")
        'res2.0.shortcut.norm.running_mean'
    """
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_state(model: nn.Module) -> dict[str, object]:
    """The object detectron2 loads from a ``.pkl``: renamed numpy weights and its flags.

    Example:
        >>> detectron2_state(model)["model"]["res5.2.conv3.norm.weight"].shape
        (2048,)
    """
    state = _standard_backbone(model, "detectron2")
    weights = {detectron2_key(k): v.numpy() for k, v in state.items()}
    return {"model": weights, "__author__": _AUTHOR, "matching_heuristics": True}


def _write(path: str | os.PathLike[str], target: str, dump: Callable[[BinaryIO], None]) -> Path:
    """``dump`` into ``path`` atomically (a folder, or a path without suffix, gets
    ``model<suffix of target>`` inside it); return the file."""
    file = Path(path)
    if file.is_dir() or not file.suffix:
        file = file / f"model{FORMATS[target]}"
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(file) as f:
        dump(f)
    return file


def save_torchvision(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write :func:`torchvision_state` with ``torch.save``, atomically; return the file.

    A folder (or a path without suffix) gets ``model.pth`` inside it.

    Example:
        >>> save_torchvision(mocohub.load("moco_v1_r50_200ep"), "out/")
        PosixPath('out/model.pth')
    """
    state = torchvision_state(model)  # refused before anything is created
    return _write(path, "torchvision", lambda f: torch.save(state, f))


def save_timm(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write :func:`timm_state` with ``torch.save``, atomically; return the file.

    A folder (or a path without suffix) gets ``model.pth`` inside it.

    Example:
        >>> save_timm(mocohub.load("moco_v3_vit_s"), "out/vit-s-timm.pth")
        PosixPath('out/vit-s-timm.pth')
    """
    state = timm_state(model)  # refused before anything is created
    return _write(path, "timm", lambda f: torch.save(state, f))


def save_deit(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write :func:`deit_checkpoint` with ``torch.save``, atomically; return the file.

    A folder (or a path without suffix) gets ``model.pth`` inside it.

    Example:
        >>> save_deit(mocohub.load("moco_v3_vit_b"), "out/vit-b-deit.pth")
        PosixPath('out/vit-b-deit.pth')
    """
    checkpoint = deit_checkpoint(model)  # refused before anything is created
    return _write(path, "deit", lambda f: torch.save(checkpoint, f))


def save_detectron2(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write :func:`detectron2_state` as a pickle, atomically; return the file.

    A folder (or a path without suffix) gets ``model.pkl`` inside it.

    Example:
        >>> save_detectron2(mocohub.load("moco_v2_r50_800ep"), "out/moco_v2_800ep.pkl")
        PosixPath('out/moco_v2_800ep.pkl')
    """
    state = detectron2_state(model)  # refused before anything is created
    return _write(path, "detectron2", lambda f: pickle.dump(state, f))
