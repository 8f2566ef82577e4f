"""The settings of a linear evaluation (``mocohub lincls``), its schedule and its saved state.

:class:`LinclsConfig` holds the settings (the reference ``main_lincls.py``
protocol by default) and :func:`lr_at` their per-epoch learning rate; an
evaluation writes its results and, after every epoch, a state to resume from
into its output folder under the names below, and :func:`resumable_state`
decides whether a saved state may be continued with the given settings.
:mod:`~mocohub.training.lincls` runs the protocol.

Example:
    >>> protocol_name(LinclsConfig(preset="small"))
    'small'
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mocohub.errors import ConfigError, InputError

from .eval_data import autocast_dtype, default_workers
from .eval_transforms import Recipe
from .schedule import Schedule, epoch_lr

__all__ = [
    "EPOCHS_NAME",
    "HEAD_NAME",
    "PROTOCOLS",
    "RESULT_NAME",
    "STATE_NAME",
    "LinclsConfig",
    "epoch_line",
    "lr_at",
    "protocol_changes",
    "protocol_config",
    "protocol_name",
    "resumable_state",
]

RESULT_NAME = "lincls.json"
EPOCHS_NAME = "lincls_epochs.jsonl"
HEAD_NAME = "linear_head.pt"
STATE_NAME = "lincls_state.pt"
# Settings that change no result, so a run may resume with other values.
_FREE_SETTINGS = ("workers", "eval_every")


@dataclass
class LinclsConfig:
    """Settings of a linear evaluation; the defaults are the reference protocol.

    ``batch_size`` is global (over all processes); ``lr`` is used as given (the
    reference does not scale it with the batch size). ``image_size`` overrides
    the backbone's crop size. ``eval_every``: epochs between validations (the
    last epoch is always validated).

    Example:
        >>> LinclsConfig(epochs=10, lr_steps=(6, 8)).validate().lr
        30.0
    """

    preset: Recipe = "reference"
    epochs: int = 100
    batch_size: int = 256
    lr: float = 30.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Schedule = "steps"
    lr_steps: tuple[int, ...] = (60, 80)
    workers: int = dataclasses.field(default_factory=default_workers)
    seed: int = 0
    image_size: int | None = None
    cached_features: bool = False
    eval_every: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"

    def validate(self) -> LinclsConfig:
        """Raise :class:`ConfigError` for settings that cannot work."""
        if self.preset not in ("reference", "small"):
            raise ConfigError(f"Unknown preset {self.preset!r}; use reference or small.")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ConfigError("--epochs, --batch-size and --eval-every must be positive.")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("--lr must be positive, --weight-decay >= 0, momentum in [0, 1).")
        if self.schedule not in ("steps", "cosine"):
            raise ConfigError(f"Unknown schedule {self.schedule!r}; use steps or cosine.")
        if any(step < 1 for step in self.lr_steps) or self.workers < 0:
            raise ConfigError("--lr-steps must be positive epochs and --workers >= 0.")
        autocast_dtype(self.precision)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The optimisation settings of each linear-evaluation protocol. ``moco``: the MoCo
#: v1/v2 reference ``main_lincls.py`` (facebookresearch/moco), LinclsConfig's defaults.
#: ``moco_v3``: the MoCo v3 reference ``main_lincls.py`` (facebookresearch/moco-v3):
#: SGD momentum 0.9, batch 1024, lr 0.1 per 256 images (``init_lr = lr * batch / 256``),
#: a cosine over 90 epochs, no weight decay, frozen features, the same augmentation.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "moco": {
        "epochs": 100,
        "batch_size": 256,
        "lr": 30.0,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "schedule": "steps",
        "lr_steps": (60, 80),
    },
    "moco_v3": {
        "epochs": 90,
        "batch_size": 1024,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "schedule": "cosine",
        "lr_steps": (60, 80),
    },
}
#: Protocols whose ``lr`` is per 256 images, scaled by the batch size.
_SCALED_LR = {"moco_v3"}


def protocol_config(protocol: str, **settings: Any) -> LinclsConfig:
    """A :class:`LinclsConfig` with ``protocol``'s settings (:data:`PROTOCOLS`), and
    ``settings`` (None values left out) over them. For ``moco_v3`` the lr, given
    or not, is per 256 images and scaled to the batch size, as the reference does.

    Example:
        >>> config = protocol_config("moco_v3")
        >>> config.epochs, config.batch_size, config.lr, config.schedule
        (90, 1024, 0.4, 'cosine')
        >>> protocol_config("moco_v3", batch_size=256, lr=0.2).lr
        0.2
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"Unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}.")
    values = {**PROTOCOLS[protocol], **{k: v for k, v in settings.items() if v is not None}}
    if protocol in _SCALED_LR:
        values["lr"] = values["lr"] * values["batch_size"] / 256
    return LinclsConfig(**values).validate()


