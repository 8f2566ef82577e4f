"""Native training checkpoints: save, find, load and resume a MoCo run bit for bit.

A checkpoint is a plain dict saved with ``torch.save`` that loads with
``torch.load(..., weights_only=True)`` (tensors, numbers, strings, lists and
dicts only, so loading one never runs code from the file)::

    format            "mocohub.training-checkpoint"
    format_version    1
    mocohub_version   the mocohub that wrote it, e.g. "0.1.0"
    epoch             the epoch in progress: the first epoch to run on resume
    step              steps of that epoch already done: where to continue (0 at its start)
    model             MoCo's state_dict: encoder_q.*, encoder_k.*, queue, queue_ptr
    optimizer         optimizer.state_dict()
    scaler            GradScaler.state_dict(), or None
    scheduler         LR scheduler's state_dict(), or None
    rng               capture_rng_state(): Python, NumPy, torch CPU and CUDA
    shuffle_rng       MoCo's shuffle-BN generator state (uint8 tensor), or None
    config            the run's settings, a JSON-able dict

A run folder holds ``checkpoint_{epoch:04d}_{step:08d}.pt`` files (newest =
highest (epoch, step)) and ``checkpoint_last.pt``, a hard link to (or, where
links are not supported, a copy of) the newest, for a fixed name to resume
from. Every file is written to a hidden temporary file and renamed into place,
so a crash leaves either the old file or the new one, never half of one.
The temporary names carry the writer's pid (:func:`mocohub.fileio.temporary_name`):
:func:`remove_orphan_temporaries` deletes those whose writer is gone.

Bytes damaged after the write are caught on load: ``torch.load`` does not
check the zip archive's CRCs, so :func:`load_checkpoint` first runs
:func:`verify_checkpoint` (every entry's CRC, or a truncated archive), and
:func:`find_resumable_checkpoint` skips damaged checkpoints for the newest
intact one. ``checkpoint_last.pt`` shares its target's bytes, so it is
verified the same way.

The reference code's ``.pth.tar`` (facebookresearch/moco ``main_moco.py``) is
understood too: see :func:`is_reference_checkpoint`.

Example:
    >>> state = training_state(model, optimizer, None, None, epoch=3, step=1200, config={})
    >>> save_checkpoint("runs/a", state, epoch=3, step=1200)
    PosixPath('runs/a/checkpoint_0003_00001200.pt')
    >>> epoch, step = restore_training_state(
    ...     load_checkpoint(find_latest_checkpoint("runs/a")), model, optimizer
    ... )
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from mocohub import __version__
from mocohub.convert import is_reference_checkpoint, moco_state_from_reference, read_checkpoint
from mocohub.errors import ConfigError, InputError
from mocohub.fileio import atomic_writer, fsync_dir, temporary_name, temporary_owner

from .moco import MoCo

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LAST_NAME",
    "atomic_save",
    "capture_rng_state",
    "checkpoint_point",
    "find_latest_checkpoint",
    "find_resumable_checkpoint",
    "is_reference_checkpoint",
    "load_checkpoint",
    "moco_state_from_reference",
    "numbered_checkpoints",
    "remove_orphan_temporaries",
    "restore_rng_state",
    "restore_training_state",
    "save_checkpoint",
    "set_aside_damaged",
    "training_state",
    "verify_checkpoint",
]

FORMAT = "mocohub.training-checkpoint"
FORMAT_VERSION = 1
LAST_NAME = "checkpoint_last.pt"
_NAME = re.compile(r"checkpoint_(\d+)_(\d+)\.pt")  # temp files start with "." and end ".tmp"
_NATIVE_KEYS = {"epoch", "step", "model", "optimizer", "rng"}
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
DAMAGED_SUFFIX = ".damaged"


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` so that ``path`` is either the old file or all of the new one.

    See :mod:`mocohub.fileio`: on any failure the error propagates and an
    existing ``path`` is untouched.

    Example:
        >>> atomic_save({"w": torch.zeros(2)}, "runs/a/weights.pt")
    """
    with atomic_writer(path) as f:
        torch.save(obj, f)


