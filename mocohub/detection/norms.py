"""Normalisation layers for a detector's backbone, FPN and heads: frozen, grouped, synchronised.

Each converter keeps what the pretrained BatchNorm knew that the new layer can
hold: FrozenBatchNorm2d takes the statistics and the affine; GroupNorm takes the
affine (its statistics are each image's own); SyncBatchNorm takes everything
(``nn.SyncBatchNorm.convert_sync_batchnorm``).

Example:
    >>> group_norm(256).num_groups, group_norm(32).num_groups, group_norm(8).num_groups
    (32, 16, 4)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["group_norm", "norm_layer", "set_backbone_norm", "synchronise"]

#: torchvision's stage names, from the last: the first ``trainable_layers`` of them train
_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm for ``channels``: 32 groups (detectron2's GN) where 32 divides
    the channels and leaves at least 2 per group, else the largest power of two
    that does (so every channel count is allowed; an odd count gets 1 group).

    Example:
        >>> group_norm(48).num_groups, group_norm(3).num_groups
        (16, 1)
    """
    groups = math.gcd(channels, 32)
    while groups > 1 and channels // groups < 2:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def _replace_batchnorm(module: nn.Module, make: Callable[[nn.BatchNorm2d], nn.Module]) -> None:
    """Replace every ``BatchNorm2d`` below ``module`` by ``make(bn)``, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, make(child))
        else:
            _replace_batchnorm(child, make)


def _frozen(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    """``bn`` as a FrozenBatchNorm2d with the same statistics, affine and eps."""
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        if bn.affine:
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
        if bn.running_mean is not None and bn.running_var is not None:
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
    return frozen


def _grouped(bn: nn.BatchNorm2d) -> nn.GroupNorm:
    """GroupNorm for ``bn``'s channels, with its scale and shift (statistics dropped)."""
    gn = group_norm(bn.num_features)
    gn.eps = bn.eps
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn


def set_backbone_norm(backbone: nn.Module, norm: str, trainable_layers: int) -> None:
    """Freeze the stages that do not train and give every BatchNorm its ``norm``, in place.

    ``norm`` is ``"sync_bn"``, ``"bn"`` (BatchNorm stays; :func:`synchronise`
    converts SyncBN later), ``"frozen_bn"`` or ``"gn"``. Stages outside the
    last ``trainable_layers`` (torchvision's count, 0-5) stop training, and
    their BatchNorm becomes FrozenBatchNorm2d with its statistics whatever
    ``norm`` says, so that no statistic drifts in a frozen stage.

    Example:
        >>> from mocohub.backbones import resnet18
        >>> net = resnet18(width=8)
        >>> set_backbone_norm(net, "bn", trainable_layers=3)
        >>> type(net.layer1[0].bn1).__name__, type(net.layer2[0].bn1).__name__
        ('FrozenBatchNorm2d', 'BatchNorm2d')
    """
    training = set(_STAGES[:trainable_layers]) | ({"bn1"} if trainable_layers == 5 else set())
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
        part = getattr(backbone, name)
        trains = name in training
        if norm == "gn":
            if isinstance(part, nn.BatchNorm2d):
                setattr(backbone, name, part := _grouped(part))
            _replace_batchnorm(part, _grouped)
        elif norm == "frozen_bn" or not trains:
            if isinstance(part, nn.BatchNorm2d):
                setattr(backbone, name, part := _frozen(part))
            _replace_batchnorm(part, _frozen)
        part.requires_grad_(trains)


def norm_layer(norm: str | None) -> Callable[[int], nn.Module] | None:
    """The FPN's and heads' norm layer for ``fpn_norm`` (SyncBN is converted later).

    Example:
        >>> norm_layer("gn")(64).num_groups, type(norm_layer("bn")(64)).__name__, norm_layer(None)
        (32, 'BatchNorm2d', None)
    """
    if norm is None:
        return None
    return group_norm if norm == "gn" else nn.BatchNorm2d


def _sync_problem() -> str | None:
    """None when SyncBatchNorm can work here, else why not (one clause)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return "torch.distributed is not running with more than one process"
    if dist.get_backend() == "gloo":
        return "the gloo backend means CPU tensors, and PyTorch has no SyncBatchNorm for them"
    return None


def synchronise(parts: Sequence[tuple[nn.Module, str]]) -> None:
    """Convert ``getattr(owner, name)`` of each part to ``nn.SyncBatchNorm``, or warn once why not.

    SyncBatchNorm needs more than one process and a GPU backend: PyTorch's
    SyncBatchNorm refuses CPU tensors, so under gloo (CPU) or in one process the
    parts keep plain, trainable BatchNorm.

    Example:
        >>> import warnings
        >>> head = nn.Module()
        >>> head.block = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     synchronise([(head, "block")])  # one process: BatchNorm stays, one warning
        >>> type(head.block[1]).__name__, len(caught)
        ('BatchNorm2d', 1)
    """
    if not parts:
        return
    why = _sync_problem()
    if why is not None:
        warnings.warn(
            f"mocohub: sync_bn runs as plain BatchNorm (each process normalises its own "
            f"batch) because {why}.",
            UserWarning,
            stacklevel=4,
        )
        return
    for owner, name in parts:
        setattr(owner, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(owner, name)))
