"""torch.hub entry points: ``torch.hub.load("org/mocohub", NAME, ...)``.

Thin by design: each entry point only calls :mod:`mocohub`. Named pretrained
MoCo weights arrive with the weights registry; until then the entry points
build mocohub's backbones (torchvision ResNets with small-image options).

Example:
    >>> import torch
    >>> net = torch.hub.load("org/mocohub", "resnet18", num_classes=128, small_stem=True)
"""

from __future__ import annotations

from typing import Any

dependencies = ["torch", "torchvision"]


def resnet18(**kwargs: Any) -> Any:
    """ResNet-18 backbone; options as ``mocohub.backbones.ResNet``."""
    from mocohub.backbones import resnet18 as build

    return build(**kwargs)


def resnet34(**kwargs: Any) -> Any:
    """ResNet-34 backbone; options as ``mocohub.backbones.ResNet``."""
    from mocohub.backbones import resnet34 as build

    return build(**kwargs)


def resnet50(**kwargs: Any) -> Any:
    """ResNet-50 backbone; options as ``mocohub.backbones.ResNet``."""
    from mocohub.backbones import resnet50 as build

    return build(**kwargs)