def capture_rng_state() -> dict[str, Any]:
    """The state of every global random generator, in a ``weights_only``-loadable form.

    Covers Python's ``random``, NumPy's legacy global generator, torch's CPU
    generator and, once CUDA is initialised, every CUDA device's generator.
    Under DDP each process has its own state: this is the calling process's.

    Example:
        >>> state = capture_rng_state()
        >>> a = torch.rand(1); restore_rng_state(state); bool(torch.rand(1) == a)
        True
    """
    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=True)  # noqa: NPY002 (the global generator)
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], numpy_state)
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        # Only once CUDA is in use: reading the states would otherwise start CUDA.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put every global random generator back to ``state`` from :func:`capture_rng_state`.

    CUDA states are restored for the devices present in both the checkpoint
    and this machine; on another device count the run continues, not bit for bit.

    Example:
        >>> restore_rng_state(load_checkpoint("runs/a/checkpoint_last.pt")["rng"])
    """
    try:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
        np.random.set_state(  # noqa: NPY002 (the global generator)
            (
                npy["bit_generator"],
                npy["keys"].numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(
            f"The checkpoint's random-generator state is incomplete ({_reason(e)}); "
            "resume from a checkpoint written by mocohub."
        ) from e


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    epoch: int,
    step: int,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything needed to continue a run identically, as one checkpoint dict.

    ``epoch`` is the epoch in progress (after the last step of epoch ``e``,
    pass ``e + 1``) and ``step`` the optimizer steps completed in the whole
    run; a resumed loop skips ``step - epoch * steps_per_epoch`` batches.
    The tensors are the live ones: save the dict at once.

    Example:
        >>> state = training_state(model, optimizer, scaler, None, 1, 500, {"lr": 0.03})
        >>> sorted(state)[:4]
        ['config', 'epoch', 'format', 'format_version']
    """
    if epoch < 0 or step < 0:
        raise ConfigError(f"epoch ({epoch}) and step ({step}) must be non-negative.")
    try:
        plain_config = json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"The run config must hold only JSON values ({e}); convert paths and "
            "objects to strings or numbers before checkpointing."
        ) from e
    model = _unwrap(model)
    generator = model._shuffle_generator if isinstance(model, MoCo) else None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mocohub_version": __version__,
        "epoch": int(epoch),
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "shuffle_rng": generator.get_state() if generator is not None else None,
        "config": plain_config,
    }


def numbered_checkpoints(run_dir: Path) -> list[tuple[tuple[int, int], Path]]:
    """``((epoch, step), path)`` of the finished checkpoints in ``run_dir``, oldest first.

    Example:
        >>> numbered_checkpoints(Path("runs/a"))[-1]
        ((3, 0), PosixPath('runs/a/checkpoint_0003_00000000.pt'))
    """
    found = []
    for path in run_dir.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_file():
            found.append(((int(match[1]), int(match[2])), path))
    return sorted(found)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    epoch: int,
    step: int,
    keep_last: int = 2,
) -> Path:
    """Write ``state`` as ``run_dir/checkpoint_{epoch:04d}_{step:08d}.pt``; return its path.

    Each file is written atomically, then ``checkpoint_last.pt`` is pointed at
    it, then older checkpoints beyond ``keep_last`` are deleted (the new one
    always stays). Checkpoints numbered *after* the new one belong to another
    history (a later resume would jump back into it): they are never deleted
    here, the save is refused instead (``mocohub train --restart`` discards
    them knowingly). Under DDP call it on rank 0 only.

    Example:
        >>> save_checkpoint("runs/a", state, epoch=3, step=1200, keep_last=2).name
        'checkpoint_0003_00001200.pt'
    """
    if keep_last < 1:
        raise ConfigError(f"keep_last must be at least 1, got {keep_last}.")
    if epoch < 0 or step < 0:
        raise ConfigError(f"epoch ({epoch}) and step ({step}) must be non-negative.")
    for key, value in (("epoch", epoch), ("step", step)):
        if key in state and state[key] != value:
            raise ConfigError(
                f"The state says {key}={state[key]} but save_checkpoint got {key}={value}; "
                "pass the same numbers to training_state and save_checkpoint."
            )
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(
            f"Cannot create the run folder {run_dir} ({e.strerror}); choose a folder you can write."
        ) from e
    later = [p.name for number, p in numbered_checkpoints(run_dir) if number > (epoch, step)]
    if later:
        raise ConfigError(
            f"{run_dir} holds checkpoints after epoch {epoch} step {step} ({', '.join(later[:3])}) "
            "from another history; move them away or save into another folder."
        )
    path = run_dir / f"checkpoint_{epoch:04d}_{step:08d}.pt"
    atomic_save(dict(state), path)
    _point_last_at(path)

    older = [p for number, p in numbered_checkpoints(run_dir) if number < (epoch, step)]
    for stale in older[: max(len(older) - (keep_last - 1), 0)]:
        stale.unlink(missing_ok=True)
    return path


def _point_last_at(path: Path) -> None:
    """Atomically make ``checkpoint_last.pt`` a hard link to ``path`` (a copy if links fail)."""
    last = path.with_name(LAST_NAME)
    tmp = temporary_name(last)
    try:
        try:
            os.link(path, tmp)
        except OSError:  # no hard links on this file system: copy, and sync the copy
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, last)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def find_latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest finished checkpoint in ``run_dir`` (highest epoch, then step), or None.

    Temporary files left by a crash are ignored. ``checkpoint_last.pt`` is
    returned only when no numbered checkpoint is there; a missing folder has none.

    Example:
        >>> find_latest_checkpoint("runs/a")
        PosixPath('runs/a/checkpoint_0003_00001200.pt')
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is a file, not a run folder; pass the folder of the run.")
    found = numbered_checkpoints(run_dir)
    if found:
        return found[-1][1]
    last = run_dir / LAST_NAME
    return last if last.is_file() else None