def protocol_name(config: LinclsConfig) -> str:
    """The protocol a linear evaluation follows, as recorded and printed.

    ``"reference"`` (``main_lincls.py``'s augmentation) or ``"small"``
    (the small-image recipe), with ``"+cached-features"`` when the classifier
    trains on features of un-augmented images extracted once.

    Example:
        >>> protocol_name(LinclsConfig(preset="small", cached_features=True))
        'small+cached-features'
    """
    return config.preset + ("+cached-features" if config.cached_features else "")


def protocol_changes(protocol: str, config: LinclsConfig) -> list[str]:
    """The optimisation settings in which ``config`` departs from ``protocol``'s, as
    options (``--epochs`` apart, which a summary names anyway), so that a result
    is not reported as the protocol's when it is not.

    Example:
        >>> protocol_changes("moco", protocol_config("moco", lr=1.0, epochs=10))
        ['--lr 1']
        >>> protocol_changes("moco_v3", protocol_config("moco_v3", batch_size=256))
        ['--batch-size 256']
    """
    # moco_v3 scales the lr with the batch size: that is its rule, not a change of lr.
    base = protocol_config(protocol, batch_size=config.batch_size)
    wanted = {**PROTOCOLS[protocol], "lr": base.lr}
    changes = []
    for key, value in config.to_dict().items():
        if key == "epochs" or key not in wanted or value == wanted[key]:
            continue
        if key == "lr_steps" and config.schedule != "steps":
            continue
        if isinstance(value, tuple | list):
            shown = ",".join(map(str, value))
        else:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
        changes.append(f"--{key.replace('_', '-')} {shown}")
    return changes


def lr_at(config: LinclsConfig, epoch: int) -> float:
    """The reference's learning rate for ``epoch``: x0.1 at each milestone, or cosine.

    Example:
        >>> [round(lr_at(LinclsConfig(), e), 6) for e in (0, 59, 60, 80)]
        [30.0, 30.0, 3.0, 0.3]
    """
    return epoch_lr(
        config.lr,
        epoch,
        epochs=config.epochs,
        schedule=config.schedule,
        milestones=config.lr_steps,
    )


def resumable_state(
    out_dir: str | os.PathLike[str] | None,
    described: Any,
    config: LinclsConfig,
    weights: str | None = None,
) -> dict[str, Any] | None:
    """The saved state in ``out_dir`` to continue from, or None to start afresh.

    ``described`` is the model as :func:`~mocohub.training.eval_data.describe_model`
    records it, and ``weights`` a digest of its weights (a run folder that trained
    on names other weights). A state of another model, or with other settings than
    ``config`` (bar ``workers`` and ``eval_every``), or one that cannot be read,
    raises :class:`InputError`: the user chooses another folder or ``--restart``.

    Example:
        >>> resumable_state("runs/fmnist/lincls", "runs/fmnist", LinclsConfig()) is None
        True
    """
    if out_dir is None or not (Path(out_dir) / STATE_NAME).is_file():
        return None
    path = Path(out_dir) / STATE_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged state file: unpickling raises many types
        raise InputError(
            f"{path} cannot be read ({type(e).__name__}); delete it, or pass --restart, "
            "to start the evaluation afresh."
        ) from e

    def comparable(settings: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in settings.items() if k not in _FREE_SETTINGS}

    saved, wanted = comparable(state.get("config", {})), comparable(config.to_dict())
    differs = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    other_weights = weights is not None and state.get("weights_sha256", weights) != weights
    if state.get("model") != described or other_weights or differs:
        what = "with other settings (" + ", ".join(differs) + ")"
        if other_weights:
            what = f"of other weights ({described} has changed since, e.g. trained on)"
        if state.get("model") != described:
            what = "of another model"
        raise InputError(
            f"{out_dir} holds a linear evaluation {what}; "
            "use another --out, or pass --restart to discard it."
        )
    return state


def epoch_line(record: dict[str, Any], epochs: int, *, val_is_train: bool = False) -> str:
    """One epoch's record as the line ``mocohub lincls`` prints.

    Without a separate validation split the accuracy is measured on the (unaugmented)
    training images, and the line says so instead of calling it "val".

    Example:
        >>> epoch_line({"epoch": 1, "lr": 30.0, "loss": 2.3, "train_top1": 0.1,
        ...             "seconds": 4.0}, 100)
        'epoch 1/100  lr 30  loss 2.3000  train top-1 10.00%  (4.0 s)'
    """
    line = (
        f"epoch {record['epoch']}/{epochs}  lr {record['lr']:.4g}  loss {record['loss']:.4f}  "
        f"train top-1 {100 * record['train_top1']:.2f}%"
    )
    if "val_top1" in record:
        measured = "  eval on train images: top-1" if val_is_train else "  val top-1"
        line += f"{measured} {100 * record['val_top1']:.2f}%  top-5 {100 * record['val_top5']:.2f}%"
    return line + f"  ({record['seconds']:.1f} s)"
