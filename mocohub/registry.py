"""Named MoCo weight sets: one table, in the spirit of torchvision's ``Weights`` enums.

Each :class:`Weights` entry says what a weight set is and how to feed it (a
:class:`~mocohub.artifact.ModelConfig`: architecture, shape, stored head and
:class:`~mocohub.preprocessing.Preprocessing`), where its file lives and the
hash its content must have (:class:`WeightsFile`), and its meta (paper,
epochs, published ImageNet linear top-1, licence, parameters).
``mocohub.load(NAME)`` fetches, verifies and loads one; the entry's config
ends up on the model as ``model.mocohub_config``, and it gives the matching
evaluation transform. :func:`registered` adds rows for a ``with`` block
(weight sets of your own, or tests); :func:`register_weights` adds them for good.

A file location is an ``https://`` URL (downloaded to the torch hub cache), an
``hf-hub:org/name[@revision]`` Hub repo (the Hugging Face cache), or a
``package:<folder>`` artifact folder shipped inside mocohub under
``mocohub/weights/<folder>/`` (``config.json`` + ``model.safetensors`` +
``README.md``; loaded with no network). Where an entry has several, the
safetensors ones are tried first.

Example:
    >>> weights = get_weights("moco_v2_r50_800ep")
    >>> weights.meta["imagenet_linear_top1"], weights.url
    (71.1, 'https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar')
    >>> from PIL import Image
    >>> weights.transforms()(Image.new("RGB", (320, 240))).shape
    torch.Size([3, 224, 224])
    >>> [w.name for w in list_models()][:4]
    ['moco_r18_fashion_mnist', 'moco_v1_r50_200ep', 'moco_v2_r50_200ep', 'moco_v2_r50_800ep']
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mocohub.errors import ConfigError, InputError, MissingHeadError
from mocohub.model_config import HeadConfig, ModelConfig
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
    "registered",
    "unregister_weights",
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
    """A named weight set: what it is and how to feed it, where its files are, and its meta.

    Args:
        name: the registry name, e.g. ``"moco_v2_r50_800ep"``.
        model: the :class:`~mocohub.artifact.ModelConfig` of the weights:
            architecture, shape options, the projection head stored with them
            (if any) and their preprocessing.
        files: where the weights live, in order of preference (safetensors
            locations are tried before pickled checkpoints in any case).
        meta: facts shown by ``mocohub info`` and copied into the model's
            config: ``paper``, ``epochs``, ``imagenet_linear_top1``,
            ``license``, ``num_params`` (backbone, without head) ...

    Example:
        >>> w = Weights("my_r18", ModelConfig("resnet18"), (WeightsFile("/models/my_r18"),))
        >>> w.config().feature_dim, w.model.preprocessing.image_size
        (512, 224)
    """

    name: str
    model: ModelConfig
    files: tuple[WeightsFile, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.files:
            raise ConfigError(f"The weights {self.name!r} need at least one file location.")

    def config(self, head: bool = False) -> ModelConfig:
        """The :class:`~mocohub.artifact.ModelConfig` a model of these weights carries.

        ``head=False`` leaves the stored projection head out; ``meta`` holds the
        registry name and the entry's meta.

        Example:
            >>> get_weights("moco_v2_r50_800ep").config().feature_dim
            2048
        """
        if head and self.model.head is None:
            raise MissingHeadError(
                f"The weights {self.name} hold no projection head; load them with head=False."
            )
        meta = {**self.model.meta, "name": self.name, **self.meta}
        return replace(self.model, head=self.model.head if head else None, meta=meta)

    def summary(self) -> str:
        """What the weights are, what they give and their published metrics, in a few sentences.

        The docstring of the weights' torch.hub entry point (``hubconf.py``).

        Example:
            >>> print(get_weights("moco_v1_r50_200ep").summary())
            MoCo v1 ResNet-50, 200 epochs on ImageNet-1k. Registry name ``moco_v1_r50_200ep``: 2048-d features of 224 px RGB images. Published: ImageNet linear classification top-1 60.6%.
        """  # noqa: E501
        from mocohub.card import METRIC_KEYS

        config, prep = self.config(), self.model.preprocessing
        colour = "RGB" if prep.channels == 3 else "grayscale"
        text = (
            f"{self.meta.get('description', self.name)}. Registry name ``{self.name}``: "
            f"{config.feature_dim}-d features of {prep.image_size} px {colour} images."
        )
        metrics = [
            f"{_sentence_case(label.removesuffix(' (%)'))} {self.meta[key]}%"
            for key, label in METRIC_KEYS.items()
            if key in self.meta
        ]
        return f"{text} Published: {', '.join(metrics)}." if metrics else text

    def transforms(self) -> Any:
        """The evaluation transform (PIL image -> normalised float CHW tensor) of these weights.

        Example:
            >>> from PIL import Image
            >>> get_weights("moco_v2_r50_800ep").transforms()(Image.new("RGB", (64, 48))).shape
            torch.Size([3, 224, 224])
        """
        return self.model.preprocessing.transform()

    @property
    def url(self) -> str | None:
        """The first download URL of the weights, if they have one."""
        return next((f.location for f in self.files if f.kind == "url"), None)

    def files_by_preference(self) -> list[WeightsFile]:
        """The file locations to try, safetensors first, otherwise in the table's order."""
        return sorted(self.files, key=lambda f: not f.is_safetensors)