def verify_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with the bytes of checkpoint ``path``, or None when they are intact.

    A zip checkpoint (what ``torch.save`` writes) must have its end record
    (else it is truncated) and every entry must match the CRC stored for it
    (else bytes inside it were damaged). Other formats (PyTorch's legacy
    pickle files) have no checksums and pass. Reads the whole file once.

    Example:
        >>> verify_checkpoint("runs/a/checkpoint_0003_00000000.pt") is None
        True
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                return None
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as e:
        if "not a zip file" in str(e):
            return "it is truncated: its zip archive has no end record"
        return f"its zip archive is damaged ({e})"
    except (EOFError, zlib.error) as e:
        return f"its zip archive is damaged ({type(e).__name__}: {e})"
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if bad is not None:
        return f"the entry {bad} fails its CRC check, so bytes inside it are damaged"
    return None


def find_resumable_checkpoint(
    run_dir: str | os.PathLike[str],
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest *intact* checkpoint in ``run_dir``, and the damaged ones newer than it.

    Checkpoints are verified newest first (:func:`verify_checkpoint`); each
    damaged one is skipped. Returns
    ``(path or None, [(damaged path, what is wrong), ...])``.

    Example:
        >>> path, damaged = find_resumable_checkpoint("runs/a")
        >>> path.name, [p.name for p, _ in damaged]
        ('checkpoint_0002_00000000.pt', ['checkpoint_0003_00000000.pt'])
    """
    run_dir = Path(run_dir)
    if find_latest_checkpoint(run_dir) is None:  # also refuses a file for a folder
        return None, []
    candidates = [path for _, path in numbered_checkpoints(run_dir)][::-1]
    if not candidates:
        candidates = [run_dir / LAST_NAME]
    damaged: list[tuple[Path, str]] = []
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def set_aside_damaged(paths: list[Path]) -> list[Path]:
    """Rename damaged checkpoints to ``<name>.damaged`` so that the run can go on past them.

    They are kept (not deleted) for inspection; a renamed file is no longer a
    checkpoint of the run. ``checkpoint_last.pt`` is left alone: the next save
    points it at the new checkpoint. Returns the new paths.

    Example:
        >>> set_aside_damaged([Path("runs/a/checkpoint_0003_00000000.pt")])
        [PosixPath('runs/a/checkpoint_0003_00000000.pt.damaged')]
    """
    moved = []
    for path in paths:
        if path.name == LAST_NAME or not path.exists():
            continue
        target = path.with_name(path.name + DAMAGED_SUFFIX)
        os.replace(path, target)
        moved.append(target)
    if moved:
        fsync_dir(moved[0].parent)
    return moved


def _process_is_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False  # alive under another user, or cannot tell: keep its file
    return False


def remove_orphan_temporaries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the checkpoint temporaries in ``run_dir`` whose writing process is gone.

    Only ``.checkpoint_*.<pid>.<random>.tmp`` files (see
    :func:`mocohub.fileio.temporary_name`) on this machine: a file of a live
    process, or one whose name does not say its writer, is kept. Returns the
    deleted paths.

    Example:
        >>> remove_orphan_temporaries("runs/a")
        [PosixPath('runs/a/.checkpoint_0003_00000000.pt.4242.9f3a1c0d.tmp')]
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for path in sorted(run_dir.glob(".checkpoint_*.tmp")):
        owner = temporary_owner(path)
        if owner is None or not path.is_file() or not _process_is_gone(owner[1]):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def checkpoint_point(checkpoint: Mapping[str, Any]) -> tuple[int, int]:
    """Where a loaded checkpoint continues: ``(epoch, step)`` (a reference one records no step).

    Example:
        >>> checkpoint_point(load_checkpoint("runs/a/checkpoint_0003_00000000.pt"))
        (3, 0)
    """
    return int(checkpoint.get("epoch", 0)), int(checkpoint.get("step", 0))


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a mocohub or reference MoCo checkpoint safely (``weights_only=True``).

    Raises :class:`~mocohub.errors.InputError` for a missing, truncated,
    damaged (:func:`verify_checkpoint`), unsafe or unrecognised file, or one
    written by a newer mocohub.

    Example:
        >>> ckpt = load_checkpoint("runs/a/checkpoint_last.pt")
        >>> ckpt["epoch"], ckpt["step"]
        (3, 1200)
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a checkpoint file such as {path / LAST_NAME}.")
    if not path.is_file():
        raise InputError(f"No checkpoint at {path}; check the path.")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise InputError(
            f"The checkpoint {path} is damaged ({problem}); pass an intact checkpoint, "
            "or resume with --resume auto, which continues from the newest intact one."
        )
    ckpt = read_checkpoint(path, map_location)
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        version = ckpt.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InputError(
                f"{path} has checkpoint format version {version}, newer than this mocohub "
                f"({__version__}) reads ({FORMAT_VERSION}); upgrade mocohub."
            )
        missing = sorted(_NATIVE_KEYS - ckpt.keys())
        if missing:
            raise InputError(
                f"The checkpoint {path} lacks {', '.join(missing)}; "
                "resume from a checkpoint written by save_checkpoint(training_state(...))."
            )
        return ckpt
    if is_reference_checkpoint(ckpt):
        return ckpt
    raise InputError(
        f"{path} is neither a mocohub training checkpoint nor a reference MoCo "
        "checkpoint; pass a file written by mocohub train or by the reference main_moco.py."
    )


def _reference_optimizer_state(ckpt: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """The reference optimizer state, cut to ``encoder_q`` when ``optimizer`` holds only that.

    The reference optimizes ``model.parameters()``: encoder_q's P tensors, then
    encoder_k's P, which never get a gradient and so have no state. An
    optimizer over ``encoder_q.parameters()`` takes the first P entries.
    """
    state = ckpt["optimizer"]
    try:
        (group,) = state["param_groups"]
        own = len(optimizer.param_groups[0]["params"])
        cut = len(optimizer.param_groups) == 1 and len(group["params"]) == 2 * own
        cut = cut and all(int(i) < own for i in state["state"])
    except (KeyError, TypeError, ValueError):
        return state  # not the reference's shape: load_state_dict says what does not fit
    if not cut:
        return state
    kept = group["params"][:own]
    return {
        "state": {i: s for i, s in state["state"].items() if i in kept},
        "param_groups": [{**group, "params": kept}],
    }


def _reason(error: BaseException) -> str:
    """The informative line of a PyTorch error message, short, for one-sentence errors."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(error).__name__
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    line = line.split(". ")[0].rstrip(".")  # its first sentence
    return line if len(line) <= 160 else line[:157] + "..."


def _load(what: str, target: Any, state: Any) -> None:
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"The checkpoint's {what} state does not fit this {what} ({_reason(e)}); "
            "build it with the settings of the run that wrote the checkpoint."
        ) from e


