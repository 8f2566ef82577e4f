"""Settings of a detection fine-tuning run (``mocohub finetune-det``), saved as ``config.json``.

The defaults are Detectron's COCO "1x" recipe, which the MoCo paper's
detection results use: SGD, lr 0.02 for a global batch of 16 (scaled
linearly to ``batch_size``), momentum 0.9, weight decay 1e-4, a linear
warm-up over 1000 iterations from 0.001 x lr, and x0.1 at 2/3 and 8/9 of the
run; 12 epochs (COCO's 90k iterations at batch 16). ``iters`` sets the length
in iterations instead.

Example:
    >>> config = DetConfig(model="fashion-mnist-moco", batch_size=8, iters=300)
    >>> config.scaled_lr(), config.total_iters(steps_per_epoch=50)
    (0.01, 300)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mocohub.errors import ConfigError

from .config import TrainConfig
from .schedule import iteration_lr

__all__ = ["DetConfig"]


@dataclass
class DetConfig:
    """Every setting of a detection fine-tuning run (see the module docstring).

    ``norm``, ``fpn_norm``, ``trainable_layers``, ``min_size``, ``max_size``
    and ``fpn_channels`` go to :func:`mocohub.detection.build_detector`
    ("default" and None take its defaults; ``fpn_norm="none"`` is its
    ``fpn_norm=None``). ``rois_per_image`` (torchvision's
    ``box_batch_size_per_image``, 512) and ``rpn_proposals`` (the proposals kept
    per image in training, ``rpn_post_nms_top_n_train``, 2000; twice as many
    before NMS) size the heads' work: COCO's values, several times what small
    images with a few objects need, and most of a CPU step.
    """

    model: str
    kind: Literal["mask_rcnn", "faster_rcnn"] = "mask_rcnn"
    norm: str = "default"  # "default": build_detector's choice
    fpn_norm: str = "default"  # "none": no norm in the FPN and heads
    trainable_layers: int | None = None
    min_size: int | None = None
    max_size: int | None = None
    fpn_channels: int | None = None
    rois_per_image: int | None = None
    rpn_proposals: int | None = None
    pretrained: bool = True  # False: the same network at random initialisation
    # optimisation
    epochs: int = 12
    iters: int = 0  # > 0: the run's length in iterations, instead of epochs
    batch_size: int = 16  # global, over all processes
    lr: float = 0.02
    lr_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_steps: tuple[float, ...] = (2 / 3, 8 / 9)  # fractions of the run
    # run
    workers: int = 2
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_every: int = 1  # epochs between evaluations (0: at the end only)
    checkpoint_every: int | str = 0

    def scaled_lr(self) -> float:
        """The optimiser's base learning rate for this batch size (linear scaling)."""
        return self.lr * self.batch_size / self.lr_batch

    def total_iters(self, steps_per_epoch: int) -> int:
        """The run's length in optimizer steps."""
        return self.iters if self.iters > 0 else self.epochs * steps_per_epoch

    def run_epochs(self, steps_per_epoch: int) -> int:
        """Epochs the run touches (the last one partly, when ``iters`` ends inside it)."""
        return math.ceil(self.total_iters(steps_per_epoch) / steps_per_epoch)

    def lr_at(self, iteration: int, total: int) -> float:
        """The learning rate of ``iteration`` (0-based) of a ``total``-step run."""
        return iteration_lr(
            self.scaled_lr(),
            iteration,
            total=total,
            warmup_iters=self.warmup_iters,
            warmup_factor=self.warmup_factor,
            steps=self.lr_steps,
        )

    def checkpoint_interval(self) -> tuple[int, float]:
        """``checkpoint_every`` as ``(steps, seconds)``, parsed as ``mocohub train`` does."""
        return TrainConfig(checkpoint_every=self.checkpoint_every).checkpoint_interval()

    def validate(self) -> DetConfig:
        """Raise :class:`ConfigError` for settings that cannot work."""
        if self.kind not in ("mask_rcnn", "faster_rcnn"):
            raise ConfigError(f"Unknown detector kind {self.kind!r}; use mask_rcnn or faster_rcnn.")
        if self.batch_size < 1 or self.epochs < 1 or self.iters < 0:
            raise ConfigError("--batch-size and --epochs must be positive, --iters not negative.")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_iters < 0:
            raise ConfigError(
                "--lr must be positive, --weight-decay and --warmup-iters not negative."
            )
        if self.eval_every < 0:
            raise ConfigError("--eval-every must not be negative (0: evaluate at the end only).")
        self.checkpoint_interval()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetConfig:
        """The settings a ``config.json`` holds; unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown or "model" not in values:
            what = f"unknown keys {', '.join(sorted(unknown))}" if unknown else "no 'model'"
            raise ConfigError(
                f"This is not a detection run's configuration ({what}); pass the folder "
                "of a `mocohub finetune-det` run."
            )
        values = dict(values)
        if "lr_steps" in values:
            values["lr_steps"] = tuple(values["lr_steps"])
        return cls(**values)

    def save(self, path: Path) -> None:
        """Write the settings as JSON to ``path`` (atomically: never half a file)."""
        from mocohub.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
