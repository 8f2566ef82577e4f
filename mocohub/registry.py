"""Named MoCo weight sets: one table, in the spirit of torchvision's ``Weights`` enums.

Each :class:`Weights` entry says what a weight set is (architecture and shape),
where its file lives and the hash its content must have
(:class:`WeightsFile`), how to feed it (:class:`~mocohub.preprocessing.Preprocessing`)
and its meta (paper, epochs, published ImageNet linear top-1, licence,
parameters). ``mocohub.load(NAME)`` fetches, verifies and loads one; the
entry builds the same :class:`~mocohub.models.ModelConfig` that ends up on the
model as ``model.mocohub_config``, and gives the matching evaluation
transform.

A file location is an ``https://`` URL (downloaded to the torch hub cache), an
``hf-hub:org/name[@revision]`` Hub repo (the Hugging Face cache), or a
``package:<folder>`` artifact folder shipped inside mocohub under
``mocohub/weights/<folder>/`` (``config.json`` + ``model.safetensors`` +
``README.md``; loaded with no network). Where an entry has several, the
safetensors ones are tried first.

Example:
    >>> weights = get_weights("moco_v2_r50_800ep")
    >>> weights.meta["imagenet_linear_top1"], weights.url
    (71.1, 'https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/...')
    >>> batch = weights.transforms()(image).unsqueeze(0)  # 1 x 3 x 224 x 224
    >>> [w.name for w in list_models()]
    ['moco_v1_r50_200ep', 'moco_v2_r50_200ep', 'moco_v2_r50_800ep']
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mocohub.errors import ConfigError, InputError, MissingHeadError
from mocohub.models import HeadConfig, ModelConfig
from mocohub.preprocessing import Preprocessing

__all__ = [
    "HF_PREFIX",
    "PACKAGE_PREFIX",
    "WEIGHTS_DIR",
    "Weights",
    "WeightsFile",
    "get_weights",
    "list_models",
    "register_weights",
]

HF_PREFIX = "hf-hub:"
PACKAGE_PREFIX = "package:"
#: where weight sets shipped inside the package live (package data)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_HASH = re.compile(r"(md5|sha256):([0-9a-f]{8,64})")


@dataclass(frozen=True)
class WeightsFile:
    """One place a weight set's file lives, and the hash its content must have.

    Args:
        location: an ``http(s)://`` URL, ``hf-hub:org/name[@revision]``,
            ``package:<folder>`` (under ``mocohub/weights/``) or a local path.
        hash: ``"md5:<hex prefix>"`` or ``"sha256:<hex prefix>"`` (8+ hex
            digits) of the file (of ``model.safetensors`` for a folder or repo);
            None skips the check (the Hub verifies its own downloads).
    """

    location: str
    hash: str | None = None

    def __post_init__(self) -> None:
        if self.hash is not None and not _HASH.fullmatch(self.hash):
            raise ConfigError(
                f"A weights hash is 'md5:<hex>' or 'sha256:<hex>' with 8 to 64 lowercase hex "
                f"digits, got {self.hash!r}."
            )

    @property
    def kind(self) -> str:
        """``"url"``, ``"hf-hub"``, ``"package"`` or ``"path"``."""
        if self.location.startswith(("https://", "http://")):
            return "url"
        if self.location.startswith(HF_PREFIX):
            return "hf-hub"
        if self.location.startswith(PACKAGE_PREFIX):
            return "package"
        return "path"

    @property
    def is_safetensors(self) -> bool:
        """Whether the location holds safetensors: an artifact folder, a Hub repo, a file."""
        if self.kind in ("hf-hub", "package"):
            return True
        return self.location.endswith(".safetensors") or (
            self.kind == "path" and Path(self.location).is_dir()
        )

    def local_path(self) -> Path | None:
        """The file or folder on this machine for ``package:`` and path locations, else None."""
        if self.kind == "package":
            return WEIGHTS_DIR / self.location.removeprefix(PACKAGE_PREFIX)
        if self.kind == "path":
            return Path(self.location)
        return None


@dataclass(frozen=True)
class Weights:
    """A named weight set: architecture, files, preprocessing and meta.

    Args:
        name: the registry name, e.g. ``"moco_v2_r50_800ep"``.
        arch, small_stem, in_channels, width: the backbone's shape
            (:class:`~mocohub.backbones.ResNet` options).
        files: where the weights live, in order of preference (safetensors
            locations are tried before pickled checkpoints in any case).
        preprocessing: how images are fed to the backbone.
        head: the projection head stored with the weights, if any.
        meta: facts shown by ``mocohub info`` and copied into the model's
            config: ``paper``, ``epochs``, ``imagenet_linear_top1``,
            ``license``, ``num_params`` (backbone, without head) ...
    """

    name: str
    arch: str
    files: tuple[WeightsFile, ...]
    preprocessing: Preprocessing = field(default_factory=Preprocessing.imagenet)
    head: HeadConfig | None = None
    small_stem: bool = False
    in_channels: int = 3
    width: int = 64
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.files:
            raise ConfigError(f"The weights {self.name!r} need at least one file location.")
        self.config()  # validates arch, channels and preprocessing together

    def config(self, head: bool = False) -> ModelConfig:
        """The :class:`~mocohub.models.ModelConfig` a model of these weights carries.

        Example:
            >>> get_weights("moco_v2_r50_800ep").config().feature_dim
            2048
        """
        if head and self.head is None:
            raise MissingHeadError(
                f"The weights {self.name} hold no projection head; load them with head=False."
            )
        return ModelConfig(
            arch=self.arch,
            small_stem=self.small_stem,
            in_channels=self.in_channels,
            width=self.width,
            head=self.head if head else None,
            preprocessing=self.preprocessing,
            meta={"name": self.name, **self.meta},
        )

    def transforms(self) -> Any:
        """The evaluation transform (PIL image -> normalised float CHW tensor) of these weights.

        Example:
            >>> get_weights("moco_v2_r50_800ep").transforms()(image).shape
            torch.Size([3, 224, 224])
        """
        return self.preprocessing.transform()

    @property
    def url(self) -> str | None:
        """The first download URL of the weights, if they have one."""
        return next((f.location for f in self.files if f.kind == "url"), None)

    def files_by_preference(self) -> list[WeightsFile]:
        """The file locations to try, safetensors first, otherwise in the table's order."""
        return sorted(self.files, key=lambda f: not f.is_safetensors)


