"""A MoCo model's description (``config.json``) and its published artifact folder.

A :class:`ModelConfig` says everything needed to rebuild a backbone and feed
it: architecture and shape options, the projection head (if kept), the
:class:`~mocohub.preprocessing.Preprocessing`, and free-form ``meta`` (source,
paper, epochs, metrics, licence). :func:`build_model` turns it into a
:class:`~mocohub.backbones.ResNet` whose ``fc`` is ``nn.Identity()`` (pooled
features) or the projection head, or a :class:`~mocohub.vit.ViT` (MoCo v3's
``vit_*`` architectures) without a head, whose output is its class token; the
config is attached as ``model.mocohub_config``.

``config.json`` of a ResNet is what it has always been; a ViT's also states
``image_size`` and ``patch_size`` (a ViT takes one input size only) and leaves
out the ResNet-only ``small_stem`` and ``width``. A config without those keys
(written before ViTs) reads as it did.

A published artifact folder holds ``model.safetensors`` (the backbone's state
dict, plus ``fc.*`` when the head is kept) and ``config.json``
(:meth:`ModelConfig.to_dict`); :func:`save_pretrained` writes one atomically and
:func:`load_pretrained` reads one. An export folder also holds ``verify.json``
(and ONNX graphs) naming the SHA-256 of its ``model.safetensors``;
:func:`load_pretrained` refuses weights that are not the ones named there
(:class:`ArtifactMismatchError`).

Example:
    >>> cfg = ModelConfig("resnet18", small_stem=True, in_channels=1, width=32,
    ...                   preprocessing=Preprocessing(28, 32, (0.286,), (0.353,), channels=1))
    >>> model = build_model(cfg)
    >>> save_pretrained(model, "out/fmnist")
    >>> load_pretrained("out/fmnist").mocohub_config.feature_dim
    256
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from torch import nn

from mocohub.backbones import ARCHITECTURES, ResNet, build_backbone, feature_dim
from mocohub.errors import ConfigError, InputError, MissingHeadError
from mocohub.preprocessing import Preprocessing
from mocohub.publish import file_sha256

if TYPE_CHECKING:
    from mocohub.vit import ViT

#: what :func:`build_model` returns: a ResNet, or a ViT for the ``vit_*`` architectures
Backbone: TypeAlias = "ResNet | ViT"

__all__ = [
    "CONFIG_NAME",
    "VERIFY_NAME",
    "VIT_SHAPES",
    "WEIGHTS_DIGEST_KEY",
    "WEIGHTS_NAME",
    "ArtifactMismatchError",
    "Backbone",
    "HeadConfig",
    "ModelConfig",
    "build_head",
    "build_model",
    "check_weights_digest",
    "get_config",
    "load_pretrained",
    "read_config",
    "read_verify_record",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: ``mocohub export``'s parity checks, beside the weights
VERIFY_NAME = "verify.json"
#: the key under which an export records the SHA-256 of its ``model.safetensors``
#: (in each ONNX graph's ``metadata_props`` and in ``verify.json``)
WEIGHTS_DIGEST_KEY = "weights_sha256"
MODEL_TYPE = "mocohub"

#: each ViT's (width, default patch size, default image size, default channels), as the
#: builders of :mod:`mocohub.vit` make them (known here without importing timm; a test
#: checks that the two agree)
VIT_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "vit_small": (384, 16, 224, 3),
    "vit_base": (768, 16, 224, 3),
    "vit_mini": (192, 4, 28, 1),
    "vit_nano": (32, 4, 16, 1),
}


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


def build_head(head: HeadConfig, feature_dim: int) -> nn.Module:
    """The projection head module for ``feature_dim`` backbone features."""
    if head.type == "linear":
        return nn.Linear(feature_dim, head.dim)
    return nn.Sequential(
        nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, head.dim)
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
        if self.arch not in ARCHITECTURES and self.arch not in VIT_SHAPES:
            known = [*ARCHITECTURES, *VIT_SHAPES]
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


def build_model(config: ModelConfig) -> Backbone:
    """A randomly initialised backbone for ``config``, in eval mode, config attached.

    A ResNet's ``fc`` is ``nn.Identity()`` when ``config.head`` is None, else the
    head. A ViT (imported only here, as it needs timm) has no head
    (``num_classes=0``): it returns its class token after the final norm; its
    patch projection is trainable (fine-tuning), its sin-cos position embedding fixed.

    Example:
        >>> build_model(ModelConfig("vit_small"))(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 384])
    """
    if config.is_vit:
        from mocohub.vit import build_vit

        vit = build_vit(
            config.arch,
            num_classes=0,
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_channels=config.in_channels,
            # trainable, as a loaded ResNet is: the frozen random projection is a
            # pre-training device (mocohub.training builds its ViTs with it frozen)
            frozen_patch_embed=False,
        )
        vit.mocohub_config = config
        return vit.eval()
    model = build_backbone(
        config.arch,
        num_classes=1,
        small_stem=config.small_stem,
        in_channels=config.in_channels,
        width=config.width,
    )
    fc = nn.Identity() if config.head is None else build_head(config.head, config.feature_dim)
    model.fc = fc  # type: ignore[assignment]
    model.mocohub_config = config
    return model.eval()


def get_config(model: nn.Module) -> ModelConfig:
    """The :class:`ModelConfig` attached to a model built by mocohub."""
    config = getattr(model, "mocohub_config", None)
    if not isinstance(config, ModelConfig):
        raise InputError(
            f"This {type(model).__name__} has no mocohub config; build it with "
            "mocohub.load(...) or mocohub.artifact.build_model(...)."
        )
    return config


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    config: ModelConfig | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``extra_files``, name -> text) atomically.

    The files are written into a temporary folder beside ``directory`` and
    moved into place one by one with :func:`os.replace`, so a reader never
    sees a half-written file. The safetensors header carries string metadata:
    ``format``, ``arch``, ``embedding_dim`` and ``mocohub_version``.
    """
    from safetensors.torch import save

    config = config or get_config(model)
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = config.to_dict()
    metadata = {
        "format": "pt",
        "arch": config.arch,
        "embedding_dim": str(config.embedding_dim),
        "mocohub_version": str(data["mocohub_version"]),
    }
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target))
    try:
        # Written by Python, not save_file (which creates files readable by their owner
        # only), so the umask decides who may read a published artifact.
        (staging / WEIGHTS_NAME).write_bytes(save(state, metadata=metadata))
        (staging / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        for item in staging.iterdir():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The :class:`ModelConfig` in ``directory/config.json``."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise InputError(
            f"{path} does not exist; a mocohub model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); the file is damaged.") from e
    if not isinstance(data, Mapping):
        raise InputError(f"{path} holds a {type(data).__name__}, not a JSON object.")
    return ModelConfig.from_dict(data)


