"""mocohub.training: make a MoCo backbone.

Example:
    >>> import torchvision
    >>> from mocohub.training import MoCo, MoCoV3, preset
    >>> from mocohub.training.train import train
    >>> model = MoCo(torchvision.models.resnet50, dim=128, K=65536, m=0.999, T=0.2, mlp=True)
    >>> v3 = MoCoV3(torchvision.models.resnet50, dim=256, mlp_dim=4096, T=1.0)
    >>> train(preset("fashion_mnist", epochs=1), "samples/fashion-mnist", "runs/demo")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mocohub._lazy import lazy_exports

# Imported on first use, so that the command line's `train --help` (which reads the
# presets) does not load PyTorch.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "PRESETS": f"{__name__}.config",
        "TrainConfig": f"{__name__}.config",
        "preset": f"{__name__}.config",
        "MoCo": f"{__name__}.moco",
        "MoCoV3": f"{__name__}.moco_v3",
        "SplitBatchNorm": f"{__name__}.split_batchnorm",
        "convert_split_batchnorm": f"{__name__}.split_batchnorm",
    },
    globals(),
)

if TYPE_CHECKING:
    from .config import PRESETS, TrainConfig, preset
    from .moco import MoCo
    from .moco_v3 import MoCoV3
    from .split_batchnorm import SplitBatchNorm, convert_split_batchnorm

__all__ = [
    "PRESETS",
    "MoCo",
    "MoCoV3",
    "SplitBatchNorm",
    "TrainConfig",
    "convert_split_batchnorm",
    "preset",
]
