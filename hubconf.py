"""torch.hub entry points: ``torch.hub.load("org/mocohub", NAME, ...)``.

Thin by design: each entry point only calls :mod:`mocohub`. The MoCo entry
points return a backbone (a torchvision ResNet whose ``fc`` is ``Identity``, or
for ``moco_v3_vit_*`` a timm ViT that returns its class token) with its
``mocohub_config`` attached; ``model.mocohub_config.preprocessing.transform()``
is the matching evaluation transform. Extra keyword arguments go to
``mocohub.load`` (``head=True`` keeps the projection head, ``progress``,
``cache_dir``). Each MoCo entry point's docstring is its registry row's
summary (``mocohub.registry.Weights.summary``), so metrics are never copied here.

Example:
    >>> import torch
    >>> model = torch.hub.load("org/mocohub", "moco_r50")              # MoCo v2, 800 epochs
    >>> model = torch.hub.load(checkout, "moco_r50", source="local", pretrained=False)
    >>> net = torch.hub.load("org/mocohub", "resnet18", num_classes=128, small_stem=True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch.hub lists every public callable here as an entry point
    from collections.abc import Callable
    from typing import Any

# What the entry points import (torch.hub checks that each is installed).
dependencies = ["torch", "torchvision", "timm", "PIL", "tqdm"]


def _weights_entry(name: str, lead: str = "") -> Callable[..., Any]:
    """The entry point that loads the registered weights ``name``, documented by the registry."""
    from mocohub.registry import get_weights

    def entry(pretrained: bool = True, **kwargs: Any) -> Any:
        import mocohub

        return mocohub.load(name, pretrained=pretrained, **kwargs)

    entry.__doc__ = f"{lead}{get_weights(name).summary()}"
    return entry


def _backbone_entry(arch: str) -> Callable[..., Any]:
    """The entry point that builds a randomly initialised ``arch`` backbone."""

    def entry(pretrained: bool = False, **kwargs: Any) -> Any:
        from mocohub.backbones import build_backbone
        from mocohub.errors import ConfigError

        if pretrained:  # as torchvision's entry points take it
            raise ConfigError(
                f"{arch} builds a randomly initialised backbone; for pre-trained MoCo weights "
                "load a named model (moco_r50, moco_v3_r50, moco_r18_fashion_mnist, ...: "
                "`mocohub list`)."
            )
        return build_backbone(arch, **kwargs)

    entry.__doc__ = f"{arch} backbone, random weights; options as ``mocohub.backbones.ResNet``."
    return entry


moco_r50 = _weights_entry(
    "moco_v2_r50_800ep",
    "The default MoCo ResNet-50 (v2; moco_v3_r50 scores higher, but its file hash is not "
    "pinned yet). ",
)
moco_v2_r50 = _weights_entry("moco_v2_r50_800ep")
moco_v2_r50_200ep = _weights_entry("moco_v2_r50_200ep")
moco_v1_r50 = _weights_entry("moco_v1_r50_200ep")
moco_v3_r50 = _weights_entry("moco_v3_r50_1000ep")
moco_v3_r50_300ep = _weights_entry("moco_v3_r50_300ep")
moco_v3_r50_100ep = _weights_entry("moco_v3_r50_100ep")
moco_v3_vit_s = _weights_entry("moco_v3_vit_s")
moco_v3_vit_b = _weights_entry("moco_v3_vit_b")
moco_r18_fashion_mnist = _weights_entry("moco_r18_fashion_mnist")
resnet18 = _backbone_entry("resnet18")
resnet34 = _backbone_entry("resnet34")
resnet50 = _backbone_entry("resnet50")

for _name, _entry in list(globals().items()):  # names as torch.hub and help() show them
    if callable(_entry) and getattr(_entry, "__name__", None) == "entry":
        _entry.__name__ = _entry.__qualname__ = _name
del _name, _entry
