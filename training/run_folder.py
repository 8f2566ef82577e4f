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
half-made run behind. :func:`prune_checkpoints` keeps the checkpoints a run
needs, and :func:`disk_errors` turns a full or read-only disk into one line.

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
from typing import Any

import torch

from mocohub.errors import ConfigError, InputError
from mocohub.fileio import disk_error

from .checkpoint import LAST_NAME, find_latest_checkpoint, load_checkpoint, numbered_checkpoints
from .distributed import DistributedEnv, all_gather_no_grad
from .monitor import MetricsLog, truncate_metrics
from .progress import RunSettings

__all__ = [
    "RUN_FILES",
    "FailedStartCleanup",
    "check_start",
    "claim_run_folder",
    "discard_files",
    "disk_errors",
    "load_weights",
    "open_run",
    "prune_checkpoints",
    "run_contents",
    "tensor_bytes",
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

    One all-gather is the barrier: all ranks refuse together, so no rank is
    left waiting for the others. ``source`` is the checkpoint that ``resume``
    found (or names) and ``point`` its ``(epoch, step)``; the ranks must have
    found the same one. Where they did not (``--resume auto`` on nodes that do
    not share the run folder's filesystem: only rank 0's node holds the
    checkpoints), every rank refuses with one line instead of running
    different epochs and waiting on each other for ever.

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
    mine = [int(refusal is not None), int(point is not None), *(point or (0, 0))]
    everyone = all_gather_no_grad(torch.tensor([mine], device=env.device)).tolist()
    if any(refused for refused, *_ in everyone):
        raise refusal or ConfigError(
            f"Another process refused to start in {run_dir}; its message says why."
        )
    found = [tuple(where) if has else None for _, has, *where in everyone]
    if len(set(found)) > 1:
        ranks: dict[tuple[int, ...] | None, list[int]] = {}
        for rank, where in enumerate(found):
            ranks.setdefault(where, []).append(rank)
        seen = "; ".join(
            ("rank " if len(r) == 1 else "ranks ")
            + ", ".join(map(str, r[:4]))
            + (" ..." if len(r) > 4 else "")
            + (f": epoch {where[0]} step {where[1]}" if where else ": none")
            for where, r in ranks.items()
        )
        raise ConfigError(
            f"The processes found different checkpoints to resume from in {run_dir} ({seen}): "
            "each node sees its own copy of the run folder. Put --out on a filesystem that "
            "every node shares, or copy the newest checkpoint into every node's run folder, "
            "or pass --resume with the path of the same checkpoint on every node."
        )
    return discard


@contextlib.contextmanager
def open_run(
    run_dir: Path,
    config: RunSettings,
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
    log = MetricsLog(run_dir, enabled=env.is_main)
    try:
        yield log
    except BaseException:
        # The error in flight says what went wrong; closing (say, flushing the log
        # onto the same full disk) must not replace it with a second traceback.
        with contextlib.suppress(OSError):
            log.close(quiet=True)
        raise
    log.close()


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


def prune_checkpoints(run_dir: Path, keep_epochs: int = 2) -> list[Path]:
    """Delete the checkpoints a run no longer needs; return them.

    Kept: the newest ``keep_epochs`` epoch-end checkpoints (step 0) and, when
    the newest checkpoint of all is a mid-epoch one (``--checkpoint-every``, or
    a stop signal), that one: at most one mid-epoch checkpoint, and only while
    no epoch-end checkpoint is newer.

    Example:
        >>> [p.name for p in prune_checkpoints(Path("runs/a"))]
        ['checkpoint_0001_00000000.pt', 'checkpoint_0002_00000500.pt']
    """
    found = numbered_checkpoints(run_dir)
    epoch_ends = [path for (_, step), path in found if step == 0]
    keep = set(epoch_ends[-keep_epochs:])
    if found and found[-1][0][1] != 0:
        keep.add(found[-1][1])
    stale = [path for _, path in found if path not in keep]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _os_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``: itself, or the one in its cause or context
    (``torch.save`` reports a failed write as a ``RuntimeError`` raised while
    handling the ``OSError``)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def tensor_bytes(state: object) -> int:
    """The bytes of the tensors in a (nested) checkpoint dict: about its size on disk.

    Example:
        >>> tensor_bytes({"model": {"w": torch.zeros(1000)}, "epoch": 3})
        4000
    """
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, list | tuple):
        return sum(tensor_bytes(value) for value in state)
    return 0


@contextlib.contextmanager
def disk_errors(run_dir: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a write into ``run_dir`` that failed for lack of space or of write access
    (:func:`mocohub.fileio.disk_error`) into one :class:`~mocohub.errors.InputError`
    line, even where ``torch.save`` wrapped it in a ``RuntimeError``.

    How much to free is ``needed`` bytes (a checkpoint's :func:`tensor_bytes`)
    or else the size of the run's newest checkpoint, when it has one.

    Example:
        >>> with disk_errors(Path("runs/a"), needed=tensor_bytes(state)):
        ...     save_checkpoint(Path("runs/a"), state, epoch=1, step=0)
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        cause = _os_error(error)
        if cause is None:
            raise
        if needed is None and run_dir.is_dir():
            found = numbered_checkpoints(run_dir)
            needed = found[-1][1].stat().st_size if found else None
        clear = disk_error(cause, run_dir / LAST_NAME, needed=needed)
        if clear is None:
            raise
        raise clear from error


def load_weights(source: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint to fine-tune from: a checkpoint file (mocohub's or the reference
    code's ``.pth.tar``) or a mocohub run folder (its newest checkpoint).

    Example:
        >>> load_encoders(model, load_weights("moco_v2_800ep_pretrain.pth.tar"))
    """
    path = Path(source)
    if not path.exists():
        raise InputError(
            f"No checkpoint at {path}: --weights takes a checkpoint file (a reference MoCo "
            ".pth.tar or a mocohub checkpoint) or a mocohub run folder, which hold both "
            "encoders; a registry name or an exported artifact holds a backbone only."
        )
    if path.is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise InputError(
                f"{path} holds no checkpoint; pass a checkpoint file (a reference MoCo "
                ".pth.tar or a mocohub checkpoint) or a mocohub run folder."
            )
        path = latest
    return load_checkpoint(path)