def restore_training_state(
    checkpoint: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[int, int]:
    """Load a checkpoint into the run's objects; return ``(epoch, step)`` to continue from.

    A mocohub checkpoint restores the model (strictly), the optimizer, the
    scaler and scheduler when given, every global random generator and MoCo's
    shuffle-BN generator: the run continues bit for bit on the same hardware.
    Under DDP its RNG state is the saving rank's.

    A reference ``main_moco.py`` checkpoint restores the model and, when given,
    the optimizer, built over ``model.parameters()`` as the reference does or
    over ``model.encoder_q.parameters()`` (the only ones with state). Its
    ``epoch`` is already the next epoch to run and is returned as is. It
    records no step (0 is returned), no RNG state, no scaler and no
    scheduler: those start afresh (a passed scheduler is left untouched), so
    the continued run is statistically, not bitwise, the same.

    Example:
        >>> epoch, step = restore_training_state(load_checkpoint(path), model, optimizer)
    """
    target = _unwrap(model)
    if checkpoint.get("format") != FORMAT:
        _load("model", target, moco_state_from_reference(checkpoint))
        if optimizer is not None and checkpoint.get("optimizer") is not None:
            _load("optimizer", optimizer, _reference_optimizer_state(checkpoint, optimizer))
        return int(checkpoint.get("epoch", 0)), 0

    _load("model", target, checkpoint["model"])
    if optimizer is not None:
        _load("optimizer", optimizer, checkpoint["optimizer"])
    # An empty scaler state comes from a disabled GradScaler: nothing to restore.
    if scaler is not None and checkpoint.get("scaler"):
        _load("scaler", scaler, checkpoint["scaler"])
    if scheduler is not None:
        if checkpoint.get("scheduler") is None:
            raise ConfigError(
                "The checkpoint holds no LR scheduler state but a scheduler was passed; "
                "resume with the run's own settings or start the scheduler yourself."
            )
        _load("scheduler", scheduler, checkpoint["scheduler"])
    restore_rng_state(checkpoint["rng"])
    if isinstance(target, MoCo):
        shuffle_rng = checkpoint.get("shuffle_rng")
        generator = None
        if shuffle_rng is not None:
            generator = torch.Generator()
            generator.set_state(shuffle_rng)
        # None: as in the saved run, the next step seeds it from the restored torch RNG.
        target._shuffle_generator = generator
    return int(checkpoint["epoch"]), int(checkpoint["step"])
