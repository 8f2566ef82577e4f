"""mocohub's native training checkpoint: its layout, its file names, finding and checking one.

``mocohub.training.checkpoint`` writes and resumes these files and
:mod:`mocohub.convert` reads a backbone out of them; both take the facts
from here (``training`` imports ``mocohub``, never the other way round).

A checkpoint is a plain dict saved with ``torch.save`` that loads with
``torch.load(..., weights_only=True)`` (tensors, numbers, strings, lists and
dicts only, so loading one never runs code from the file)::

    format            "mocohub.training-checkpoint"
    format_version    2
    mocohub_version   the mocohub that wrote it, e.g. "0.1.0"
    epoch             the epoch in progress: the first epoch to run on resume
    step              steps of that epoch already done: where to continue (0 at its start)
    model             MoCo's state_dict: encoder_q.*, encoder_k.*, queue, queue_ptr and
                      _extra_state (the shuffle-BN generator's state; empty: not started)
    optimizer         optimizer.state_dict()
    scaler            GradScaler.state_dict(), or None
    scheduler         LR scheduler's state_dict(), or None
    rng               mocohub.training.rng.capture_rng_state(): Python, NumPy, torch, CUDA
    config            the run's settings, a JSON-able dict

Version 1 kept the shuffle-BN generator's state beside the model, as
``shuffle_rng``; :func:`upgrade_checkpoint` moves it into the model state.

A run folder holds ``checkpoint_{epoch:04d}_{step:08d}.pt`` files (newest =
highest (epoch, step)) and ``checkpoint_last.pt``, a link to (or a copy of)
the newest, for a fixed name to resume from.

Example:
    >>> find_latest_checkpoint("runs/a")
    PosixPath('runs/a/checkpoint_0003_00001200.pt')
    >>> checkpoint_name(3, 1200)
    'checkpoint_0003_00001200.pt'
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mocohub.errors import InputError, error_summary

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LAST_NAME",
    "check_format_version",
    "checkpoint_name",
    "find_latest_checkpoint",
    "find_resumable_checkpoint",
    "is_native_checkpoint",
    "numbered_checkpoints",
    "upgrade_checkpoint",
    "verify_checkpoint",
]

FORMAT = "mocohub.training-checkpoint"
FORMAT_VERSION = 2
LAST_NAME = "checkpoint_last.pt"
_NUMBERED = re.compile(r"checkpoint_(\d+)_(\d+)\.pt")  # temp files start with "." and end ".tmp"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
# The model-state key of MoCo's own state (torch's nn.Module extra-state key).
_EXTRA_STATE = "_extra_state"


def checkpoint_name(epoch: int, step: int) -> str:
    """The file name of the checkpoint at ``(epoch, step)``.

    Example:
        >>> checkpoint_name(3, 0)
        'checkpoint_0003_00000000.pt'
    """
    return f"checkpoint_{epoch:04d}_{step:08d}.pt"


def numbered_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[tuple[int, int], Path]]:
    """``((epoch, step), path)`` of the finished checkpoints in ``run_dir``, oldest first.

    Example:
        >>> numbered_checkpoints("runs/a")[-1]
        ((3, 0), PosixPath('runs/a/checkpoint_0003_00000000.pt'))
    """
    found = []
    for path in Path(run_dir).iterdir():
        match = _NUMBERED.fullmatch(path.name)
        if match and path.is_file():
            found.append(((int(match[1]), int(match[2])), path))
    return sorted(found)


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

    ``torch.load`` does not check the zip archive's CRCs, so damage after the
    write would load silently: a zip checkpoint (what ``torch.save`` writes)
    must have its end record (else it is truncated) and every entry must match
    the CRC stored for it. Other formats (PyTorch's legacy pickle files) have
    no checksums and pass. Reads the whole file once.

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
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    except Exception as e:
        # EOFError, zlib.error, UnicodeDecodeError (a name), struct.error, ValueError...
        return f"its zip archive is damaged ({type(e).__name__}: {error_summary(e)})"
    if bad is not None:
        return f"the entry {bad} fails its CRC check, so bytes inside it are damaged"
    return None


def find_resumable_checkpoint(
    run_dir: str | os.PathLike[str],
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest *intact* checkpoint in ``run_dir``, and the damaged ones newer than it.

    Checkpoints are verified newest first (:func:`verify_checkpoint`); each
    damaged one is skipped. ``checkpoint_last.pt`` shares its target's bytes
    and is only a candidate when no numbered checkpoint is there. Returns
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


def is_native_checkpoint(ckpt: Any) -> bool:
    """Whether a loaded object says it is a mocohub training checkpoint (any version).

    Example:
        >>> is_native_checkpoint({"format": FORMAT, "format_version": 2})
        True
    """
    return isinstance(ckpt, Mapping) and ckpt.get("format") == FORMAT


def check_format_version(ckpt: Mapping[str, Any], path: str | os.PathLike[str]) -> int:
    """The format version of native checkpoint ``ckpt`` (read from ``path``) if mocohub reads it.

    Raises :class:`~mocohub.errors.InputError` for a version newer than
    :data:`FORMAT_VERSION` (upgrade mocohub) or one that is not a positive integer.

    Example:
        >>> check_format_version({"format": FORMAT, "format_version": 1}, "old.pt")
        1
    """
    from mocohub import __version__

    version = ckpt.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(
            f"{path} has no valid checkpoint format version ({version!r}); the file is "
            "damaged, so pass another checkpoint."
        )
    if version > FORMAT_VERSION:
        raise InputError(
            f"{path} has checkpoint format version {version}, newer than this mocohub "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade mocohub."
        )
    return version


def upgrade_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """A native checkpoint of any readable version in the layout of :data:`FORMAT_VERSION`.

    Version 1 kept MoCo's shuffle-BN generator state beside the model as
    ``shuffle_rng``; it moves into the model state's ``_extra_state``, where
    ``MoCo.set_extra_state`` reads it, so an old run resumes exactly. A
    version-1 model with no generator state gets none (MoCo then seeds its
    generator on the next step from the restored torch RNG, as the run did).

    Example:
        >>> upgrade_checkpoint({"format": FORMAT, "format_version": 1, "model": {},
        ...                     "shuffle_rng": None}, "old.pt")["format_version"]
        2
    """
    upgraded = dict(ckpt)
    if check_format_version(ckpt, path) == 1:
        generator = upgraded.pop("shuffle_rng", None)
        model = upgraded.get("model")
        if generator is not None and isinstance(model, Mapping):
            upgraded["model"] = {**model, _EXTRA_STATE: generator}
        upgraded["format_version"] = FORMAT_VERSION
    return upgraded
