"""``build_detector``: a MoCo backbone inside torchvision's Faster R-CNN or Mask R-CNN (FPN).

Everything that detects is torchvision's (``BackboneWithFPN``, ``FasterRCNN``,
``MaskRCNN``, their heads); this module only decides how a MoCo ResNet is
wired in: which stages train, which normalisation each part uses, the pixel
mean/std, and anchor sizes that suit the image size.

Example:
    >>> from mocohub.detection import build_detector
    >>> detector = build_detector("moco_r18_fashion_mnist", num_classes=11, min_size=64)
    >>> sorted(detector.eval()([torch.rand(1, 64, 64)])[0])
    ['boxes', 'labels', 'masks', 'scores']
"""

from __future__ import annotations

import copy
import os
from typing import Any, cast

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from mocohub.artifact import get_config
from mocohub.detection.norms import norm_layer, set_backbone_norm, synchronise
from mocohub.errors import ConfigError, InputError

__all__ = ["FPN_NORMS", "KINDS", "NORMS", "build_detector"]

KINDS = ("mask_rcnn", "faster_rcnn")
NORMS = ("sync_bn", "bn", "frozen_bn", "gn")
FPN_NORMS = (None, "sync_bn", "bn", "gn")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
#: torchvision's anchor sizes (one per FPN level) for its default min_size of 800
_ANCHORS_AT_800 = (32, 64, 128, 256, 512)


