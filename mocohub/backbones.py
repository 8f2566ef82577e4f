"""ResNet backbones with torchvision's classes and state-dict key names.

The builders return :class:`ResNet`, a subclass of ``torchvision.models.ResNet``
that adds three options for small images: a 3x3 stride-1 stem with no max-pool
(``small_stem``), the number of input channels (``in_channels``) and the width
of the first stage (``width``; stages are ``width``, 2x, 4x, 8x). With the
defaults the network is exactly torchvision's, so its ``state_dict()`` loads into
``torchvision.models.resnet50()`` as it is, and the other way round.

Example:
    >>> from mocohub.backbones import resnet50
    >>> import torchvision
    >>> torchvision.models.resnet50().load_state_dict(resnet50().state_dict())
    <All keys matched successfully>
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.resnet import ResNet as _TorchvisionResNet

from mocohub.errors import ConfigError
from mocohub.model_config import feature_dim  # the features' size, known without torch

__all__ = [
    "ARCHITECTURES",
    "ResNet",
    "build_backbone",
    "feature_dim",
    "resnet18",
    "resnet34",
    "resnet50",
]

#: each architecture's residual block and blocks per stage
_LAYOUTS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNet(_TorchvisionResNet):
    """torchvision's ResNet with options for small images.

    Args:
        block: ``BasicBlock`` or ``Bottleneck`` from ``torchvision.models.resnet``.
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]`` for ResNet-50.
        num_classes: output size of ``fc`` (MoCo uses it as the feature dim).
        small_stem: 3x3 stride-1 first convolution and no max-pool, for 28-64 px
            images (as the MoCo CIFAR demo and SimCLR's CIFAR models do).
        in_channels: channels of the input images (1 for grayscale data).
        width: channels of the first stage; 64 is the standard ResNet.
        zero_init_residual: start each residual branch's last BN at zero.
        norm_layer: normalisation layer class, ``nn.BatchNorm2d`` by default.
    """

    #: the :class:`~mocohub.artifact.ModelConfig` of a model built by mocohub (build_model, load)
    mocohub_config: Any = None

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        *,
        small_stem: bool = False,
        in_channels: int = 3,
        width: int = 64,
        zero_init_residual: bool = False,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        if width < 1 or in_channels < 1 or num_classes < 1:
            raise ConfigError(
                f"width ({width}), in_channels ({in_channels}) and num_classes "
                f"({num_classes}) must all be positive integers."
            )
        # nn.Module's constructor, not torchvision's: the stages are sized by
        # `width` below, but built with torchvision's own `_make_layer`, so
        # every module and parameter keeps torchvision's name.
        nn.Module.__init__(self)
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.small_stem = small_stem
        self.in_channels = in_channels
        self.width = width
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = self.inplanes  # layer4's output channels (_make_layer sets it)
        self.fc = nn.Linear(self.feature_dim, num_classes)

        # torchvision's initialisation, so a default ResNet starts the same way.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map, before pooling: N x feature_dim x H/32 x W/32
        (H/8 x W/8 with ``small_stem``, whose stem keeps the resolution).

        ``forward`` is ``fc(flatten(avgpool(forward_features(x))))``, as timm's models.

        Example:
            >>> resnet18(small_stem=True, width=8).forward_features(torch.zeros(1, 3, 32, 32)).shape
            torch.Size([1, 64, 4, 4])
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fc`` of the pooled :meth:`forward_features` (``fc`` is Identity for features)."""
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def resnet18(*, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-18 (512-d features). Options: see :class:`ResNet`.

    Example:
        >>> resnet18(num_classes=128, small_stem=True, in_channels=1, width=32).fc
        Linear(in_features=256, out_features=128, bias=True)
    """
    return ResNet(*_LAYOUTS["resnet18"], num_classes, **kwargs)


def resnet34(*, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-34 (512-d features). Options: see :class:`ResNet`."""
    return ResNet(*_LAYOUTS["resnet34"], num_classes, **kwargs)


def resnet50(*, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50 (2048-d features). Options: see :class:`ResNet`."""
    return ResNet(*_LAYOUTS["resnet50"], num_classes, **kwargs)


ARCHITECTURES: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def build_backbone(arch: str, **kwargs: Any) -> ResNet:
    """Build a backbone by name (``resnet18``, ``resnet34``, ``resnet50``).

    Example:
        >>> build_backbone("resnet18", num_classes=10).fc.out_features
        10
    """
    try:
        builder = ARCHITECTURES[arch]
    except KeyError:
        raise ConfigError(
            f"Unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}."
        ) from None
    return builder(**kwargs)
