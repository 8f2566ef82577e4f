"""mocohub: MoCo (Momentum Contrast) backbones, pre-training, embedding and export.

Importing ``mocohub`` is cheap: PyTorch is imported only when a name that
needs it is first used, so ``mocohub --help`` answers at once.

Example:
    >>> import mocohub
    >>> net = mocohub.resnet18(num_classes=128, small_stem=True, in_channels=1, width=32)
    >>> net.fc.out_features
    128
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mocohub._lazy import lazy_exports
from mocohub.errors import ConfigError, DistributedError, InputError, MocohubError

__version__ = "0.1.0"

# pyproject installs training/ and export/ as mocohub.training and mocohub.export.
# Run from a bare source tree (PYTHONPATH=., nothing installed) they sit beside this
# package instead, so the tree's root joins the package's search path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(__file__), "training")) and os.path.isfile(
    os.path.join(_ROOT, "training", "__init__.py")
):
    __path__.append(_ROOT)

# name -> module that defines it; resolved on first access (PEP 562).
_LAZY = {
    "ARCHITECTURES": "mocohub.backbones",
    "ResNet": "mocohub.backbones",
    "build_backbone": "mocohub.backbones",
    "resnet18": "mocohub.backbones",
    "resnet34": "mocohub.backbones",
    "resnet50": "mocohub.backbones",
    "load": "mocohub.loading",
    "Weights": "mocohub.registry",
    "WeightsFile": "mocohub.registry",
    "get_weights": "mocohub.registry",
    "list_models": "mocohub.registry",
    "register_weights": "mocohub.registry",
    "registered": "mocohub.registry",
    "unregister_weights": "mocohub.registry",
    "save_pretrained": "mocohub.hf",
    "from_pretrained": "mocohub.hf",
    "push_to_hub": "mocohub.hf",
    "FeatureExtractor": "mocohub.features",
    "Index": "mocohub.index",
    "ModelConfig": "mocohub.model_config",
    "Preprocessing": "mocohub.preprocessing",
}

__all__ = [
    "ARCHITECTURES",
    "ConfigError",
    "DistributedError",
    "FeatureExtractor",
    "Index",
    "InputError",
    "MocohubError",
    "ModelConfig",
    "Preprocessing",
    "ResNet",
    "Weights",
    "WeightsFile",
    "__version__",
    "build_backbone",
    "from_pretrained",
    "get_weights",
    "list_models",
    "load",
    "push_to_hub",
    "register_weights",
    "registered",
    "resnet18",
    "resnet34",
    "resnet50",
    "save_pretrained",
    "unregister_weights",
]

if TYPE_CHECKING:
    from mocohub.backbones import (
        ARCHITECTURES,
        ResNet,
        build_backbone,
        resnet18,
        resnet34,
        resnet50,
    )
    from mocohub.features import FeatureExtractor
    from mocohub.hf import from_pretrained, push_to_hub, save_pretrained
    from mocohub.index import Index
    from mocohub.loading import load
    from mocohub.model_config import ModelConfig
    from mocohub.preprocessing import Preprocessing
    from mocohub.registry import (
        Weights,
        WeightsFile,
        get_weights,
        list_models,
        register_weights,
        registered,
        unregister_weights,
    )


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