def build_detector(
    model: str | os.PathLike[str] | nn.Module,
    kind: str = "mask_rcnn",
    *,
    num_classes: int = 91,
    norm: str | None = None,
    trainable_layers: int | None = None,
    fpn_norm: str | None = "default",
    min_size: int | None = None,
    max_size: int | None = None,
    fpn_channels: int | None = None,
    pretrained: bool = True,
    **kwargs: Any,
) -> GeneralizedRCNN:
    """A torchvision Faster/Mask R-CNN with an FPN on the ResNet ``model``, on the CPU.

    Args:
        model: anything :func:`mocohub.load` takes (registry name, reference
            ``.pth.tar``, run folder or checkpoint, artifact or export folder,
            ``hf-hub:`` repo, URL), or a ResNet module (a mocohub or torchvision
            ResNet; ``fc`` is not used). A module is copied, never changed.
        kind: ``"mask_rcnn"`` (boxes and instance masks) or ``"faster_rcnn"`` (boxes).
        num_classes: object categories **plus one for the background**
            (torchvision's convention): 10 categories -> 11.
        norm: the backbone's normalisation:
            ``"sync_bn"``: trainable BatchNorm synchronised across processes
            (``nn.SyncBatchNorm``) when ``torch.distributed`` is initialised
            with more than one process on a GPU backend (NCCL). PyTorch has no
            SyncBatchNorm for CPU tensors, so in one process or under gloo it
            stays plain BatchNorm, with one warning saying so;
            ``"bn"``: trainable BatchNorm using each batch's statistics in training;
            ``"frozen_bn"``: torchvision's ``FrozenBatchNorm2d`` holding the
            pretrained statistics and affine, never updated;
            ``"gn"``: ``GroupNorm`` in place of every BatchNorm (groups: see
            :func:`~mocohub.detection.norms.group_norm`); the pretrained BN
            scale and shift become GroupNorm's weight and bias, the running
            statistics are dropped (GroupNorm normalises each image by its own
            statistics).
        trainable_layers: 0-5, torchvision's meaning: how many of
            ``layer4, layer3, layer2, layer1, conv1`` train, from the last (5 also
            trains ``bn1``). Stages that do not train are frozen *with their
            statistics*: their BatchNorm becomes ``FrozenBatchNorm2d`` whatever
            ``norm`` says (as detectron2's ``FREEZE_AT``), so nothing drifts.
        fpn_norm: normalisation in the FPN and in the box and mask heads (as
            torchvision's ``*_v2`` models and the MoCo paper's detectron2
            configs): ``None`` (torchvision's v1 heads: two-FC box head, no
            norm), ``"sync_bn"``, ``"bn"`` or ``"gn"``; with a norm, the box
            head is four 3x3 convolutions and one FC (``FastRCNNConvFCHead``)
            and the mask head's convolutions are normalised (``MaskRCNNHeads``).
        min_size, max_size: torchvision's resize rule (short side to
            ``min_size`` unless the long side would pass ``max_size``). Default
            ``min_size``: 800 (torchvision's) for a standard stem, 128 for a
            ``small_stem`` backbone (small images stay near their size);
            default ``max_size``: ``min_size * 1333 / 800``.
        fpn_channels: channels of the FPN and of the heads' layers (the box
            head's FC has four times as many). Default: 256 (torchvision's), or
            the backbone's widest stage when that is narrower, so a width-16
            model gets light heads.
        pretrained: False builds ``model``'s architecture with random weights
            (``mocohub.load(model, pretrained=False)``); for a module, False says
            that it is randomly initialised (it only changes the defaults).
        **kwargs: passed to torchvision's ``FasterRCNN``/``MaskRCNN`` (e.g.
            ``box_detections_per_img``, ``rpn_batch_size_per_image``,
            ``rpn_anchor_generator``, ``box_head``, ``image_mean``); what is
            passed replaces what this function would choose.

    Defaults (``None`` / ``"default"``), chosen by where the weights come from:

    - **MoCo weights** (the paper's recipe: fine-tuned, synchronised BN in the
      backbone and in FPN and heads, every layer trains): ``norm="sync_bn"``,
      ``fpn_norm="sync_bn"``, ``trainable_layers=5``. The weights count as MoCo
      when ``model`` is a source that :func:`mocohub.load` reads (every format
      it reads holds a MoCo encoder) or a module carrying a
      ``mocohub_config`` (one made by mocohub.load or mocohub's ``build_model``;
      for a randomly initialised one, say so with ``pretrained=False``).
    - **other pretrained modules** (e.g. a torchvision ResNet): torchvision's
      defaults, ``norm="frozen_bn"``, ``fpn_norm=None``, ``trainable_layers=3``.
    - **random weights** (``pretrained=False``): torchvision's defaults
      without weights, ``norm="bn"``, ``fpn_norm=None``, ``trainable_layers=5``.

    To compare initialisations on equal terms, pass ``norm``, ``fpn_norm`` and
    ``trainable_layers`` explicitly.

    Images: float tensors in [0, 1] with the backbone's channels (1 for a
    gray model); the detector normalises them with the model's preprocessing
    mean/std (``mocohub_config.preprocessing``; ImageNet's for a 3-channel
    module without one). Anchors: torchvision's sizes (32-512 px at
    ``min_size`` 800) scaled by ``min_size / 800``, so they cover the same
    share of the image (at least 4 px; 5, 10, 20, 41, 82 px at 128), with
    aspect ratios 0.5, 1, 2 on each of the five FPN levels.

    The returned detector carries the options it was built with as
    ``detector.mocohub_options`` (a dict; the backbone's config under
    ``"backbone"`` when it has one).

    Example:
        >>> detector = build_detector("moco_r18_fashion_mnist", "mask_rcnn", num_classes=11)
        >>> options = detector.mocohub_options
        >>> options["norm"], options["fpn_norm"], options["trainable_layers"], options["min_size"]
        ('sync_bn', 'sync_bn', 5, 128)
        >>> frozen = build_detector("moco_r18_fashion_mnist", "faster_rcnn", num_classes=11,
        ...                         norm="frozen_bn", fpn_norm=None, trainable_layers=3)
        >>> sum(p.requires_grad for p in frozen.backbone.body.layer1.parameters())
        0
    """
    _check_options(kind, num_classes, norm, fpn_norm, trainable_layers, fpn_channels)
    backbone, is_moco = _backbone(model, pretrained)  # after the checks: it may download
    config = getattr(backbone, "mocohub_config", None)
    if not pretrained:
        defaults: tuple[str, str | None, int] = ("bn", None, 5)
    elif is_moco:
        defaults = ("sync_bn", "sync_bn", 5)
    else:
        defaults = ("frozen_bn", None, 3)
    norm = defaults[0] if norm is None else norm
    fpn_norm = defaults[1] if fpn_norm == "default" else fpn_norm
    trainable_layers = defaults[2] if trainable_layers is None else trainable_layers

    small_stem = isinstance(backbone.maxpool, nn.Identity)
    min_size = min_size if min_size is not None else (128 if small_stem else 800)
    max_size = max_size if max_size is not None else round(min_size * 1333 / 800)
    if min_size < 1 or max_size < min_size:
        raise ConfigError(f"Need 0 < min_size <= max_size, got {min_size} and {max_size}.")
    in_channels_list = [_stage_channels(getattr(backbone, f"layer{i}")) for i in range(1, 5)]
    fpn_channels = fpn_channels or min(256, max(in_channels_list))  # 256: torchvision's
    mean, std = _pixel_statistics(backbone, kwargs)

    set_backbone_norm(backbone, norm, trainable_layers)
    fpn = BackboneWithFPN(
        backbone,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=in_channels_list,
        out_channels=fpn_channels,
        norm_layer=norm_layer(fpn_norm),
    )
    anchors = tuple(max(4, round(s * min_size / 800)) for s in _ANCHORS_AT_800)
    parts = _heads(kind, fpn_channels, num_classes, fpn_norm, anchors)
    parts.update(kwargs)
    detector_class = MaskRCNN if kind == "mask_rcnn" else FasterRCNN
    detector: GeneralizedRCNN = detector_class(
        fpn, num_classes=None, min_size=min_size, max_size=max_size, **parts
    )  # num_classes=None: the predictors above already have num_classes outputs
    _check_channels(detector, _in_channels(backbone))
    synchronised: list[tuple[nn.Module, str]] = []
    if norm == "sync_bn":
        synchronised.append((detector.backbone, "body"))
    if fpn_norm == "sync_bn":
        heads = detector.roi_heads
        synchronised += [(detector.backbone, "fpn"), (heads, "box_head")]
        if getattr(heads, "mask_head", None) is not None:
            synchronised.append((heads, "mask_head"))
    synchronise(synchronised)
    detector.mocohub_options = {
        "kind": kind,
        "num_classes": num_classes,
        "norm": norm,
        "fpn_norm": fpn_norm,
        "trainable_layers": trainable_layers,
        "min_size": min_size,
        "max_size": max_size,
        "fpn_channels": fpn_channels,
        "anchor_sizes": [int(s[0]) for s in detector.rpn.anchor_generator.sizes],
        "image_mean": list(mean),
        "image_std": list(std),
        "pretrained": pretrained,
        "backbone": config.to_dict() if config is not None else None,
    }
    return detector