class ArtifactMismatchError(InputError):
    """An artifact folder whose files were written by different exports."""


def check_weights_digest(folder: str | os.PathLike[str], recorded: str | None, source: str) -> None:
    """Refuse ``folder`` when its ``model.safetensors`` is not the one ``source`` records.

    ``recorded`` is the SHA-256 that ``source`` (an ONNX graph or ``verify.json``
    of the folder) names; None means ``source`` was written by a mocohub older
    than these hashes: it is loaded with a warning, as it cannot be checked.
    A folder without ``model.safetensors`` (an ONNX-only export) has nothing to check.

    Raises:
        ArtifactMismatchError: the weights are not the ones ``source`` was made from.

    Example:
        >>> check_weights_digest("out/fmnist", "3f5a...", "model.onnx")  # doctest: +SKIP
        Traceback (most recent call last):
        ArtifactMismatchError: The files in out/fmnist come from different exports: ...
    """
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        return
    if recorded is None:
        warnings.warn(
            f"{source} was written by an older mocohub and records no hash of "
            f"{weights.name}, so mocohub cannot check that the files of {folder} belong "
            "together; re-run `mocohub export` to record it.",
            UserWarning,
            stacklevel=3,
        )
        return
    actual = file_sha256(weights)
    if actual != recorded:
        raise ArtifactMismatchError(
            f"The files in {folder} come from different exports: {source} was made from "
            f"weights {recorded[:12]} but {weights.name} holds {actual[:12]}; "
            "re-run `mocohub export` into this folder."
        )


def read_verify_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The content of ``folder/verify.json`` (an export's checks), or None when it has none.

    Raises:
        ArtifactMismatchError: the file is damaged.

    Example:
        >>> read_verify_record("out/fmnist")["passed"]  # doctest: +SKIP
        True
    """
    record = Path(folder) / VERIFY_NAME
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactMismatchError(
            f"{record} is damaged ({e}); re-run `mocohub export` into this folder."
        ) from e
    if not isinstance(data, dict):
        raise ArtifactMismatchError(
            f"{record} holds a {type(data).__name__}, not an export's checks; re-run "
            "`mocohub export` into this folder."
        )
    return data


def load_pretrained(
    directory: str | os.PathLike[str],
    *,
    head: bool = False,
    weights_file: str | os.PathLike[str] | None = None,
) -> Backbone:
    """The model in an artifact folder (``config.json`` + ``model.safetensors``), in eval mode.

    ``head=False`` drops a stored projection head (``fc`` becomes Identity);
    ``head=True`` needs one. ``weights_file`` reads the weights from another
    path (the config still comes from ``directory``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_config(directory)
    own_weights = Path(directory) / WEIGHTS_NAME
    if weights_file is None or Path(weights_file).resolve() == own_weights.resolve():
        record = read_verify_record(directory)  # None: not an export (save_pretrained, Hub)
        if record is not None:
            recorded = record.get(WEIGHTS_DIGEST_KEY)
            source = str(Path(directory) / VERIFY_NAME)
            check_weights_digest(directory, None if recorded is None else str(recorded), source)
    if head and config.head is None:
        raise MissingHeadError(
            f"{directory} holds no projection head; load it with head=False "
            "(or convert the original checkpoint with its head kept)."
        )
    file = Path(weights_file) if weights_file is not None else Path(directory) / WEIGHTS_NAME
    try:
        state = load_file(str(file))
    except FileNotFoundError as e:
        raise InputError(f"{file} does not exist; the model folder is incomplete.") from e
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file} is not a readable safetensors file ({e}).") from e
    if not head:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        config = config.without_head()
    model = build_model(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = str(e).splitlines()[1:2] or [str(e)]
        raise InputError(
            f"The weights in {file} do not fit the model its config.json describes "
            f"({detail[0].strip()[:160]})."
        ) from e
    return model  # load_state_dict copies half-precision weights into float32 parameters
