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
