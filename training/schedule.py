"""The learning-rate schedules: the reference MoCo code's per epoch, Detectron's per iteration.

Both ``main_moco.py`` and ``main_lincls.py`` set the learning rate once per
epoch: half a cosine from ``base_lr`` to 0 over the run (``--cos``), or x0.1
at each milestone epoch (``--schedule``). MoCo v3's ``main_moco.py`` sets both
the learning rate (a linear warm-up, then half a cosine) and the momentum
encoder's momentum (raised to 1 by half a cosine, ``--moco-m-cos``) at every
step, from the fractional epoch ``epoch + step / steps_per_epoch``.

Example:
    >>> [round(epoch_lr(30.0, e, epochs=100, schedule="steps", milestones=(60, 80)), 6)
    ...  for e in (0, 60, 80)]
    [30.0, 3.0, 0.3]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

__all__ = [
    "Schedule",
    "cosine_momentum",
    "epoch_lr",
    "iteration_lr",
    "late_milestones_note",
    "warmup_cosine_lr",
]

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


def late_milestones_note(schedule: str, milestones: Iterable[int], epochs: int) -> str | None:
    """What to tell a user whose step schedule drops the rate at or after the run's end.

    A milestone is an epoch index (0-based), so one at ``epochs`` or later never
    takes effect: the reference's (120, 160), sized for 200 epochs, leave a
    100-epoch run at a constant rate. None when every milestone falls inside the
    run, or the schedule is cosine.

    Example:
        >>> print(late_milestones_note("steps", (120, 160), epochs=100))
        the learning rate would drop at epochs 120, 160, after the run's 100 epochs: it
        never does (set --lr-steps for a shorter run).
    """
    late = [int(m) for m in milestones if m >= epochs]
    if schedule != "steps" or not late:
        return None
    which = "epoch" if len(late) == 1 else "epochs"
    run = f"{epochs} epoch" + ("" if epochs == 1 else "s")
    return (
        f"the learning rate would drop at {which} {', '.join(map(str, late))}, after the "
        f"run's {run}: it never does (set --lr-steps for a shorter run)."
    )


def iteration_lr(
    base_lr: float,
    iteration: int,
    *,
    total: int,
    warmup_iters: int,
    warmup_factor: float = 0.001,
    steps: Iterable[float] = (2 / 3, 8 / 9),
) -> float:
    """Detectron's per-iteration learning rate, for detection fine-tuning.

    A linear warm-up from ``base_lr * warmup_factor`` to ``base_lr`` over the
    first ``warmup_iters`` iterations (at most the run's), then x0.1 at each
    fraction ``steps`` of the ``total`` iterations (a "1x" schedule: 60k and
    80k of 90k).

    Example:
        >>> [round(iteration_lr(0.02, i, total=900, warmup_iters=100), 5) for i in (0, 50, 700)]
        [2e-05, 0.01001, 0.002]
    """
    warmup = min(warmup_iters, total)
    factor = 1.0
    if iteration < warmup:
        alpha = iteration / warmup
        factor = warmup_factor * (1 - alpha) + alpha
    drops = sum(iteration >= int(fraction * total) for fraction in steps)
    return base_lr * factor * 0.1**drops


def warmup_cosine_lr(base_lr: float, epoch: float, *, epochs: int, warmup_epochs: int) -> float:
    """MoCo v3's learning rate at the fractional ``epoch`` (``epoch + step / steps_per_epoch``).

    A linear warm-up from 0 over ``warmup_epochs``, then half a cosine from
    ``base_lr`` to 0 at ``epochs`` (the reference ``main_moco.py``,
    ``adjust_learning_rate``). ``base_lr`` is already scaled by batch / 256.

    Example:
        >>> [warmup_cosine_lr(1.0, e, epochs=100, warmup_epochs=10) for e in (0, 5, 10, 55, 100)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_momentum(base_momentum: float, epoch: float, *, epochs: int) -> float:
    """MoCo v3's momentum at the fractional ``epoch``: from ``base_momentum`` to 1 by half a cosine.

    ``m = 1 - (1 - m0) * (cos(pi * epoch / epochs) + 1) / 2`` (the reference
    ``main_moco.py``, ``adjust_moco_momentum``, used with ``--moco-m-cos``).

    Example:
        >>> [round(cosine_momentum(0.99, e, epochs=100), 6) for e in (0, 50, 100)]
        [0.99, 0.995, 1.0]
    """
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base_momentum)
