"""A MoCo model built from its description (``config.json``), and its published artifact folder.

A :class:`ModelConfig` (defined in :mod:`mocohub.model_config`, which needs no
torch, and re-exported here) says everything needed to rebuild a backbone and
feed it: architecture and shape options, the projection head (if kept), the
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
    >>> from mocohub.preprocessing import Preprocessing
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from torch import nn

from mocohub.backbones import ResNet, build_backbone
from mocohub.errors import InputError, MissingHeadError
from mocohub.model_config import MODEL_TYPE, VIT_SHAPES, HeadConfig, ModelConfig
from mocohub.publish import file_sha256

if TYPE_CHECKING:
    from mocohub.vit import ViT

#: what :func:`build_model` returns: a ResNet, or a ViT for the ``vit_*`` architectures
Backbone: TypeAlias = "ResNet | ViT"

__all__ = [
    "CONFIG_NAME",
    "MODEL_TYPE",
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


def build_head(head: HeadConfig, feature_dim: int) -> nn.Module:
    """The projection head module for ``feature_dim`` backbone features."""
    if head.type == "linear":
        return nn.Linear(feature_dim, head.dim)
    return nn.Sequential(
        nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, head.dim)
    )


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
