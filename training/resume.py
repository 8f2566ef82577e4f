"""What a resumed run may change: its settings against those its checkpoint holds.

``mocohub train --resume auto`` starts from the run's own ``config.json``
(:func:`run_settings`), so no flag needs repeating, and
:func:`check_resume_settings` refuses a flag that would change what the run
computes (a branch, ``--resume CHECKPOINT --restart``, may, and is told so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mocohub.errors import ConfigError

from .config import TrainConfig

__all__ = ["RESUME_MAY_CHANGE", "check_resume_settings", "run_settings"]


#: Settings a resumed run may change: how it runs, not what it computes, and
#: ``epochs`` (to train longer). Anything else would not continue the same run.
RESUME_MAY_CHANGE = frozenset(
    {
        "preset",  # a name: its values are compared one by one
        "epochs",
        "workers",
        "precision",
        "compile",
        "channels_last",
        "checkpoint_every",
        "knn_every",
        "knn_k",
        "knn_t",
        "knn_train",
        "knn_val",
    }
)
_FLAGS = {"K": "--queue-size", "m": "--moco-m", "T": "--temperature"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def check_resume_settings(
    saved: Any, config: TrainConfig, source: Any, *, same_run: bool = True
) -> list[str]:
    """Refuse to resume the run whose checkpoint holds ``saved`` settings with other ones.

    With ``same_run`` (a run continued in its own folder), raises
    :class:`ConfigError` naming each setting outside :data:`RESUME_MAY_CHANGE`
    that differs (the run's value and the new one); otherwise (a branch:
    ``--restart``, or another run's checkpoint) such changes are only named.
    Returns notes on the changes that alter the run's course (a longer
    schedule). ``saved`` that is not a mapping (a reference checkpoint) is not
    checked.

    Example:
        >>> check_resume_settings(run.to_dict(), replace(run, lr=0.6), "runs/a")
        Traceback (most recent call last):
        mocohub.errors.ConfigError: Cannot resume runs/a with other settings: --lr 0.6 ...
    """
    if not isinstance(saved, dict):
        return []
    old = json.loads(json.dumps(saved))
    new = json.loads(json.dumps(config.to_dict()))
    changed = [
        f"{_flag(k)} {new[k]} (the run's: {old[k]})"
        for k in sorted(old)
        if k in new and k not in RESUME_MAY_CHANGE and old[k] != new[k]
    ]
    notes = []
    if changed and not same_run:
        notes.append(f"continuing from {source} with other settings: {', '.join(changed)}.")
    elif changed:
        raise ConfigError(
            f"Cannot resume {source} with other settings: {', '.join(changed)}. A resumed run "
            "continues as it was: leave these flags (and --preset) out (--resume auto takes "
            "the rest from the run's config.json), or start a new run (another --out, or "
            "--restart). Only "
            "--epochs, --workers, --precision, --compile, --channels-last, --checkpoint-every "
            "and the k-NN monitor's settings may change."
        )
    if old.get("epochs") != new["epochs"] and new["schedule"] == "cosine":
        notes.append(
            f"--epochs {new['epochs']} (the run's: {old.get('epochs')}): the cosine learning-rate "
            f"schedule now spans {new['epochs']} epochs, so the rate goes back up from where it "
            "had decayed."
        )
    return notes


def run_settings(run_dir: Path) -> dict[str, Any] | None:
    """The settings in ``run_dir/config.json`` (None: no such readable file of this mocohub's).

    ``--resume auto`` builds on them, so a resumed run needs no flag again.
    """
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        TrainConfig.from_dict(saved)
    except (OSError, ValueError, TypeError, ConfigError):
        return None
    return saved if isinstance(saved, dict) else None