def _check_options(
    kind: str,
    num_classes: int,
    norm: str | None,
    fpn_norm: str | None,
    trainable_layers: int | None,
    fpn_channels: int | None,
) -> None:
    """One ConfigError for the first option that cannot work (None and "default": defaults)."""
    if kind not in KINDS:
        raise ConfigError(f"Unknown detector kind {kind!r}; choose one of: {', '.join(KINDS)}.")
    if num_classes < 2:
        raise ConfigError(
            f"num_classes counts the background too, so it must be at least 2, got {num_classes}."
        )
    if norm is not None and norm not in NORMS:
        raise ConfigError(f"Unknown norm {norm!r}; choose one of: {', '.join(NORMS)}.")
    if fpn_norm != "default" and fpn_norm not in FPN_NORMS:
        raise ConfigError(
            f"Unknown fpn_norm {fpn_norm!r}; choose None or one of: "
            f"{', '.join(n for n in FPN_NORMS if n)}."
        )
    if trainable_layers is not None and not 0 <= trainable_layers <= 5:
        raise ConfigError(f"trainable_layers must be 0 to 5, got {trainable_layers}.")
    if fpn_channels is not None and fpn_channels < 1:
        raise ConfigError(f"fpn_channels must be a positive number, got {fpn_channels}.")


