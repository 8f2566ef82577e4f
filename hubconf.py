"""torch.hub entry points: ``torch.hub.load("org/mocohub", NAME, ...)``.

Thin by design: each entry point only calls :mod:`mocohub`. The MoCo entry
points return a backbone (a torchvision ResNet whose ``fc`` is ``Identity``)
with its ``mocohub_config`` attached; ``model.mocohub_config.preprocessing.transform()``
is the matching evaluation transform. Extra keyword arguments go to
``mocohub.load`` (``head=True`` keeps the projection head, ``progress``,
``cache_dir``).

Example:
    >>> import torch
    >>> model = torch.hub.load("org/mocohub", "moco_r50")              # MoCo v2, 800 epochs
    >>> model = torch.hub.load(checkout, "moco_r50", source="local", pretrained=False)
    >>> net = torch.hub.load("org/mocohub", "resnet18", num_classes=128, small_stem=True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch.hub lists every public callable here as an entry point
    from typing import Any

# What the entry points import (torch.hub checks that each is installed).
dependencies = ["torch", "torchvision", "PIL", "tqdm"]


def _moco(name: str, pretrained: bool, kwargs: dict[str, Any]) -> Any:
    import mocohub

    return mocohub.load(name, pretrained=pretrained, **kwargs)


def moco_r50(pretrained: bool = True, **kwargs: Any) -> Any:
    """The best MoCo ResNet-50: MoCo v2, 800 epochs, ImageNet linear top-1 71.1%.

    Registry name ``moco_v2_r50_800ep``; 2048-d features, 224 px ImageNet preprocessing.
    """
    return _moco("moco_v2_r50_800ep", pretrained, kwargs)


def moco_v2_r50(pretrained: bool = True, **kwargs: Any) -> Any:
    """MoCo v2 ResNet-50, 800 epochs, ImageNet linear top-1 71.1% (``moco_v2_r50_800ep``)."""
    return _moco("moco_v2_r50_800ep", pretrained, kwargs)


def moco_v2_r50_200ep(pretrained: bool = True, **kwargs: Any) -> Any:
    """MoCo v2 ResNet-50, 200 epochs, ImageNet linear top-1 67.7% (``moco_v2_r50_200ep``)."""
    return _moco("moco_v2_r50_200ep", pretrained, kwargs)


def moco_v1_r50(pretrained: bool = True, **kwargs: Any) -> Any:
    """MoCo v1 ResNet-50, 200 epochs, ImageNet linear top-1 60.6% (``moco_v1_r50_200ep``)."""
    return _moco("moco_v1_r50_200ep", pretrained, kwargs)


def moco_r18_fashion_mnist(pretrained: bool = True, **kwargs: Any) -> Any:
    """MoCo ResNet-18 (width 16, small stem), 12 epochs on Fashion-MNIST; ships inside mocohub.

    Registry name ``moco_r18_fashion_mnist``: 128-d features of 28x28 gray images, loaded
    with no network. Fashion-MNIST test split: k-NN top-1 81.75% (k=200, T=0.1), linear
    probe 85.35% (``mocohub info moco_r18_fashion_mnist``, and its model card).
    """
    return _moco("moco_r18_fashion_mnist", pretrained, kwargs)


def resnet18(**kwargs: Any) -> Any:
    """ResNet-18 backbone, random weights; options as ``mocohub.backbones.ResNet``."""
    from mocohub.backbones import resnet18 as build

    return build(**kwargs)


def resnet34(**kwargs: Any) -> Any:
    """ResNet-34 backbone, random weights; options as ``mocohub.backbones.ResNet``."""
    from mocohub.backbones import resnet34 as build

    return build(**kwargs)


def resnet50(**kwargs: Any) -> Any:
    """ResNet-50 backbone, random weights; options as ``mocohub.backbones.ResNet``."""
    from mocohub.backbones import resnet50 as build

    return build(**kwargs)
