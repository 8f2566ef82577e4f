"""Training configuration: the reference recipes as presets, every value overridable.

A run's configuration is a :class:`TrainConfig`, plain values only, saved as
``config.json`` in the run folder. Presets reproduce the reference recipes:

- ``moco_v1``: ResNet-50, SGD lr 0.03 for batch 256, momentum 0.9, wd 1e-4,
  200 epochs, lr x0.1 at epochs 120 and 160, K=65536, m=0.999, T=0.07, dim 128,
  v1 augmentation (He et al. 2020; facebookresearch/moco ``main_moco.py``).
- ``moco_v2`` (default): v1 plus the MLP head, T=0.2, a cosine schedule and the
  v2 ("aug+") augmentation (Chen et al. 2020).
- ``cifar`` / ``fashion_mnist``: the reference single-GPU CIFAR-10 demo's
  recipe: ResNet-18 with the small stem, K=4096, m=0.99, T=0.1, lr 0.06 for
  batch 512, wd 5e-4, cosine, 200 epochs, split BN (8 splits) in one process.

The learning rate follows the linear scaling rule: ``lr`` is for a global batch
of ``lr_batch``, and the optimiser uses ``lr * batch_size / lr_batch``.

Example:
    >>> config = preset("moco_v2", batch_size=512)
    >>> config.T, config.mlp, config.scaled_lr()
    (0.2, True, 0.06)
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mocohub.errors import ConfigError
from mocohub.preprocessing import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PRESETS", "TrainConfig", "preset"]


@dataclass
class TrainConfig:
    """Every setting of a MoCo pre-training run (see the module docstring)."""

    preset: str = "moco_v2"
    # model
    arch: str = "resnet50"
    small_stem: bool = False
    width: int = 64
    dim: int = 128
    K: int = 65536
    m: float = 0.999
    T: float = 0.2
    mlp: bool = True
    symmetric: bool = False
    bn_splits: int = 1  # > 1: split BN, used only when running in one process
    # data and augmentation
    augmentation: Literal["v1", "v2", "small"] = "v2"
    crop_min: float | None = None  # smallest crop scale; None: the recipe's (0.2)
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    augment_on: Literal["auto", "workers", "device"] = "auto"
    # optimisation
    epochs: int = 200
    batch_size: int = 256  # global, over all processes
    lr: float = 0.03
    lr_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "steps"] = "cosine"
    lr_steps: tuple[int, ...] = (120, 160)
    # run
    workers: int = 4
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    channels_last: Literal["auto", "on", "off"] = "auto"
    knn_every: int = 0  # epochs between k-NN checks (0: only at the end)
    knn_k: int = 200
    knn_t: float = 0.1
    # Mid-epoch checkpoints: every N optimizer steps (500 or "500") or every N
    # minutes ("30m"); 0 for checkpoints at epoch ends only.
    checkpoint_every: int | str = 0

    def scaled_lr(self) -> float:
        """The optimiser's learning rate for this batch size (linear scaling)."""
        return self.lr * self.batch_size / self.lr_batch

    def checkpoint_interval(self) -> tuple[int, float]:
        """``checkpoint_every`` as ``(steps, seconds)``, one of them 0 (both 0: off).

        Example:
            >>> TrainConfig(checkpoint_every="30m").checkpoint_interval()
            (0, 1800.0)
        """
        value = str(self.checkpoint_every).strip().lower()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(m|min)?", value)
        if match is None or (match[2] is None and "." in match[1]):
            raise ConfigError(
                f"--checkpoint-every {self.checkpoint_every!r} is neither a number of steps "
                "(500) nor of minutes (30m); pass one of those, or 0 for epoch ends only."
            )
        if match[2] is None:
            return int(match[1]), 0.0
        return 0, float(match[1]) * 60.0

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` for settings that cannot work together."""
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("--batch-size and --epochs must be positive.")
        # Each step enqueues the global batch's keys, both views' with --symmetric.
        keys_per_step = self.batch_size * (2 if self.symmetric else 1)
        if self.K % keys_per_step:
            what = "twice the global batch size" if self.symmetric else "the global batch size"
            raise ConfigError(
                f"The queue size K={self.K} must be a multiple of {what}, {keys_per_step} "
                "keys enqueued per step; change --batch-size or --queue-size."
            )
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("--lr must be positive and --weight-decay not negative.")
        if self.crop_min is not None and not 0.0 < self.crop_min <= 1.0:
            raise ConfigError(f"--crop-min must be in (0, 1], got {self.crop_min}.")
        if len(self.mean) != len(self.std):
            raise ConfigError("mean and std must have one value per image channel.")
        self.checkpoint_interval()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"Unknown configuration keys: {', '.join(sorted(unknown))}.")
        values = dict(values)
        for name in ("mean", "std", "lr_steps"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def save(self, path: Path) -> None:
        """Write the settings as JSON to ``path`` (atomically: never half a file)."""
        from mocohub.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


_V1: dict[str, Any] = {
    "arch": "resnet50",
    "dim": 128,
    "K": 65536,
    "m": 0.999,
    "T": 0.07,
    "mlp": False,
    "augmentation": "v1",
    "image_size": 224,
    "epochs": 200,
    "batch_size": 256,
    "lr": 0.03,
    "lr_batch": 256,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "schedule": "steps",
    "lr_steps": (120, 160),
}
_SMALL: dict[str, Any] = {
    "arch": "resnet18",
    "small_stem": True,
    "dim": 128,
    "K": 4096,
    "m": 0.99,
    "T": 0.1,
    "mlp": False,
    "bn_splits": 8,
    "augmentation": "small",
    "epochs": 200,
    "batch_size": 512,
    "lr": 0.06,
    "lr_batch": 512,
    "weight_decay": 5e-4,
    "schedule": "cosine",
}

PRESETS: dict[str, dict[str, Any]] = {
    "moco_v1": _V1,
    "moco_v2": {**_V1, "mlp": True, "T": 0.2, "augmentation": "v2", "schedule": "cosine"},
    "cifar": {
        **_SMALL,
        "image_size": 32,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "fashion_mnist": {**_SMALL, "image_size": 28, "mean": (0.2860,), "std": (0.3530,)},
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The configuration of preset ``name`` with ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig.from_dict({**values, "preset": name}).validate()