def _sentence_case(label: str) -> str:
    """``"Linear top-1"`` -> ``"linear top-1"`` inside a sentence; ``"ImageNet ..."`` stays."""
    first = label.split()[0]
    return label[0].lower() + label[1:] if first[1:].islower() else label


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
        model=ModelConfig("resnet50", head=HeadConfig("linear" if version == 1 else "mlp", 128)),
        files=(WeightsFile(f"{base}/{release}/{release}_pretrain.pth.tar", f"md5:{md5}"),),
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


#: MoCo v3's released architectures: the registry arch, its name in a description, and
#: the recipe (the reference's CONFIG.md: LARS for ResNet, AdamW for ViT, batch 4096)
_V3_MODELS = {
    "resnet50": (
        "ResNet-50",
        "MoCo v3: no queue, momentum encoder, BN-MLP projector and predictor, "
        "symmetrised InfoNCE (T 1.0), LARS, batch 4096",
    ),
    "vit_small": (
        "ViT-Small/16 (12 heads)",
        "MoCo v3: no queue, momentum encoder, BN-MLP projector and predictor, "
        "symmetrised InfoNCE (T 0.2), AdamW, batch 4096, frozen random patch projection",
    ),
    "vit_base": (
        "ViT-Base/16",
        "MoCo v3: no queue, momentum encoder, BN-MLP projector and predictor, "
        "symmetrised InfoNCE (T 0.2), AdamW, batch 4096, frozen random patch projection",
    ),
}


def _reference_v3(
    name: str, release: str, epochs: int, top1: float, arch: str = "resnet50"
) -> Weights:
    """An entry for one of facebookresearch/moco-v3's published checkpoints (ResNet-50, ViTs).

    URLs and linear top-1 from the reference's README and CONFIG.md. The files could
    not be downloaded where these rows were written, so no hash is pinned yet: loading
    checks their structure instead (a MoCo v3 ``base_encoder`` that builds this
    architecture exactly, every tensor present and of the right shape). The ViTs are
    evaluated as the ResNet (the reference ``main_lincls.py`` has one validation
    transform: resize 256, centre crop 224, ImageNet mean/std).
    """
    label, recipe = _V3_MODELS[arch]
    return Weights(
        name=name,
        model=ModelConfig(arch),
        files=(WeightsFile(f"https://dl.fbaipublicfiles.com/moco-v3/{release}/{release}.pth.tar"),),
        meta={
            "description": f"MoCo v3 {label}, {epochs} epochs on ImageNet-1k",
            "paper": "Chen, Xie and He, An Empirical Study of Training Self-Supervised Vision "
            "Transformers, ICCV 2021 (arXiv:2104.02057)",
            "source": "https://github.com/facebookresearch/moco-v3",
            "format": "reference_v3",
            "epochs": epochs,
            "dataset": "ImageNet-1k train (labels unused)",
            "imagenet_linear_top1": top1,
            "recipe": recipe,
            "license": "cc-by-nc-4.0",
            "license_note": "non-commercial use only: the licence of facebookresearch/moco-v3, "
            "see https://github.com/facebookresearch/moco-v3/blob/main/LICENSE",
            "hash_note": "not yet pinned (no network where this row was written); the file's "
            "structure is checked on load",
            # the backbone without its projector (checked by tests/test_registry.py)
            "num_params": _V3_PARAMS[arch],
        },
    )


_V3_PARAMS = {"resnet50": 23_508_032, "vit_small": 21_665_664, "vit_base": 85_798_656}


