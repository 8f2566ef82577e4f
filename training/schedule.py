"""The per-epoch learning-rate schedule of the reference MoCo code, pre-training and linear.

Both ``main_moco.py`` and ``main_lincls.py`` set the learning rate once per
epoch: half a cosine from ``base_lr`` to 0 over the run (``--cos``), or x0.1
at each milestone epoch (``--schedule``).

Example:
    >>> [round(epoch_lr(30.0, e, epochs=100, schedule="steps", milestones=(60, 80)), 6)
    ...  for e in (0, 60, 80)]
    [30.0, 3.0, 0.3]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

__all__ = ["Schedule", "epoch_lr"]

Schedule = Literal["steps", "cosine"]


def epoch_lr(
    base_lr: float, epoch: int, *, epochs: int, schedule: str, milestones: Iterable[int]
) -> float:
    """The learning rate of ``epoch`` (0-based): cosine, or x0.1 at each milestone reached.

    ``schedule`` is ``"cosine"`` or ``"steps"``; ``milestones`` are the epochs
    from which the rate is divided by 10 once more (ignored by cosine).

    Example:
        >>> epoch_lr(0.03, 100, epochs=200, schedule="cosine", milestones=())
        0.015
    """
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return base_lr * 0.1 ** sum(epoch >= milestone for milestone in milestones)
