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
- ``moco_v3_r50`` (and ``_300ep``, ``_1000ep``), ``moco_v3_vit_s``,
  ``moco_v3_vit_b``: MoCo v3 (``method="moco_v3"``: no queue, a predictor, the
  symmetrised loss; Chen, Xie, He 2021), with the values of the reference
  facebookresearch/moco-v3 ``main_moco.py`` defaults and its ``CONFIG.md``
  commands: batch 4096, lr per 256 images, a linear warm-up then a cosine
  (per step), the momentum raised from ``m`` to 1 by a half cosine
  (``--moco-m-cos``), projector/predictor MLPs 4096 wide with 256 outputs.
  ResNet-50: LARS lr 0.6 (0.3 for 300/1000 epochs), wd 1e-6 (1.5e-6 for 1000),
  m 0.99 (0.996 for 1000), T 1.0, 10 warm-up epochs, crop-min 0.2. ViT-S/B:
  AdamW lr 1.5e-4, wd 0.1, 40 warm-up epochs of 300, T 0.2, crop-min 0.08
  (the reference's default), frozen random patch embedding (``--stop-grad-conv1``).
- ``fashion_mnist_v3``: MoCo v3 for 28 px images on a CPU (not a reference
  recipe): the ``fashion_mnist`` backbone (ResNet-18, small stem), so that a
  comparison with v2 compares the methods, not the backbones; LARS lr 0.3 per
  256, wd 1e-6, T 0.2, m 0.99 with the cosine, 10 warm-up epochs of 200,
  batch 512, and the ``small_v3`` augmentation (``small`` plus v3's
  asymmetric solarize; no blur, which wipes out 28 px images).

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
    # "moco": v1/v2 (queue, training/moco.py); "moco_v3": no queue (training/moco_v3.py)
    method: Literal["moco", "moco_v3"] = "moco"
    mlp_dim: int = 4096  # MoCo v3: hidden width of the projector and predictor
    moco_m_cos: bool = False  # MoCo v3: raise m to 1 with a half cosine over the run
    # data and augmentation
    augmentation: Literal["v1", "v2", "small", "v3", "small_v3"] = "v2"
    crop_min: float | None = None  # smallest crop scale; None: the recipe's (0.2)
    solarize: float | None = None  # each view's solarize probability; None: the recipe's
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
    optimizer: Literal["sgd", "lars", "adamw"] = "sgd"  # MoCo v3: lars or adamw
    warmup_epochs: int = 0  # MoCo v3: linear warm-up, then the cosine
    # run
    workers: int = 4
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CPUs and GPUs
    knn_every: int = 0  # epochs between k-NN checks (0: only at the end)
    knn_k: int = 200
    knn_t: float = 0.1
    # The k-NN monitor's labelled data (absolute paths for folders): kept in
    # config.json so that --resume auto keeps the monitor. knn_train None: the
    # training data; knn_val None: no monitor.
    knn_train: str | None = None
    knn_val: str | None = None
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
        if self.method == "moco_v3":
            self._validate_v3()
        else:
            self._validate_moco()
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("--lr must be positive and --weight-decay not negative.")
        if self.crop_min is not None and not 0.0 < self.crop_min <= 1.0:
            raise ConfigError(f"--crop-min must be in (0, 1], got {self.crop_min}.")
        if self.solarize is not None and not 0.0 <= self.solarize <= 1.0:
            raise ConfigError(f"--solarize is a probability in [0, 1], got {self.solarize}.")
        if len(self.mean) != len(self.std):
            raise ConfigError("mean and std must have one value per image channel.")
        self.checkpoint_interval()
        return self

    def _validate_moco(self) -> None:
        """MoCo v1/v2: the queue, and none of v3's settings."""
        if self.method != "moco":
            raise ConfigError(f"Unknown method {self.method!r}; use moco or moco_v3.")
        v3_only = {
            "--arch " + self.arch: self.arch.startswith("vit_"),
            "--optimizer " + self.optimizer: self.optimizer != "sgd",
            "--warmup-epochs": self.warmup_epochs != 0,
            "--moco-m-cos": self.moco_m_cos,
            "--augmentation " + self.augmentation: self.augmentation in ("v3", "small_v3"),
        }
        used = [name for name, on in v3_only.items() if on]
        if used:
            raise ConfigError(
                f"{', '.join(used)} belong(s) to MoCo v3, but this run is MoCo v1/v2 (the "
                f"{self.preset} preset); use a moco_v3 preset (moco_v3_r50, moco_v3_vit_s, "
                "fashion_mnist_v3, ...) or leave them out."
            )
        # Each step enqueues the global batch's keys, both views' with --symmetric.
        keys_per_step = self.batch_size * (2 if self.symmetric else 1)
        if self.K % keys_per_step:
            what = "twice the global batch size" if self.symmetric else "the global batch size"
            raise ConfigError(
                f"The queue size K={self.K} must be a multiple of {what}, {keys_per_step} "
                "keys enqueued per step; change --batch-size or --queue-size."
            )

    def _validate_v3(self) -> None:
        """MoCo v3: settings of v1/v2 that have no meaning without a queue are refused,
        not silently ignored."""
        if self.K:
            raise ConfigError(
                f"MoCo v3 has no queue, so --queue-size {self.K} means nothing; leave it out "
                "(the moco_v3 presets set it to 0)."
            )
        if self.symmetric or not self.mlp:
            raise ConfigError(
                "MoCo v3's loss is always symmetric and it always has its MLPs; leave out "
                "--symmetric/--no-symmetric and --mlp/--no-mlp."
            )
        if self.bn_splits != 1:
            # v3 normalises over the global batch (SyncBatchNorm in the reference) and
            # has no shuffle BN to imitate; split BN would change its maths.
            raise ConfigError(
                f"--bn-splits {self.bn_splits} imitates v1/v2's shuffle BN, which MoCo v3 "
                "does not have (its BN spans the whole batch); leave it at 1."
            )
        if self.optimizer not in ("lars", "adamw"):
            raise ConfigError(
                f"MoCo v3 trains with --optimizer lars (ResNet) or adamw (ViT), not "
                f"{self.optimizer!r}."
            )
        if self.schedule != "cosine":
            raise ConfigError(
                "MoCo v3's learning rate is a warm-up then a cosine; --schedule steps is v1's."
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"--warmup-epochs ({self.warmup_epochs}) must be at least 0 and at most "
                f"--epochs ({self.epochs}); lower it for a short run."
            )
        if self.dim < 1 or self.mlp_dim < 1 or self.T <= 0 or not 0 <= self.m <= 1:
            raise ConfigError(
                "--dim and --mlp-dim must be positive, --temperature positive and --moco-m "
                "in [0, 1]."
            )
        if self.arch.startswith("vit_") and (self.small_stem or self.width != 64):
            raise ConfigError(
                "--small-stem and --width shape a ResNet; a ViT takes neither (its patch "
                "size and width come with --arch)."
            )
        if self.augmentation not in ("v3", "small_v3"):
            from .recipes import view_recipes

            view_recipes(self.augmentation)  # an unknown name fails here

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

# MoCo v3, reference facebookresearch/moco-v3: main_moco.py's defaults (lr 0.6, wd
# 1e-6, batch 4096, 100 epochs, 10 warm-up epochs, m 0.99, T 1.0, dim 256, mlp 4096,
# LARS) and CONFIG.md's commands (--moco-m-cos --crop-min=.2 for the ResNets).
_V3_R50: dict[str, Any] = {
    "method": "moco_v3",
    "arch": "resnet50",
    "dim": 256,
    "mlp_dim": 4096,
    "K": 0,
    "m": 0.99,
    "moco_m_cos": True,
    "T": 1.0,
    "mlp": True,
    "augmentation": "v3",
    "crop_min": 0.2,
    "image_size": 224,
    "epochs": 100,
    "warmup_epochs": 10,
    "batch_size": 4096,
    "lr": 0.6,
    "lr_batch": 256,
    "momentum": 0.9,
    "weight_decay": 1e-6,
    "optimizer": "lars",
    "schedule": "cosine",
}
# CONFIG.md, ViT-S and ViT-B: -a vit_small|vit_base --optimizer=adamw --lr=1.5e-4
# --weight-decay=.1 --epochs=300 --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos
# --moco-t=.2, default batch 4096 and crop-min 0.08.
_V3_VIT: dict[str, Any] = {
    **_V3_R50,
    "arch": "vit_small",
    "T": 0.2,
    "crop_min": 0.08,
    "epochs": 300,
    "warmup_epochs": 40,
    "lr": 1.5e-4,
    "weight_decay": 0.1,
    "optimizer": "adamw",
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
    "moco_v3_r50": _V3_R50,
    "moco_v3_r50_300ep": {**_V3_R50, "lr": 0.3, "epochs": 300},
    "moco_v3_r50_1000ep": {
        **_V3_R50,
        "lr": 0.3,
        "weight_decay": 1.5e-6,
        "epochs": 1000,
        "m": 0.996,
    },
    "moco_v3_vit_s": _V3_VIT,
    "moco_v3_vit_b": {**_V3_VIT, "arch": "vit_base"},
    # Not a reference recipe: see the module docstring.
    "fashion_mnist_v3": {
        **_V3_R50,
        "arch": "resnet18",
        "small_stem": True,
        "augmentation": "small_v3",
        "crop_min": None,
        "image_size": 28,
        "mean": (0.2860,),
        "std": (0.3530,),
        "T": 0.2,
        "epochs": 200,
        "batch_size": 512,
        "lr": 0.3,
    },
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The configuration of preset ``name`` with ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    values = dict(PRESETS[name])
    if str(given.get("arch", "")).startswith("vit_"):
        # A ResNet preset's stem and width shape its ResNet, not the ViT asked for.
        values.pop("small_stem", None)
        values.pop("width", None)
    values.update(given)
    return TrainConfig.from_dict({**values, "preset": name}).validate()
