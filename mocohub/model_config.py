"""What a MoCo model is, without PyTorch: :class:`ModelConfig`, the content of ``config.json``.

A :class:`ModelConfig` says everything needed to rebuild a backbone and feed
it: architecture and shape options, the projection head (if kept), the
:class:`~mocohub.preprocessing.Preprocessing`, and free-form ``meta``.
:mod:`mocohub.artifact` builds, saves and loads the model it describes; this
module only describes it, so the registry and the command line (``mocohub
list``, ``info``, every ``--help``) read configs without importing torch.

Example:
    >>> ModelConfig("resnet18", width=16).feature_dim
    128
    >>> feature_dim("resnet50")
    2048
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mocohub.errors import ConfigError, InputError
from mocohub.preprocessing import Preprocessing

__all__ = [
    "MODEL_TYPE",
    "RESNET_EXPANSION",
    "VIT_SHAPES",
    "HeadConfig",
    "ModelConfig",
    "feature_dim",
]

MODEL_TYPE = "mocohub"

#: each ResNet's last-stage channels per unit of ``width`` / 8: its residual block's
#: ``expansion`` (1 for BasicBlock, 4 for Bottleneck; :mod:`mocohub.backbones` builds
#: them, and a test checks that the two agree)
RESNET_EXPANSION: dict[str, int] = {"resnet18": 1, "resnet34": 1, "resnet50": 4}

#: each ViT's (width, default patch size, default image size, default channels), as the
#: builders of :mod:`mocohub.vit` make them (known here without importing timm; a test
#: checks that the two agree)
VIT_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "vit_small": (384, 16, 224, 3),
    "vit_base": (768, 16, 224, 3),
    "vit_mini": (192, 4, 28, 1),
    "vit_nano": (32, 4, 16, 1),
}


def feature_dim(arch: str, width: int = 64) -> int:
    """Size of the pooled features of ResNet ``arch`` at ``width``, without building it.

    Example:
        >>> feature_dim("resnet50"), feature_dim("resnet18", width=16)
        (2048, 128)
    """
    if arch not in RESNET_EXPANSION:
        raise ConfigError(
            f"Unknown architecture {arch!r}; choose one of: {', '.join(RESNET_EXPANSION)}."
        )
    return width * 8 * RESNET_EXPANSION[arch]  # the last stage's channels


@dataclass(frozen=True)
class HeadConfig:
    """MoCo's projection head: ``"linear"`` (v1: one Linear) or ``"mlp"`` (v2: Linear-ReLU-Linear).

    The module keys match the reference encoder's ``fc``: ``fc.weight`` for v1,
    ``fc.0.*`` and ``fc.2.*`` for v2.
    """

    type: str = "mlp"
    dim: int = 128

    def __post_init__(self) -> None:
        if self.type not in ("linear", "mlp") or self.dim < 1:
            raise ConfigError(
                f"A head is 'linear' or 'mlp' with a positive dim, got {self.type!r}, {self.dim}."
            )


@dataclass(frozen=True)
class ModelConfig:
    """How to build and feed a MoCo backbone; the content of ``config.json``.

    Args:
        arch: ``resnet18``, ``resnet34``, ``resnet50``, or a ViT: ``vit_small``,
            ``vit_base`` (MoCo v3's ViT-S/16, ViT-B/16), ``vit_mini``, ``vit_nano``.
        small_stem, in_channels, width: :class:`~mocohub.backbones.ResNet`'s options
            (``in_channels`` also a ViT's; ``small_stem`` and ``width`` are ResNet-only).
        head: the projection head the weights include, or None (backbone only; always
            None for a ViT, whose MoCo v3 projector mocohub does not keep).
        preprocessing: how images are fed to it.
        meta: free-form facts (name, source, paper, epochs, metrics, licence ...).
        image_size, patch_size: a ViT's input side and patch side; None (the default)
            means the preprocessing's crop size and the architecture's patch size.
            Always None for a ResNet, which takes any size.

    Example:
        >>> ModelConfig("vit_nano", in_channels=1,
        ...             preprocessing=Preprocessing(16, 16, (0.5,), (0.5,), channels=1)).patch_size
        4
    """

    arch: str = "resnet50"
    small_stem: bool = False
    in_channels: int = 3
    width: int = 64
    head: HeadConfig | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing.imagenet)
    meta: Mapping[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in RESNET_EXPANSION and self.arch not in VIT_SHAPES:
            known = [*RESNET_EXPANSION, *VIT_SHAPES]
            raise ConfigError(
                f"Unknown architecture {self.arch!r}; mocohub builds {', '.join(known)}."
            )
        if self.is_vit:
            self._check_vit()
        elif self.image_size is not None or self.patch_size is not None:
            raise ConfigError(
                f"image_size and patch_size are ViT options; a {self.arch} takes any image "
                "size, so leave them out (its crop size is the preprocessing's)."
            )
        if self.in_channels != self.preprocessing.channels:
            raise ConfigError(
                f"The backbone takes {self.in_channels} channels but its preprocessing "
                f"gives {self.preprocessing.channels}."
            )

    def _check_vit(self) -> None:
        """Fill a ViT's image and patch size (a frozen dataclass: set once, here) and check them."""
        if self.small_stem or self.width != 64:
            raise ConfigError(
                f"small_stem and width are ResNet options; a {self.arch} has neither, so "
                "leave them at their defaults."
            )
        if self.head is not None:
            raise ConfigError(
                f"mocohub keeps no projection head on a {self.arch} (MoCo v3's BN-MLP projector "
                "is dropped on conversion); use head=None."
            )
        size = self.preprocessing.image_size if self.image_size is None else self.image_size
        patch = VIT_SHAPES[self.arch][1] if self.patch_size is None else self.patch_size
        object.__setattr__(self, "image_size", int(size))
        object.__setattr__(self, "patch_size", int(patch))
        if size != self.preprocessing.image_size:
            raise ConfigError(
                f"This {self.arch} takes {size} px images but its preprocessing crops "
                f"{self.preprocessing.image_size} px; a ViT takes one size only, so make them "
                "equal."
            )
        if patch < 1 or size % patch:
            raise ConfigError(
                f"The image side {size} is not a positive multiple of the patch size {patch}; "
                "choose a patch size that tiles the image."
            )

    @property
    def is_vit(self) -> bool:
        """Whether the architecture is a Vision Transformer (``vit_*``).

        Example:
            >>> ModelConfig("vit_small").is_vit, ModelConfig("resnet50").is_vit
            (True, False)
        """
        return self.arch in VIT_SHAPES

    @property
    def feature_dim(self) -> int:
        """Size of the pooled backbone features (2048 for a standard ResNet-50, a ViT's width)."""
        if self.is_vit:
            return VIT_SHAPES[self.arch][0]
        return feature_dim(self.arch, self.width)

    @property
    def embedding_dim(self) -> int:
        """Size of the model's output: the head's dim when a head is kept, else ``feature_dim``."""
        return self.head.dim if self.head is not None else self.feature_dim

    def without_head(self) -> ModelConfig:
        return replace(self, head=None)

    def untrained(self) -> ModelConfig:
        """The same network with random weights: ``meta`` keeps only what it is the
        architecture of, never the trained weights' metrics, epochs or licence.

        Example:
            >>> import mocohub
            >>> mocohub.load("moco_r18_fashion_mnist", pretrained=False).mocohub_config.meta
            {'name': 'moco_r18_fashion_mnist (random init)', 'random_init': True}
        """
        named = self.meta.get("name") or self.meta.get("hub_repo") or self.meta.get("source")
        meta: dict[str, Any] = {"random_init": True}
        if named:
            meta = {"name": f"{named} (random init)", **meta}
        return replace(self, meta=meta)

    def network(self) -> dict[str, Any]:
        """The fields that decide the network's modules and weights: all but preprocessing and meta
        (and, of the shape options, those of the architecture's family only).

        Two configs whose ``network()`` is equal load each other's state dicts.

        Example:
            >>> ModelConfig("resnet18", width=16).network()
            {'arch': 'resnet18', 'small_stem': False, 'in_channels': 3, 'width': 16, 'head': None}
            >>> ModelConfig("vit_small").network()  # doctest: +NORMALIZE_WHITESPACE
            {'arch': 'vit_small', 'in_channels': 3, 'head': None, 'image_size': 224,
             'patch_size': 16}
        """
        feeding = ("preprocessing", "meta")
        other = ("small_stem", "width") if self.is_vit else ("image_size", "patch_size")
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in feeding and f.name not in other
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready ``config.json`` content."""
        from mocohub import __version__

        shape: dict[str, Any] = (
            {"image_size": self.image_size, "patch_size": self.patch_size}
            if self.is_vit
            else {"small_stem": self.small_stem}
        )
        shape["in_channels"] = self.in_channels
        if not self.is_vit:
            shape["width"] = self.width
        return {
            "model_type": MODEL_TYPE,
            "mocohub_version": __version__,
            "arch": self.arch,
            **shape,
            "feature_dim": self.feature_dim,
            "embedding_dim": self.embedding_dim,
            "head": None if self.head is None else {"type": self.head.type, "dim": self.head.dim},
            "preprocessing": self.preprocessing.to_dict(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Read a ``config.json`` dict (unknown keys are ignored; derived ones are checked)."""
        if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise InputError(
                f"config.json has model_type {data.get('model_type')!r}, not {MODEL_TYPE!r}; "
                "it does not describe a mocohub model."
            )
        try:
            head = data.get("head")
            image_size, patch_size = data.get("image_size"), data.get("patch_size")
            config = cls(
                arch=str(data["arch"]),
                small_stem=bool(data.get("small_stem", False)),
                in_channels=int(data.get("in_channels", 3)),
                width=int(data.get("width", 64)),
                head=None if head is None else HeadConfig(str(head["type"]), int(head["dim"])),
                preprocessing=Preprocessing.from_dict(data["preprocessing"]),
                meta=dict(data.get("meta") or {}),
                image_size=None if image_size is None else int(image_size),
                patch_size=None if patch_size is None else int(patch_size),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"Malformed mocohub config ({type(e).__name__}: {e}); it needs at least "
                "arch and preprocessing."
            ) from e
        stated = data.get("feature_dim")
        if stated is not None and int(stated) != config.feature_dim:
            shape = "" if config.is_vit else f" at width {config.width}"
            raise InputError(
                f"config.json says feature_dim {stated} but {config.arch}{shape} has "
                f"{config.feature_dim}; the file is inconsistent."
            )
        return config