# Shipped inside the package (mocohub/weights/, written by scripts/bundle_model.py from
# a `mocohub train --preset fashion_mnist` run; its model card holds the command).
_FASHION_MNIST = Weights(
    name="moco_r18_fashion_mnist",
    model=ModelConfig(
        "resnet18",
        small_stem=True,
        in_channels=1,
        width=32,
        preprocessing=Preprocessing(28, 32, (0.286,), (0.353,), channels=1),
    ),
    files=(WeightsFile("package:moco_r18_fashion_mnist", "sha256:dffab075af19e84d"),),
    meta={
        "description": "MoCo ResNet-18 (small stem, width 32), 40 epochs on Fashion-MNIST "
        "train without labels; ships inside mocohub and loads offline",
        "source": "mocohub (this package)",
        "epochs": 40,
        "dataset": "Fashion-MNIST train split (60,000 images; labels unused)",
        "knn_top1": 88.39,
        "linear_top1": 89.5,
        "license": "mit",
        "num_params": 2_794_464,
    },
)

# The one table. Names: moco_v{version}_{arch}_{epochs}ep. A weight set shipped
# inside the package is one row with a package: location, as _FASHION_MNIST above.
_TABLE: dict[str, Weights] = {
    w.name: w
    for w in (
        _reference("moco_v1_r50_200ep", "moco_v1_200ep", 1, 200, 60.6, "b251726a"),
        _reference("moco_v2_r50_200ep", "moco_v2_200ep", 2, 200, 67.7, "59fd9945"),
        _reference("moco_v2_r50_800ep", "moco_v2_800ep", 2, 800, 71.1, "a04e12f8"),
        _reference_v3("moco_v3_r50_100ep", "r-50-100ep", 100, 68.9),
        _reference_v3("moco_v3_r50_300ep", "r-50-300ep", 300, 72.8),
        _reference_v3("moco_v3_r50_1000ep", "r-50-1000ep", 1000, 74.6),
        _reference_v3("moco_v3_vit_s", "vit-s-300ep", 300, 73.2, "vit_small"),
        _reference_v3("moco_v3_vit_b", "vit-b-300ep", 300, 76.7, "vit_base"),
        _FASHION_MNIST,
    )
}


def list_models() -> list[Weights]:
    """Every registered weight set, sorted by name (numbers by value).

    Example:
        >>> for w in list_models():
        ...     print(w.name, w.meta.get("imagenet_linear_top1"))
        moco_r18_fashion_mnist None
        moco_v1_r50_200ep 60.6
        moco_v2_r50_200ep 67.7
        moco_v2_r50_800ep 71.1
        moco_v3_r50_100ep 68.9
        moco_v3_r50_300ep 72.8
        moco_v3_r50_1000ep 74.6
        moco_v3_vit_b 76.7
        moco_v3_vit_s 73.2
    """
    return [_TABLE[name] for name in sorted(_TABLE, key=_natural)]


def _natural(name: str) -> list[Any]:
    """Sort key that orders numbers by value: ``..._100ep`` before ``..._1000ep``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
    """Add ``weights`` to the table for the rest of the process; see :func:`registered`.

    Example:
        >>> mine = Weights("my_r18", ModelConfig("resnet18"), (WeightsFile("/models/my_r18"),))
        >>> register_weights(mine) is get_weights("my_r18")
        True
        >>> unregister_weights("my_r18") is mine
        True
    """
    if weights.name in _TABLE and not replace:
        raise ConfigError(
            f"Weights named {weights.name!r} are already registered; pass replace=True "
            "to replace them."
        )
    _TABLE[weights.name] = weights
    return weights


def unregister_weights(name: str) -> Weights:
    """Remove the weight set registered as ``name`` and return it.

    Example:
        >>> register_weights(Weights("tmp", ModelConfig(), (WeightsFile("/m"),))).name
        'tmp'
        >>> unregister_weights("tmp").name
        'tmp'
    """
    weights = get_weights(name)  # an unknown name: the same error as a lookup
    del _TABLE[name]
    return weights


@contextmanager
def registered(*weights: Weights, replace: bool = False) -> Iterator[tuple[Weights, ...]]:
    """Register ``weights`` for a ``with`` block; afterwards the table is as before.

    With ``replace=True`` a row may stand in for a registered one (a test
    pointing a published name at a small local file); the original comes back
    when the block ends, also on an error.

    Example:
        >>> mine = Weights("my_r18", ModelConfig("resnet18"), (WeightsFile("/models/my_r18"),))
        >>> with registered(mine):
        ...     get_weights("my_r18").config().arch
        'resnet18'
        >>> "my_r18" in [w.name for w in list_models()]
        False
    """
    before = {w.name: _TABLE.get(w.name) for w in weights}
    try:
        for w in weights:
            register_weights(w, replace=replace)
        yield weights
    finally:
        for name, old in before.items():
            if old is None:
                _TABLE.pop(name, None)
            else:
                _TABLE[name] = old
