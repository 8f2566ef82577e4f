"""The run folder of ``mocohub train --out RUN``: what it holds, and who may write there.

A run folder holds one run: ``config.json``, ``metrics.jsonl`` (with
``curves.png`` and ``tensorboard/``) and checkpoints. Other files in it are
the user's and are never touched. :func:`check_start` says whether a new
start may use the folder, so that re-running a command never silently
destroys an earlier run:

- an empty or missing folder takes any start;
- a folder that holds a run takes ``resume="auto"`` (continue it), or a
  checkpoint of its own with no checkpoint after it; anything else is
  refused, with one line naming ``--resume auto`` and ``--restart``;
- ``restart=True`` discards what the start would otherwise conflict with:
  the whole earlier run, or, resuming from one of the folder's own
  checkpoints, the checkpoints after it.

:func:`claim_run_folder` runs that check on every rank of a distributed run
before any of them writes; :func:`open_run` then creates the folder and its
``config.json``; :class:`FailedStartCleanup` removes what a start wrote when
it fails before its first checkpoint, so that a failed start leaves no
half-made run behind.

Example:
    >>> discard = check_start(Path("runs/a"), resume=None, resume_point=None, restart=False)
    >>> discard_files(discard)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mocohub.errors import ConfigError

from .checkpoint import LAST_NAME, numbered_checkpoints
from .config import TrainConfig
from .distributed import DistributedEnv, any_rank
from .monitor import MetricsLog, truncate_metrics

__all__ = [
    "RUN_FILES",
    "FailedStartCleanup",
    "check_start",
    "claim_run_folder",
    "discard_files",
    "open_run",
    "run_contents",
]

#: What a run writes besides its checkpoints.
RUN_FILES = ("config.json", "metrics.jsonl", "curves.png", "tensorboard")


def run_contents(run_dir: Path) -> list[Path]:
    """The files of a run in ``run_dir``: its checkpoints, then :data:`RUN_FILES` present.

    Example:
        >>> [p.name for p in run_contents(Path("runs/a"))]
        ['checkpoint_0001_00000000.pt', 'checkpoint_last.pt', 'config.json', 'metrics.jsonl']
    """
    if not run_dir.is_dir():
        return []
    found = [path for _, path in numbered_checkpoints(run_dir)]
    # Hidden temporary files of an interrupted save belong to the run too.
    found += sorted(p for p in run_dir.glob(".checkpoint_*.tmp") if p.is_file())
    # Damaged checkpoints that a resume set aside (checkpoint.set_aside_damaged).
    found += sorted(p for p in run_dir.glob("checkpoint_*.pt.damaged") if p.is_file())
    found += [run_dir / name for name in (LAST_NAME, *RUN_FILES) if (run_dir / name).exists()]
    return found


def _names(paths: list[Path], most: int = 3) -> str:
    shown = ", ".join(p.name for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def check_start(
    run_dir: Path,
    *,
    resume: str | os.PathLike[str] | None,
    resume_point: tuple[int, int] | None,
    restart: bool,
) -> list[Path]:
    """The run files to discard before this start; raise :class:`ConfigError` if it is refused.

    Args:
        run_dir: the run folder.
        resume: ``"auto"``, the checkpoint the run continues from, or None.
        resume_point: that checkpoint's ``(epoch, step)`` (None when there is none).
        restart: the user allows discarding what conflicts with this start.

    Returns:
        Nothing unless ``restart`` is set: the whole earlier run, or the
        checkpoints after ``resume`` when it is one of the folder's own.

    Example:
        >>> check_start(Path("runs/a"), resume="auto", resume_point=(3, 0), restart=False)
        []
    """
    if restart and resume == "auto":
        raise ConfigError(
            "--restart discards the run in the folder and --resume auto continues it; "
            "pass only one of them."
        )
    held = run_contents(run_dir)
    if not held or resume == "auto":
        return []
    if resume is not None and resume_point is not None and _inside(Path(resume), run_dir):
        later = [path for point, path in numbered_checkpoints(run_dir) if point > resume_point]
        if not later:
            return []
        if not restart:
            raise ConfigError(
                f"{run_dir} has checkpoints after {Path(resume).name} ({_names(later)}); "
                "resuming from it would discard them: add --restart to discard them, or "
                "continue from the newest with --resume auto."
            )
        last = run_dir / LAST_NAME
        stale_last = [last] if last.exists() and not last.samefile(resume) else []
        return later + stale_last
    if not restart:
        start = f"again from {resume}" if resume is not None else "again"
        raise ConfigError(
            f"{run_dir} already holds a run ({_names(held)}); add --resume auto to continue "
            f"it, or --restart to delete it and start {start}."
        )
    return held


def claim_run_folder(
    run_dir: Path,
    env: DistributedEnv,
    resume: str | Path | None,
    source: str | Path | None,
    point: tuple[int, int] | None,
    restart: bool,
) -> list[Path]:
    """:func:`check_start` on every rank of a run, before any rank writes.

    The all-reduce is the barrier, and all ranks refuse together, so no rank
    is left waiting for the others. ``source`` is the checkpoint that
    ``resume`` found (or names) and ``point`` its ``(epoch, step)``.

    Example:
        >>> discard = claim_run_folder(Path("runs/a"), env, "auto", latest, (3, 0), False)
    """
    refusal: ConfigError | None = None
    discard: list[Path] = []
    try:
        wanted = "auto" if resume == "auto" else source
        discard = check_start(run_dir, resume=wanted, resume_point=point, restart=restart)
    except ConfigError as error:
        refusal = error
    if any_rank(refusal is not None, env.device):
        raise refusal or ConfigError(
            f"Another process refused to start in {run_dir}; its message says why."
        )
    return discard


@contextlib.contextmanager
def open_run(
    run_dir: Path,
    config: TrainConfig,
    env: DistributedEnv,
    resume_point: tuple[int, int] | None = None,
) -> Iterator[MetricsLog]:
    """Rank 0 creates the run folder and writes config.json; yields the metrics log.

    Resuming from the checkpoint at ``resume_point`` (``(epoch, step)``), the
    log's records written after that checkpoint are dropped first
    (:func:`~mocohub.training.monitor.truncate_metrics`), since the resumed
    run writes them again.

    Example:
        >>> with open_run(Path("runs/a"), config, env, resume_point=(1, 0)) as log:
        ...     log.write({"epoch": 2, "step": 10, "loss": 7.2})
    """
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.json")
        if resume_point is not None:
            truncate_metrics(run_dir / "metrics.jsonl", resume_point)
    with contextlib.closing(MetricsLog(run_dir, enabled=env.is_main)) as log:
        yield log


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().parent == folder.resolve()
    except OSError:
        return False


def discard_files(paths: list[Path]) -> None:
    """Delete run files and folders (``tensorboard/``) that :func:`check_start` listed."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class FailedStartCleanup:
    """Remove what a start wrote if it fails before its first checkpoint.

    Only for a start in a folder that held no run (so nothing of anyone
    else's is touched): on an exception before :meth:`checkpoint_saved`, the
    run files are deleted, and the folder too if this start created it and
    it is left empty. Use it on the process that writes (rank 0).

    Example:
        >>> with FailedStartCleanup(Path("runs/a"), enabled=True) as cleanup:
        ...     run_dir.mkdir(parents=True, exist_ok=True)
        ...     cleanup.checkpoint_saved()
    """

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.run_dir = run_dir
        self.enabled = enabled and not run_contents(run_dir)
        self.created = not run_dir.exists()

    def checkpoint_saved(self) -> None:
        """The run has a checkpoint: from now on its folder is kept whatever happens."""
        self.enabled = False

    def __enter__(self) -> FailedStartCleanup:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None or not self.enabled:
            return
        discard_files(run_contents(self.run_dir))
        if self.created and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()