def _reference(
    name: str, release: str, version: int, epochs: int, top1: float, md5: str
) -> Weights:
    """An entry for one of facebookresearch/moco's published ResNet-50 checkpoints."""
    paper = (
        "He et al., Momentum Contrast for Unsupervised Visual Representation Learning, "
        "CVPR 2020 (arXiv:1911.05722)"
        if version == 1
        else "Chen et al., Improved Baselines with Momentum Contrastive Learning (arXiv:2003.04297)"
    )
    base = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints"
    return Weights(
        name=name,
        arch="resnet50",
        files=(WeightsFile(f"{base}/{release}/{release}_pretrain.pth.tar", f"md5:{md5}"),),
        head=HeadConfig("linear" if version == 1 else "mlp", 128),
        meta={
            "description": f"MoCo v{version} ResNet-50, {epochs} epochs on ImageNet-1k",
            "paper": paper,
            "source": "https://github.com/facebookresearch/moco",
            "format": "reference",
            "epochs": epochs,
            "dataset": "ImageNet-1k train (labels unused)",
            "imagenet_linear_top1": top1,
            "recipe": "MoCo v1: linear head, T 0.07, step LR"
            if version == 1
            else "MoCo v2: MLP head, T 0.2, aug+ (blur), cosine LR",
            "license": "cc-by-nc-4.0",
            "license_note": "the licence the reference README states for its code and models; "
            "check https://github.com/facebookresearch/moco/blob/main/LICENSE for current terms",
            # torchvision ResNet-50 without fc (checked by tests/test_registry.py)
            "num_params": 23_508_032,
        },
    )


# Shipped inside the package (mocohub/weights/, written by scripts/bundle_model.py from
# a `mocohub train --preset fashion_mnist` run; its model card holds the command).
_FASHION_MNIST = Weights(
    name="moco_r18_fashion_mnist",
    arch="resnet18",
    files=(WeightsFile("package:moco_r18_fashion_mnist", "sha256:4e514c9e7d5b0b10"),),
    preprocessing=Preprocessing(28, 32, (0.286,), (0.353,), channels=1),
    small_stem=True,
    in_channels=1,
    width=16,
    meta={
        "description": "MoCo ResNet-18 (small stem, width 16), 12 epochs on Fashion-MNIST "
        "train without labels; ships inside mocohub and loads offline",
        "source": "mocohub (this package)",
        "epochs": 12,
        "dataset": "Fashion-MNIST train split (60,000 images; labels unused)",
        "knn_top1": 81.75,
        "linear_top1": 85.35,
        "license": "mit",
        "num_params": 699_888,
    },
)

# The one table. Names: moco_v{version}_{arch}_{epochs}ep. A weight set shipped
# inside the package is one row with a package: location, e.g.
#   Weights("moco_fmnist_r18", "resnet18", (WeightsFile("package:moco_fmnist_r18",
#           "sha256:..."),), Preprocessing(28, 32, (0.286,), (0.353,), channels=1),
#           small_stem=True, in_channels=1, width=32, meta={...})
_TABLE: dict[str, Weights] = {
    w.name: w
    for w in (
        _reference("moco_v1_r50_200ep", "moco_v1_200ep", 1, 200, 60.6, "b251726a"),
        _reference("moco_v2_r50_200ep", "moco_v2_200ep", 2, 200, 67.7, "59fd9945"),
        _reference("moco_v2_r50_800ep", "moco_v2_800ep", 2, 800, 71.1, "a04e12f8"),
        _FASHION_MNIST,
    )
}


def list_models() -> list[Weights]:
    """Every registered weight set, sorted by name.

    Example:
        >>> for w in list_models():
        ...     print(w.name, w.meta.get("imagenet_linear_top1"))
        moco_v1_r50_200ep 60.6
        moco_v2_r50_200ep 67.7
        moco_v2_r50_800ep 71.1
    """
    return [_TABLE[name] for name in sorted(_TABLE)]


def get_weights(name: str) -> Weights:
    """The weight set registered as ``name``; an unknown name suggests close ones.

    Example:
        >>> get_weights("moco_v1_r50_200ep").meta["epochs"]
        200
    """
    try:
        return _TABLE[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_TABLE), n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise InputError(
            f"No weights named {name!r}; {hint}`mocohub list` shows the "
            f"{len(_TABLE)} registered names."
        ) from None


def register_weights(weights: Weights, *, replace: bool = False) -> Weights:
    """Add ``weights`` to the table (for weight sets of your own, or tests).

    Example:
        >>> register_weights(Weights("my_r18", "resnet18", (WeightsFile("/models/my_r18"),)))
        >>> mocohub.load("my_r18")
    """
    if weights.name in _TABLE and not replace:
        raise ConfigError(
            f"Weights named {weights.name!r} are already registered; pass replace=True "
            "to replace them."
        )
    _TABLE[weights.name] = weights
    return weights