def _backbone(
    model: str | os.PathLike[str] | nn.Module, pretrained: bool
) -> tuple[nn.Module, bool]:
    """A private copy of the ResNet to build on, and whether its weights are MoCo's."""
    if isinstance(model, nn.Module):
        missing = [
            name
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
            if not hasattr(model, name)
        ]
        if not missing and not isinstance(model.conv1, nn.Conv2d):
            missing = ["conv1 convolution"]
        if missing:
            raise InputError(
                f"build_detector needs a ResNet (conv1, bn1, maxpool, layer1-layer4); this "
                f"{type(model).__name__} has no {', '.join(missing)}. Pass a mocohub or "
                "torchvision ResNet, or a name or path that mocohub.load reads."
            )
        backbone = copy.deepcopy(model)
        return backbone, getattr(model, "mocohub_config", None) is not None
    from mocohub.loading import load

    backbone = load(model, pretrained=pretrained)
    config = get_config(backbone)
    if config.is_vit:  # MoCo v3's ViTs load too, but torchvision's FPN takes ResNet stages
        raise InputError(
            f"build_detector needs a ResNet, but {model} is a Vision Transformer "
            f"({config.arch}); pass ResNet weights such as moco_v3_r50_1000ep or "
            "moco_v2_r50_800ep."
        )
    return backbone, True


def _in_channels(backbone: nn.Module) -> int:
    """Channels of the images the ResNet takes (its first convolution's input)."""
    return cast(nn.Conv2d, backbone.get_submodule("conv1")).in_channels


def _stage_channels(stage: nn.Module) -> int:
    """Channels a ResNet stage puts out: its last convolution's (the residual's width)."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _pixel_statistics(
    backbone: nn.Module, kwargs: dict[str, Any]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the detector normalises [0, 1] pixels with (kwargs, config or ImageNet's)."""
    config = getattr(backbone, "mocohub_config", None)
    channels = _in_channels(backbone)
    if config is not None:
        mean, std = config.preprocessing.mean, config.preprocessing.std
    elif channels == 3:
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    else:
        mean = std = ()
    mean = tuple(float(v) for v in kwargs.setdefault("image_mean", list(mean)))
    std = tuple(float(v) for v in kwargs.setdefault("image_std", list(std)))
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(
            f"The backbone takes {channels}-channel images, so image_mean and image_std need "
            f"one value per channel (got {len(mean)} and {len(std)}); pass them, or a model "
            "loaded with mocohub.load, which knows its own."
        )
    return mean, std


def _heads(
    kind: str, channels: int, num_classes: int, norm: str | None, anchors: tuple[int, ...]
) -> dict[str, Any]:
    """The anchor generator and the box (and mask) heads sized for ``channels``."""
    layer = norm_layer(norm)
    fc = 4 * channels  # torchvision's 1024 at 256 channels
    box_head: nn.Module
    if layer is None:
        box_head = TwoMLPHead(channels * 7 * 7, fc)
    else:
        box_head = FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [fc], layer)
    parts: dict[str, Any] = {
        "rpn_anchor_generator": AnchorGenerator(
            sizes=tuple((s,) for s in anchors), aspect_ratios=((0.5, 1.0, 2.0),) * len(anchors)
        ),
        "box_head": box_head,
        "box_predictor": FastRCNNPredictor(fc, num_classes),
    }
    if kind == "mask_rcnn":
        parts["mask_head"] = MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=layer)
        parts["mask_predictor"] = MaskRCNNPredictor(channels, channels, num_classes)
    return parts


class _Transform(GeneralizedRCNNTransform):
    """torchvision's transform, with one clear error for images of the wrong channel count."""

    channels: int = 3

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3 or image.shape[0] != self.channels:
            raise InputError(
                f"The detector takes {self.channels}-channel images (C x H x W floats in "
                f"[0, 1]), got a tensor of shape {tuple(image.shape)}; convert the images "
                f"to {'gray' if self.channels == 1 else 'RGB'} first."
            )
        return super().normalize(image)


def _check_channels(detector: GeneralizedRCNN, channels: int) -> None:
    """Swap in :class:`_Transform` (same settings) so a wrong channel count fails clearly."""
    old = detector.transform
    new = _Transform(
        old.min_size,
        old.max_size,
        old.image_mean,
        old.image_std,
        size_divisible=old.size_divisible,
        fixed_size=old.fixed_size,
        _skip_resize=old._skip_resize,
    )
    new.channels = channels
    detector.transform = new
