"""mocohub.training: make a MoCo backbone.

Example:
    >>> from mocohub.training import MoCo
    >>> import torchvision
    >>> model = MoCo(torchvision.models.resnet50, dim=128, K=65536, m=0.999, T=0.2, mlp=True)
"""

from __future__ import annotations

from .moco import MoCo
from .split_batchnorm import SplitBatchNorm, convert_split_batchnorm

__all__ = ["MoCo", "SplitBatchNorm", "convert_split_batchnorm"]
